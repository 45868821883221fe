"""``airflow_settings.yaml``: the shipped file is valid, and bad files are refused with every problem named."""

from __future__ import annotations

import pytest

from closedloop.errors import SpecError
from closedloop.local.airflow_settings import load_settings


def test_shipped_settings_file_is_valid(project):
    s = load_settings(project / "airflow_settings.yaml")
    assert {p["name"] for p in s["pools"]} == {"closedloop_incident"}
    assert s["connections"][0]["connection_id"] == "mlflow_default" and "password" not in s["connections"][0]


def test_environment_references_are_filled_in(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKEN", "t0k")
    path = tmp_path / "s.yaml"
    path.write_text("airflow:\n  connections:\n    - {conn_id: c, conn_type: http, conn_password: '${TOKEN}', "
                    "conn_port: '8443'}\n  variables:\n    - {variable_name: v, variable_value: {a: 1}}\n")
    s = load_settings(path)
    assert s["connections"][0]["password"] == "t0k" and s["connections"][0]["port"] == 8443
    assert s["variables"][0]["value"] == '{"a": 1}'


def test_bad_file_names_every_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE", raising=False)
    path = tmp_path / "s.yaml"
    path.write_text("""airflow:
  connections:
    - {conn_id: a, conn_type: http, conn_password: hunter2}
    - {conn_id: b}
    - {conn_id: c, conn_type: http, conn_hots: x, conn_port: eighty}
    - {conn_id: d, conn_type: http, conn_host: '${NOPE}'}
  pools:
    - {pool_name: p, pool_slot: -1}
  variables:
    - {variable_name: v}
  secrets: []
""")
    with pytest.raises(SpecError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(str(path))
    for fragment in ("airflow.secrets: unknown section", "connections[0].conn_password: a literal password",
                     "connections[1]: needs conn_id and conn_type", "connections[2].conn_hots: unknown field",
                     "connections[2].conn_port: expected a number", "connections[3].conn_host: environment variable "
                     "NOPE is not set", "pools[0]: needs pool_name and pool_slot", "variables[0]: needs variable_name"):
        assert fragment in message, fragment
    assert "hunter2" not in message
