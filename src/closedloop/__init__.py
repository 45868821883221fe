"""airflow-closedloop: closed-loop retraining of driving models on Airflow 3 and MLflow.

Importing this package is cheap: nothing heavy (mlflow, sklearn, pandas, great_expectations)
is imported until a step runs.
"""

from __future__ import annotations

__version__ = "0.1.0"
