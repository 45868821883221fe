"""Where things live at run time: local home, data root, MLflow tracking URI.

Embedded defaults need nothing: everything goes under ``$CLOSEDLOOP_HOME`` (default
``./.closedloop``). Production sets ``CLOSEDLOOP_DATA_ROOT`` to an object-storage URI and the
``mlflow_default`` Airflow connection (or ``MLFLOW_TRACKING_URI``) to a tracking server.
"""

from __future__ import annotations

import os
from pathlib import Path

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env() -> dict[str, str]:
    """Threads per process of the numeric libraries (scikit-learn's OpenMP, numpy's BLAS): one unless
    the deployment says otherwise. A task or a simulation job is the unit of parallelism here; several
    of them on the same cores with a thread pool each oversubscribe the cores, and OpenMP's spinning
    threads then make each of them many times slower (``benchmarks/simulation_shards.py``)."""
    return {k: os.environ.get(k, "1") for k in THREAD_VARS}


def home() -> Path:
    return Path(os.environ.get("CLOSEDLOOP_HOME", ".closedloop")).resolve()


def local_endpoint() -> Path:
    """Where a running ``make airflow`` (``closedloop serve``) says where it listens and where its logins are,
    so the CLI finds it on any port (removed when it stops)."""
    return home() / "endpoint.json"


def data_root() -> str:
    """Root URI of dataset snapshots: a local folder or any fsspec URI (``s3://…``, ``memory://…``)."""
    root = os.environ.get("CLOSEDLOOP_DATA_ROOT") or str(home() / "data")
    return root.rstrip("/")


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow' / 'mlflow.db'}"


def artifact_root(uri: str | None = None) -> str | None:
    """Artifact location for new experiments when tracking into a local store (None: server decides)."""
    if os.environ.get("CLOSEDLOOP_ARTIFACT_ROOT"):
        return os.environ["CLOSEDLOOP_ARTIFACT_ROOT"]
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def project_dir() -> Path:
    """The project folder (``dags/``, ``include/``): the one place that finds it.

    ``$CLOSEDLOOP_PROJECT_DIR`` if set; else the source checkout this package runs from (an
    editable install); else the working directory or its nearest parent with ``include/pipelines``
    (a wheel installed in an image whose working directory is the project, e.g. ``/opt/closedloop``).
    """
    if os.environ.get("CLOSEDLOOP_PROJECT_DIR"):
        return Path(os.environ["CLOSEDLOOP_PROJECT_DIR"]).resolve()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "include" / "pipelines").is_dir():
        return checkout
    cwd = Path.cwd().resolve()
    return next((p for p in (cwd, *cwd.parents) if (p / "include" / "pipelines").is_dir()), cwd)


def include_dir() -> Path:
    """The project's include/ folder (templates, expectation suites, scenario catalogs)."""
    if os.environ.get("CLOSEDLOOP_INCLUDE_DIR"):
        return Path(os.environ["CLOSEDLOOP_INCLUDE_DIR"]).resolve()
    return project_dir() / "include"


def pipelines_dir() -> Path:
    return include_dir() / "pipelines"


def dags_dir() -> Path:
    return project_dir() / "dags"


def pipelines_beside(dags_folder: str | Path) -> Path:
    """The templates of the project whose DAG folder is ``dags_folder`` (what Airflow's processes know)."""
    return Path(dags_folder).parent / "include" / "pipelines"


def incident_inbox() -> Path:
    """Folder the incident inbox watchers read (``CLOSEDLOOP_INCIDENT_INBOX``, default under the home)."""
    return Path(os.environ.get("CLOSEDLOOP_INCIDENT_INBOX") or home() / "incidents" / "inbox").resolve()
