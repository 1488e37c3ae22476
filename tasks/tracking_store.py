"""Is the MLflow tracking store there and writable? Asked once, before a stage logs anything.

MLflow meets an unreachable server by retrying for minutes with no output, and a broken SQLite
store with an SQLAlchemy traceback. :func:`check_tracking_store` answers both in seconds with
one line naming the store and what to do.
"""

from __future__ import annotations

import socket
import sqlite3
from pathlib import Path
from urllib.parse import urlsplit

from tasks.errors import MedtransferError

CONNECT_TIMEOUT_S = 3.0
SQLITE_HEADER = b"SQLite format 3\x00"
_SETTING = "mlflow.tracking_uri (or MLFLOW_TRACKING_URI)"


def check_tracking_store(uri: str) -> None:
    """Refuse a tracking store MLflow could not use.

    Args:
        uri: the tracking URI as MLflow will get it: ``http(s)://host[:port]`` (a server must
            accept a connection within :data:`CONNECT_TIMEOUT_S`), ``sqlite:///path`` (an
            existing file must be a SQLite database that takes a write; a missing one is
            created by MLflow), ``postgresql[+driver]://`` (the driver must be installed: the
            ``postgres`` extra), anything else (a file store, databricks...) is left to MLflow.

    Raises:
        MedtransferError: one line naming the server or the file, what is wrong and what to do.
    """
    scheme = urlsplit(uri).scheme.lower()
    if scheme in ("http", "https"):
        _check_server(uri)
    elif scheme.startswith("postgresql"):
        check_postgres_driver(uri, _SETTING)
    elif scheme == "sqlite":
        _check_sqlite(Path(uri.split("://", 1)[1][1:]) if "://" in uri else Path(uri))


# SQLAlchemy's PostgreSQL drivers by URL suffix: the module each needs (no suffix: psycopg2).
POSTGRES_DRIVERS = {"": "psycopg2", "psycopg": "psycopg", "psycopg2": "psycopg2",
                    "asyncpg": "asyncpg"}  # fmt: skip


def check_postgres_driver(uri: str, setting: str) -> None:
    """Refuse a ``postgresql[+driver]://`` URI whose driver is not installed, in one line
    naming the ``medtransfer[postgres]`` extra (and ``setting``, where the URI came from)."""
    import importlib.util

    driver = urlsplit(uri).scheme.lower().partition("+")[2]
    module = POSTGRES_DRIVERS.get(driver, driver)
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None
        found = False
    if not found:
        raise MedtransferError(
            f"The PostgreSQL store in {setting} needs the {module} driver, which is not "
            "installed: pip install 'medtransfer[postgres]' (and use postgresql+psycopg://...)."
        )


def _check_server(uri: str) -> None:
    """A TCP connection to the server's host and port, within the timeout."""
    parts = urlsplit(uri)
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), CONNECT_TIMEOUT_S):
            return
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise MedtransferError(
            f"The MLflow tracking server {uri} cannot be reached ({why} within "
            f"{CONNECT_TIMEOUT_S:g} s). Start it, or point {_SETTING} at a running server or at "
            "sqlite:///mlflow.db."
        ) from err


def _check_sqlite(path: Path) -> None:
    """An existing store must be a SQLite file that takes a write (rolled back at once)."""
    if not path.exists():
        return
    if path.is_dir():
        _refuse(path, "is a folder, not a SQLite file")
    with open(path, "rb") as store:
        header = store.read(len(SQLITE_HEADER))
    if header and header != SQLITE_HEADER:
        _refuse(path, "is not a SQLite database (its first bytes are not SQLite's)")
    try:
        # as a URI (percent-encoded) so that no character of the name is read as a parameter
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=5)
        connection.isolation_level = None  # our own BEGIN/ROLLBACK below
        try:
            version = connection.execute("PRAGMA user_version").fetchone()[0]
            # a write of the same value, rolled back: refused by a read-only file, folder or disk
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(f"PRAGMA user_version = {int(version)}")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except sqlite3.Error as err:
        _refuse(path, f"cannot be written ({err})")


def _refuse(path: Path, why: str) -> None:
    raise MedtransferError(
        f"The MLflow store {path} {why}. Restore it from a backup, make it and its folder "
        f"writable, or point {_SETTING} at another store (a new sqlite:///file is created)."
    )
