"""The Airflow plugin: the web app (lineage and health, as JSON and as pages) in Airflow's API
server, linked from Airflow's navigation (*Browse → Lineage*, *Browse → Pipeline health*).

Nothing heavy is imported here: MLflow is imported by the endpoints when they are called.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from closedloop.web.app import create_app


class ClosedLoopPlugin(AirflowPlugin):
    name = "closedloop"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/closedloop", "name": "closedloop lineage"}]
    external_views = [
        {"name": "Lineage", "href": "/closedloop/lineage", "destination": "nav", "category": "browse",
         "url_route": "closedloop-lineage"},
        {"name": "Pipeline health", "href": "/closedloop/health", "destination": "nav", "category": "browse",
         "url_route": "closedloop-health"},
        {"name": "Review card", "href": "/closedloop/review?dag_id={DAG_ID}&run_id={RUN_ID}", "destination": "dag_run",
         "url_route": "closedloop-review"},
    ]
