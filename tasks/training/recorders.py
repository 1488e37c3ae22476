"""What the training loop reports, and to whom: recorders called at the loop's events.

In the manner of MONAI's and Ignite's event handlers: :func:`tasks.training.loop.fit` calls
every recorder it is given, on rank 0 only, when the fit starts, after each epoch's checkpoint
and when the fit ends. A recorder decides what to do with that (a log line, a progress bar, an
MLflow metric, a Prefect artifact); the loop knows none of them.

Here: the two recorders (the :class:`~tasks.training.types.TrainingRecorder` protocol is in
:mod:`tasks.training.types`) that need nothing but the
standard library and tqdm. The MLflow recorder lives in :mod:`tasks.tracking.recorder`, the Prefect one
in :mod:`flows.progress` (pure logic imports neither MLflow nor Prefect).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator

from tqdm import tqdm

from tasks.training.types import FitResult, TrainingRecorder

LOGGER_NAME = "medtransfer.training"


class LoggingRecorder(TrainingRecorder):
    """One INFO line per epoch and a summary at the end, on the ``medtransfer.training`` logger.

    The per-epoch line: epoch k/N (1-based), train loss, val AUC, images/s and an estimate of
    the time left (mean epoch time so far times the epochs left; early stopping can only make
    it shorter).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger(LOGGER_NAME)
        self._total_epochs = 0
        self._epoch_seconds: list[float] = []
        self._started = 0.0

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        """Log what is about to be trained; start the clock for the summary."""
        self._total_epochs = total_epochs
        self._epoch_seconds = []
        self._started = time.perf_counter()
        where = f"resuming at epoch {start_epoch + 1}" if start_epoch else "starting"
        self.logger.info("training on %d images for %d epochs, %s", n_train, total_epochs, where)

    def epoch_ended(self, row: dict[str, float]) -> None:
        """Log one line for the epoch in ``row``."""
        self._epoch_seconds.append(row["seconds"])
        epochs_left = self._total_epochs - int(row["epoch"])
        seconds_left = epochs_left * sum(self._epoch_seconds) / len(self._epoch_seconds)
        self.logger.info(
            "epoch %d/%d: train loss %.4f, val AUC %.3f, %.0f images/s, about %s left",
            int(row["epoch"]),
            self._total_epochs,
            row["train_loss"],
            row["val_auc"],
            row["images_per_s"],
            format_duration(seconds_left),
        )

    def fit_ended(self, result: FitResult) -> None:
        """Log the selected epoch, its validation score and the time the fit took."""
        if result.best_epoch < 1:
            self.logger.info("training finished: no epoch ran")
            return
        best_auc = result.history[_row_index(result, result.best_epoch)]["val_auc"]
        self.logger.info(
            "training finished: best epoch %d/%d, best val AUC %.3f, %d epochs in %s%s",
            result.best_epoch,
            self._total_epochs,
            best_auc,
            len(result.history),
            format_duration(time.perf_counter() - self._started),
            ", stopped early" if result.stopped_early else "",
        )


class ProgressBarRecorder(TrainingRecorder):
    """A tqdm bar over epochs on stderr, as ingestion has over files; ``enabled=False``: none.

    The bar's postfix carries the last epoch's train loss and val AUC.
    """

    def __init__(self, enabled: bool = True, desc: str = "train") -> None:
        self.enabled = enabled
        self.desc = desc
        self._bar: tqdm | None = None

    def fit_started(self, total_epochs: int, start_epoch: int, n_train: int) -> None:
        """Open a bar of ``total_epochs`` steps, ``start_epoch`` of them already done."""
        self._bar = tqdm(
            total=total_epochs,
            initial=start_epoch,
            desc=self.desc,
            unit="epoch",
            disable=not self.enabled,
        )

    def epoch_ended(self, row: dict[str, float]) -> None:
        """Advance the bar by one epoch, showing its loss and val AUC."""
        if self._bar is not None:
            self._bar.set_postfix(
                loss=f"{row['train_loss']:.4f}", val_auc=f"{row['val_auc']:.3f}", refresh=False
            )
            self._bar.update(1)

    def fit_ended(self, result: FitResult) -> None:
        """Close the bar (early stopping leaves it short of its total, which is the truth)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class TqdmLoggingHandler(logging.Handler):
    """A logging handler that writes through ``tqdm.write``, so log lines print above an open
    progress bar instead of breaking it. For a terminal: the ``medtransfer`` command adds it."""

    def emit(self, record: logging.LogRecord) -> None:
        """Write one formatted record to stderr."""
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never take the training down with it
            self.handleError(record)


@contextlib.contextmanager
def quiet_bars() -> Iterator[None]:
    """No library progress bar while inside (``--quiet``; ours follow the callers' ``progress``
    flags): MLflow's artifact bars (``Downloading artifacts``, read on each download), and in
    processes started inside, every tqdm bar (tqdm reads ``TQDM_DISABLE`` when imported, so
    not in this process, where it is already imported). Restored on exit."""
    switches = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "TQDM_DISABLE": "1"}
    before = {name: os.environ.get(name) for name in switches}
    os.environ.update(switches)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def format_duration(seconds: float) -> str:
    """``75.2`` -> ``"1m 15s"``; ``3725`` -> ``"1h 02m"``; ``8.4`` -> ``"8s"``; NaN -> ``"?"``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _row_index(result: FitResult, epoch: int) -> int:
    """Position of ``epoch`` in ``result.history`` (epochs count from 1)."""
    return next(i for i, row in enumerate(result.history) if row["epoch"] == epoch)


def log_to_terminal(logger_name: str = "medtransfer") -> None:
    """Show ``logger_name``'s INFO lines on stderr, above any progress bar (for the command line).

    Idempotent. The lines do not also propagate to the root logger, which Prefect may have given
    a console handler of its own: each line prints once.
    """
    logger = logging.getLogger(logger_name)
    if any(isinstance(h, TqdmLoggingHandler) for h in logger.handlers):
        return
    handler = TqdmLoggingHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
