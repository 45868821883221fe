"""The ``closedloop`` command (:mod:`closedloop.cli.main` holds the command table)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    from closedloop.cli.main import main as run

    return run(argv)
