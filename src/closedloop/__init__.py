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
# A model's environment is the pinned requirements the training step names. MLflow 3 would also look
# for a uv project in the task's working directory and copy its lock file into every model (a worker
# started in a checkout logs that checkout's uv.lock): the working directory is not the model's project.
os.environ.setdefault("MLFLOW_UV_AUTO_DETECT", "false")
os.environ.setdefault("MLFLOW_LOG_UV_FILES", "false")
# no progress bars drawn into task logs (one log event per redraw)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
