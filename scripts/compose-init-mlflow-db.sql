-- MLflow's backend store lives beside Airflow's metadata in the same Postgres server.
CREATE DATABASE mlflow OWNER airflow;
-- MLflow's auth app (users and permissions)
CREATE DATABASE mlflow_auth OWNER airflow;
