"""Who is running a step, and with which code: the lineage every record carries."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from closedloop import settings


@dataclass(frozen=True)
class RunContext:
    """Identity of one step execution. ``run_key`` names the pipeline run across retries."""

    pipeline: str
    template_digest: str
    dag_id: str
    run_id: str
    task_id: str = ""
    try_number: int = 1
    data_root: str = field(default_factory=settings.data_root)
    tracking_uri: str = field(default_factory=settings.tracking_uri)
    origin: dict[str, str] = field(default_factory=dict, compare=False)
    """What started the run (``closedloop.trigger`` = schedule, backfill, request, incident; the
    requester; the incident): tags on every MLflow run and model version of the run."""
    use_cache: bool = field(default=True, compare=False)
    """False when the run was started with ``closedloop_cache: false`` (``closedloop rerun --no-cache``)."""
    map_index: int = field(default=-1, compare=False)
    """The mapped task instance's index (a shard of ``simulate``); -1 for an unmapped task."""

    @property
    def run_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    def for_key(self, run_key: str) -> RunContext:
        """The same pipeline, another run (``run_key`` = ``dag_id/run_id``)."""
        from dataclasses import replace

        dag_id, _, run_id = run_key.partition("/")
        return replace(self, dag_id=dag_id, run_id=run_id)

    def for_task(self, task_id: str, try_number: int = 1) -> RunContext:
        from dataclasses import replace

        return replace(self, task_id=task_id, try_number=try_number)


def code_version() -> str:
    """Package version plus the content digest of the closedloop package (``0.1.0+c1a2b3c4d5e6f``):
    the same in a checkout and in an image built without ``.git``. The git commit is recorded
    beside it (``closedloop.git_commit``) where there is one."""
    from closedloop import __version__
    from closedloop.runtime.identity import package_digest

    return f"{__version__}+c{package_digest()[:12]}"


def resolve(entry_point: str):
    """Import ``package.module:function`` (at run time only, never at DAG parse time)."""
    module, _, attr = entry_point.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except AttributeError:
        from closedloop.errors import PermanentError

        raise PermanentError(f"entry point {entry_point!r}: module {module!r} has no attribute {attr!r}") from None
