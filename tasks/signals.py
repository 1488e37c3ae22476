"""Stopping on request: SIGTERM raised as an exception, and writes it must not cut in half.

A run ends ``FINISHED`` only when its work is done; Ctrl-C and SIGTERM must unwind through
``finally`` blocks so that MLflow runs end ``KILLED`` (:mod:`tasks.tracking.runs`) and run
records stay true. Python's default for SIGTERM ends the process at once; inside
:func:`sigterm_raises` it raises :class:`Terminated` instead, deferred past any
:func:`sigterm_deferred` write in progress.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Exit statuses of the ``medtransfer`` command when stopped, as a shell reports a signal.
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM, raised as an exception (see :func:`sigterm_raises`) so that ``finally`` blocks
    and run records see it. A ``BaseException``, as ``KeyboardInterrupt`` is: ``except
    Exception`` must not swallow a request to stop."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises
    ``KeyboardInterrupt``; the previous handler is restored on the way out.

    Python's default for SIGTERM ends the process at once, with no unwinding, which would leave
    an MLflow run ``RUNNING`` forever. Outside the main thread (a Prefect task's worker) Python
    allows no handler: nothing is installed, and the process's own handling stays in charge.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        stop = Terminated(f"stopped by signal {signal.Signals(signum).name}")
        if _deferring:
            _pending_stop.append(stop)  # raised when the write ends (see sigterm_deferred)
            return
        raise stop

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# How many writes a SIGTERM must not cut are in progress (MLflow store writes), and a SIGTERM
# that arrived during one. An exception raised in the middle of a SQLite write can leave that
# connection's transaction open, and the run could then not be ended (`database is locked`):
# the stop waits for the write to finish.
_deferring = 0
_pending_stop: list[Terminated] = []


@contextmanager
def sigterm_deferred() -> Iterator[None]:
    """Defer SIGTERM over a write that must not be cut in half, an MLflow store write (also
    usable as a decorator): a SIGTERM arriving inside is raised as :class:`Terminated` right
    after it, never in the middle of it."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending_stop:
        stop = _pending_stop.pop()
        _pending_stop.clear()
        raise stop
