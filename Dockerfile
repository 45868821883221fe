# The image of every Airflow service in docker-compose.yaml: the locked production set
# (Airflow, Celery provider, PostgreSQL and Redis drivers, MLflow, Great Expectations) + this package,
# its DAGs and templates (the Airflow plugin comes with the package, by its entry point).
FROM python:3.11-slim
RUN pip install --no-cache-dir uv
WORKDIR /opt/closedloop
COPY pyproject.toml uv.lock README.md ./
COPY src ./src
RUN uv sync --frozen --no-dev --extra production --compile-bytecode
ENV PATH=/opt/closedloop/.venv/bin:$PATH
COPY dags ./dags
COPY include ./include
COPY airflow_settings.yaml ./
