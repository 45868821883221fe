"""Who is running a step, and with which code: the lineage every record carries."""

from __future__ import annotations

import functools
import importlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

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


@functools.cache
def code_version() -> str:
    """Package version plus the git commit of the checkout, when there is one (``0.1.0+g1a2b3c4``)."""
    from closedloop import __version__

    repo = Path(__file__).resolve().parents[3]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return __version__
    return f"{__version__}+g{sha}{'.dirty' if dirty else ''}"


def resolve(entry_point: str):
    """Import ``package.module:function`` (at run time only, never at DAG parse time)."""
    module, _, attr = entry_point.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except AttributeError:
        from closedloop.errors import PermanentError

        raise PermanentError(f"entry point {entry_point!r}: module {module!r} has no attribute {attr!r}") from None
