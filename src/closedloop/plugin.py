"""The Airflow plugin: registers the package's name and triggers with Airflow.

Views, API endpoints and listeners are added here as they arrive; everything heavy is
imported lazily so loading the plugin costs nothing at DAG parse time.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin


class ClosedLoopPlugin(AirflowPlugin):
    name = "closedloop"
