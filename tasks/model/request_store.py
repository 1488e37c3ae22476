"""The service's per-request record for drift monitoring: non-identifying numbers only.

One row per classified (or out-of-scope) image: time, route, OOD score, whether the reply
abstained or was refused out of scope, the class probabilities and three statistics of the
model's input image, for a colour model also per channel
(:func:`tasks.model.profile.image_statistics`; a gray model's per-channel columns are null). No pixel, no header value, no
file name. The store is a SQLite file that keeps the latest ``max_records`` classified rows and,
apart from them, the latest ``max_records`` refusals (the oldest of each kind go first): a flood
of out-of-scope requests cannot push out the classified rows the drift check compares.
``medtransfer monitor`` reads the latest rows with :func:`read_recent`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np

from tasks.model.profile import image_statistics, statistic_names

logger = logging.getLogger(__name__)
SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    route TEXT NOT NULL,
    ood_score REAL,
    abstained INTEGER NOT NULL,
    refused INTEGER NOT NULL,
    probabilities TEXT,
    mean REAL, std REAL, saturated REAL,
    mean_r REAL, std_r REAL, saturated_r REAL,
    mean_g REAL, std_g REAL, saturated_g REAL,
    mean_b REAL, std_b REAL, saturated_b REAL
)"""
# Every statistic column: the gray ones, then a colour model's per channel (added to a store
# created before they existed, see RequestStore._connect).
STATISTIC_COLUMNS = statistic_names(3)
INDEX = "CREATE INDEX IF NOT EXISTS requests_kind ON requests (refused, id)"
# Rows are trimmed to max_records every this many writes (not on each one).
TRIM_EVERY = 100


class RequestStore:
    """A bounded SQLite store of per-request numbers; ``path`` "" keeps nothing.

    Writing never fails a request: an unwritable store is logged once and then skipped.
    """

    def __init__(self, path: str | Path, max_records: int) -> None:
        self.path = Path(path) if str(path) else None
        self.max_records = max_records
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._writes = 0
        self._failed = False

    def record(
        self,
        route: str,
        score: float,
        probabilities: np.ndarray | None,
        image: np.ndarray | None,
        *,
        abstained: bool,
        refused: bool,
    ) -> None:
        """Keep one request's numbers (``image``: the model's uint8 input ``(S, S)`` or
        ``(3, S, S)``)."""
        if self.path is None or self._failed:
            return
        stats = list(image_statistics(image[np.newaxis])[0]) if image is not None else []
        stats += [None] * (len(STATISTIC_COLUMNS) - len(stats))
        probs = (
            json.dumps([round(float(p), 6) for p in probabilities])
            if probabilities is not None
            else None
        )
        row = (
            time.time(),
            route,
            score if np.isfinite(score) else None,
            int(abstained),
            int(refused),
            probs,
            *map(_number, stats),
        )
        try:
            with self._lock:
                connection = self._connect()
                connection.execute(
                    "INSERT INTO requests (time, route, ood_score, abstained, refused, "
                    f"probabilities, {', '.join(STATISTIC_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(row))})",
                    row,
                )
                self._writes += 1
                if self._writes % TRIM_EVERY == 0:
                    _trim(connection, self.max_records)
                connection.commit()
        except (sqlite3.Error, OSError) as err:
            self._failed = True
            logger.warning(
                "monitor store %s not writable (%s): not recording", self.path, type(err).__name__
            )

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            assert self.path is not None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._connection = sqlite3.connect(self.path, check_same_thread=False)
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=NORMAL")
            self._connection.execute(SCHEMA)
            self._connection.execute(INDEX)
            _add_channel_columns(self._connection)
        return self._connection


def _add_channel_columns(connection: sqlite3.Connection) -> None:
    """Add the per-channel statistic columns a store created before them lacks."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(requests)")}
    for column in STATISTIC_COLUMNS:
        if column not in present:
            # another worker may have added it meanwhile ("duplicate column name")
            with contextlib.suppress(sqlite3.OperationalError):
                connection.execute(f"ALTER TABLE requests ADD COLUMN {column} REAL")


def _trim(connection: sqlite3.Connection, max_records: int) -> None:
    """Keep the latest ``max_records`` rows of each kind (classified, refused), each on its own:
    trimming both together let 12,000 refusals erase every classified row."""
    for refused in (0, 1):
        connection.execute(
            "DELETE FROM requests WHERE refused = ? AND id <= (SELECT id FROM requests "
            "WHERE refused = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
            (refused, refused, max_records),
        )


def _number(value) -> float | None:
    return None if value is None else float(value)


def read_recent(path: str | Path, window: int) -> list[dict]:
    """The latest ``window`` classified rows of the store at ``path`` and the refusals recorded
    since the oldest of them (at most ``window``; the latest ``window`` refusals when nothing was
    classified), oldest first, as dicts.

    Refusals are read beside the classified rows, not in place of them: a flood of refusals
    leaves the drift check its images and shows up as a high refused share.
    """
    connection = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True)
    try:
        connection.row_factory = sqlite3.Row
        classified = connection.execute(
            "SELECT * FROM requests WHERE refused = 0 ORDER BY id DESC LIMIT ?", (window,)
        ).fetchall()
        since = classified[-1]["id"] if classified else 0
        refused = connection.execute(
            "SELECT * FROM requests WHERE refused != 0 AND id >= ? ORDER BY id DESC LIMIT ?",
            (since, window),
        ).fetchall()
    finally:
        connection.close()
    return sorted((dict(row) for row in [*classified, *refused]), key=lambda row: row["id"])
