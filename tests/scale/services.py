"""Real servers at hospital scale for tests: PostgreSQL, an MLflow tracking server and a Prefect
server on it, and a Dask cluster of separate processes, each on loopback, each stopped by its
process id.

PostgreSQL refuses to run as root: under root (CI) its data folder belongs to the ``postgres``
user (``make postgres`` creates that user where it is missing) and the server runs as that user;
otherwise it runs as whoever runs the tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.processes import free_port, http_ok, start_process, stop_process, wait_until

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
PG_SUPERUSER = "medtransfer"  # the test cluster's only role (trust on loopback: a test server)


def postgres_binary(name: str) -> str:
    """The path of PostgreSQL's ``name`` (initdb, postgres): on PATH (/usr/local/bin here) or
    in Debian's versioned folder (/usr/lib/postgresql/15/bin), where PATH does not reach."""
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        raise RuntimeError(f"PostgreSQL's {name} is not installed: run `make postgres`")
    return found


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL server on 127.0.0.1:``port``."""

    port: int
    process: subprocess.Popen

    def url(self, database: str, driver: str = "psycopg") -> str:
        """An SQLAlchemy URL of ``database`` through ``driver`` (psycopg, asyncpg)."""
        return f"postgresql+{driver}://{PG_SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its psycopg URL."""
        import psycopg

        dsn = f"host=127.0.0.1 port={self.port} user={PG_SUPERUSER} dbname=postgres"
        with psycopg.connect(dsn, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user() -> dict:
    """``Popen`` arguments that run a child as the ``postgres`` user when we are root."""
    if os.geteuid() != 0:
        return {}
    try:
        account = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("no `postgres` user to run PostgreSQL as: run `make postgres`") from None
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@contextlib.contextmanager
def postgres_server() -> Iterator[Postgres]:
    """initdb a fresh cluster in a temporary folder and run ``postgres`` on a free loopback port
    (its socket in that folder too); stopped by PID (fast shutdown) and the folder removed."""
    # Not pytest's tmp_path: under root that folder is 0700 root, which postgres cannot enter.
    home = Path(tempfile.mkdtemp(prefix="medtransfer-pg-"))
    as_user = _as_postgres_user()
    if as_user:
        os.chown(home, as_user["user"], as_user["group"])
    data, log = home / "data", home / "postgres.log"
    try:
        subprocess.run(
            [postgres_binary("initdb"), "-D", str(data), "-U", PG_SUPERUSER, "--auth=trust",
             "--no-sync", "-E", "UTF8", "--locale=C"],
            check=True, capture_output=True, timeout=120, cwd=home, **as_user,
        )  # fmt: skip
        port = free_port()
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [postgres_binary("postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={home}",
                 "-c", "fsync=off", "-c", "max_connections=200"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=home,
                start_new_session=True, **as_user,
            )  # fmt: skip
        try:
            wait_until(lambda: _accepts(port), 60, "postgres", process, log)
            yield Postgres(port, process)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)  # fast shutdown: ends open sessions
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class MlflowServer:
    """``mlflow server`` on a PostgreSQL backend store, artifacts served from ``artifacts``."""

    uri: str
    artifacts: Path
    process: subprocess.Popen
    log: Path


@contextlib.contextmanager
def mlflow_server(backend_uri: str, root: Path) -> Iterator[MlflowServer]:
    """``mlflow server`` on 127.0.0.1 with ``backend_uri`` as its store and ``root/artifacts``
    as its artifact destination (clients reach artifacts through it: ``mlflow-artifacts:/``)."""
    port, artifacts, log = free_port(), root / "artifacts", root / "mlflow-server.log"
    command = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_uri, "--artifacts-destination", artifacts.as_uri(),
        "--workers", "1",
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    process = start_process(command, log, env, cwd=root)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{uri}/health"), 180, "mlflow server", process, log)
        yield MlflowServer(uri, artifacts, process, log)
    finally:
        stop_process(process)


@dataclass(frozen=True)
class DaskCluster:
    """A ``dask scheduler`` and its ``dask worker`` processes, each its own process group."""

    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen]
    log_dir: Path

    def replace_dead_workers(self) -> None:
        """Start a new worker for each one that died (stopped with the others at the end)."""
        for index, worker in enumerate(list(self.workers)):
            if worker.poll() is not None:
                self.workers[index] = start_worker(
                    self.address, self.log_dir / f"worker-{index}.log", _worker_env(), REPO
                )
        wait_until(lambda: _worker_count(self.address) >= len(self.workers), 120, "dask workers")


@contextlib.contextmanager
def dask_cluster(root: Path, n_workers: int = 2) -> Iterator[DaskCluster]:
    """``dask scheduler`` and ``n_workers`` ``dask worker`` processes (one thread each: decoding
    holds the GIL) on loopback, started from the repository root so that they import ``tasks``."""
    env, repo = _worker_env(), REPO
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = start_process(
        [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--dashboard-address", ":0", "--no-show"],
        root / "scheduler.log", env, cwd=repo,
    )  # fmt: skip
    workers: list[subprocess.Popen] = []
    try:
        wait_until(lambda: _accepts(port), 60, "dask scheduler", scheduler, root / "scheduler.log")
        for index in range(n_workers):
            workers.append(start_worker(address, root / f"worker-{index}.log", env, repo))
        wait_until(lambda: _worker_count(address) >= n_workers, 120, "dask workers")
        yield DaskCluster(address, scheduler, workers, root)
    finally:
        for worker in workers:
            stop_process(worker)
        stop_process(scheduler)


def _worker_env() -> dict[str, str]:
    """This environment with the repository on PYTHONPATH: workers unpickle ``tasks`` code."""
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def start_worker(address: str, log: Path, env: dict, cwd: Path) -> subprocess.Popen:
    """One ``dask worker`` process of one thread, no nanny (a killed worker stays dead)."""
    return start_process(
        [str(BIN / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
         "--host", "127.0.0.1", "--dashboard-address", ":0"],
        log, env, cwd=cwd,
    )  # fmt: skip


def _worker_count(address: str) -> int:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"])


@dataclass(frozen=True)
class PrefectServer:
    """``prefect server start`` whose database is PostgreSQL; ``api_url`` ends in ``/api``."""

    api_url: str
    process: subprocess.Popen
    log: Path
    database: str

    def client_env(self, prefect_home: Path) -> dict[str, str]:
        """The environment of a process that talks to this server (a ``medtransfer`` command,
        ``prefect worker``): none of this process's ``PREFECT_*`` settings, its own
        ``PREFECT_HOME``, this server's API, workers polling every second (not every 10 s),
        and the repository first on PYTHONPATH (a worker imports the flows by module name)."""
        env = {k: v for k, v in _worker_env().items() if not k.startswith("PREFECT_")}
        return env | {
            "PREFECT_HOME": str(prefect_home),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        }


@contextlib.contextmanager
def prefect_server(database_url: str, root: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on 127.0.0.1 with ``PREFECT_API_DATABASE_CONNECTION_URL``
    set to ``database_url`` (``postgresql+asyncpg://...``); the UI and analytics off, and its
    scheduler looping every second. Stopped by its process group's id."""
    port, log = free_port(), root / "prefect-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
    }
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    process = start_process(command, log, env, cwd=root)
    try:
        api_url = f"http://127.0.0.1:{port}/api"
        wait_until(lambda: http_ok(f"{api_url}/health"), 180, "prefect server", process, log)
        yield PrefectServer(api_url, process, log, database_url)
    finally:
        stop_process(process)
