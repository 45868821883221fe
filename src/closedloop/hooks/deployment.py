"""Connections that are the deployment's own, read only from where no person's Airflow rights reach:
the environment (``AIRFLOW_CONN_<ID>``) or the secrets backend configured under ``[secrets] backend``
— never Airflow's metadata database, where role ``op`` creates connections. The signing key and the
deployment's Airflow account come from here: a connection a person planted never stands in for them."""

from __future__ import annotations

import json
import os


def env_name(conn_id: str) -> str:
    return "AIRFLOW_CONN_" + conn_id.upper()


def connection(conn_id: str):
    """The deployment's connection ``conn_id`` (an Airflow SDK ``Connection``), or None when neither the
    environment nor a configured secrets backend has it."""
    from airflow.sdk import Connection

    text = os.environ.get(env_name(conn_id), "").strip()
    if text:
        return Connection.from_json(text, conn_id=conn_id) if text.startswith("{") \
            else Connection.from_uri(text, conn_id=conn_id)
    return from_secrets_backend(conn_id)


def from_secrets_backend(conn_id: str):
    """``conn_id`` from the secrets backend configured under ``[secrets] backend`` (None without one)."""
    try:
        from airflow.configuration import conf

        path = conf.get("secrets", "backend", fallback="") or ""
    except Exception:  # no Airflow configuration here
        return None
    if not path.strip():
        return None
    from airflow.utils.module_loading import import_string

    kwargs = json.loads(conf.get("secrets", "backend_kwargs", fallback="") or "{}")
    return import_string(path)(**kwargs).get_connection(conn_id)
