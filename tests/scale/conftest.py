"""One PostgreSQL, an MLflow tracking server and a Prefect server on it, and one Dask cluster per
test session, shared by the scale tests (each starts at most once, on first use, and is stopped
by PID)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scale.services import (
    DaskCluster,
    MlflowServer,
    Postgres,
    PrefectServer,
    dask_cluster,
    mlflow_server,
    postgres_server,
    prefect_server,
)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL server on loopback, with an empty cluster."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def tracking_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """``mlflow server`` whose backend store is the database ``mlflow`` on ``postgres``."""
    backend = postgres.create_database("mlflow")
    with mlflow_server(backend, tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


@pytest.fixture(scope="session")
def dask_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster]:
    """``dask scheduler`` and two ``dask worker`` processes on loopback."""
    with dask_cluster(tmp_path_factory.mktemp("dask-cluster")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def prefect_postgres_server(
    postgres: Postgres, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrefectServer]:
    """``prefect server start`` whose database is ``prefect`` on ``postgres`` (through asyncpg,
    which Prefect's server uses for PostgreSQL)."""
    postgres.create_database("prefect")
    with prefect_server(
        postgres.url("prefect", driver="asyncpg"), tmp_path_factory.mktemp("prefect-server")
    ) as server:
        yield server
