"""The Airflow plugin: the lineage web app (JSON endpoints and a page) in Airflow's API server,
linked from Airflow's navigation (*Browse → Lineage*).

Nothing heavy is imported here: MLflow is imported by the endpoints when they are called.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from closedloop.webapp import create_app


class ClosedLoopPlugin(AirflowPlugin):
    name = "closedloop"
    fastapi_apps = [{"app": create_app(), "url_prefix": "/closedloop", "name": "closedloop lineage"}]
    external_views = [{"name": "Lineage", "href": "/closedloop/lineage", "destination": "nav",
                       "category": "browse", "url_route": "closedloop-lineage"}]
