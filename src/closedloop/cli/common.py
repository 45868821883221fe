"""What every command shares: where the templates are, finding a pipeline, exit codes."""

from __future__ import annotations

import sys
from pathlib import Path

from closedloop import settings

#: Exit codes: 0 success, 1 refused or failed, 2 bad input (unknown pipeline, model, version or run;
#: invalid template or request).
OK, REFUSED, BAD_INPUT = 0, 1, 2
#: Airflow's answers that mean "you asked for something that does not exist or is malformed".
_BAD_INPUT_HTTP = frozenset({400, 404, 409, 422})


def failure(exc: BaseException) -> int | None:
    """The one error path of every command: what failed and where, once, on stderr, and its exit code
    (1 refused or unreachable, 2 bad input or not found); None for an error that is a bug (re-raised)."""
    from closedloop.errors import EvidenceError, SpecError
    from closedloop.records.airflow_api import AirflowAPIError
    from closedloop.records.lineage import LineageError

    if isinstance(exc, AirflowAPIError):
        code = exit_code(exc.status)
    elif isinstance(exc, (SpecError, LineageError, EvidenceError, LookupError)):
        code = BAD_INPUT
    else:
        return None
    print(f"error: {exc}", file=sys.stderr)
    return code


def exit_code(status: int | None) -> int:
    """The one mapping from an HTTP status (Airflow's REST API) to an exit code."""
    if status is not None and 200 <= status < 300:
        return OK
    return BAD_INPUT if status in _BAD_INPUT_HTTP else REFUSED


def pipelines_dir(args) -> Path:
    """``--dir`` when given, else the project's ``include/pipelines``."""
    return Path(args.dir) if getattr(args, "dir", None) else settings.pipelines_dir()


def find_pipeline(args, name: str):
    """The valid template named ``name``, or None after saying which ones exist."""
    from closedloop.spec import load_all

    specs, _ = load_all(pipelines_dir(args))
    for s in specs:
        if s.spec.name == name:
            return s
    known = ", ".join(s.spec.name for s in specs) or "none"
    print(f"error: no valid pipeline named {name!r} in {pipelines_dir(args)} (known: {known}); "
          "`closedloop pipelines validate` shows invalid templates", file=sys.stderr)
    return None


# -- arguments shared by several commands: each declared here, once -----------------------------
def arg_login(sp) -> None:
    """``--user`` / ``--api-url``: whom Airflow's REST API sees (:class:`closedloop.records.airflow_api.AirflowAPI`)."""
    sp.add_argument("--user", help="Airflow user, e.g. safety-lead (default $AIRFLOW_USERNAME); the password from "
                    "$AIRFLOW_PASSWORD, or on the running `make airflow` of this checkout from its logins file")
    sp.add_argument("--api-url", help="Airflow's URL, e.g. http://127.0.0.1:8081 (default $AIRFLOW_API_URL, else the "
                    "running `make airflow` of this checkout on any port, else http://127.0.0.1:8080)")


def arg_dir(sp) -> None:
    """``--dir``: the templates folder."""
    sp.add_argument("--dir", help="templates folder (default: include/pipelines)")


def arg_paging(sp, what: str) -> None:
    """``--limit`` / ``--offset`` of a listing (the maximum is the lineage queries')."""
    from closedloop.records.lineage import MAX_LIMIT

    sp.add_argument("--limit", type=int, default=MAX_LIMIT, help=f"list at most this many of {what} (max {MAX_LIMIT})")
    sp.add_argument("--offset", type=int, default=0, help=f"skip this many of {what} (paging)")


def arg_json(sp, help: str = "print JSON instead of text") -> None:
    sp.add_argument("--json", action="store_true", help=help)
