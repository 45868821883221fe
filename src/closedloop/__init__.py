"""airflow-closedloop: closed-loop retraining of driving models on Airflow 3 and MLflow.

Importing this package is cheap: nothing heavy (mlflow, sklearn, pandas, great_expectations)
is imported until a step runs.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

# MLflow 3 sends usage telemetry from every client process unless told not to. Our steps run on
# machines that hold driving data, so we ask it not to (MLFLOW_DISABLE_TELEMETRY=false turns it back
# on); this also avoids a race in MLflow's telemetry client, whose session id vanishing from the
# environment made a concurrent tracking request fail ("API request ... failed with exception
# '_MLFLOW_TELEMETRY_SESSION_ID'").
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
