"""Process-wide defaults for Prefect and BentoML that suit the machines we run on.

Each is an environment variable set only when the user has not set it, so a user's own value
always wins. They must be in place before ``prefect`` is imported, because Prefect reads its
settings once at import; ``flows/__init__.py`` therefore applies them, which covers the
``medtransfer`` command and ``python -m flows.<module>`` alike.
"""

from __future__ import annotations

import os

PROCESS_DEFAULTS = {
    # Our machines, and many hospital networks, reach no analytics endpoint: Prefect's and
    # BentoML's usage telemetry only produce failed connections and log noise. A user can
    # still opt in by setting these variables.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "BENTOML_DO_NOT_TRACK": "true",
    "DO_NOT_TRACK": "1",
    # Without PREFECT_API_URL a flow run starts a temporary Prefect server, which on a fresh
    # PREFECT_HOME first migrates a new database. On a busy 2-core machine that has taken more
    # than Prefect's default 20 s, and the run failed with "Timed out while attempting to
    # connect to ephemeral Prefect API server".
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # The stages log through Python logging (loggers under `tasks` and `medtransfer`, no
    # Prefect import in tasks/): Prefect copies these loggers' lines into the flow run's logs.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,medtransfer",
    # ...and outside a flow run (a stage command, a test) those lines stay local, without a
    # warning that there is no flow run to send them to.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}


def apply_process_defaults() -> None:
    """Set every variable of :data:`PROCESS_DEFAULTS` that this process's environment lacks."""
    for name, value in PROCESS_DEFAULTS.items():
        os.environ.setdefault(name, value)
