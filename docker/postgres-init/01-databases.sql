-- Run once by the postgres image when its data volume is empty (/docker-entrypoint-initdb.d),
-- as POSTGRES_USER, who therefore owns the three databases:
--   dagster  Dagster runs, event logs, schedules and sensors (docker/dagster.yaml)
--   mlflow   the MLflow tracking server's backend store and model registry
--   events   the platform's event store (RECSYS_POSTGRES_URL; written by `recsys consume`)
-- Changing this file does not touch an existing volume: `docker compose down -v` starts afresh.
CREATE DATABASE dagster;
CREATE DATABASE mlflow;
CREATE DATABASE events;
