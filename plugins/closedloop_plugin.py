from closedloop.plugin import ClosedLoopPlugin  # noqa: F401  (registration for deployments that mount plugins/)
