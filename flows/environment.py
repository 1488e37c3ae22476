"""Process-wide defaults for Prefect and BentoML that suit the machines we run on.

Each is an environment variable set only when the user has not set it, so a user's own value
always wins. They must be in place before ``prefect`` is imported, because Prefect reads its
settings once at import; ``flows/__init__.py`` therefore applies them, which covers the
``medtransfer`` command and ``python -m flows.<module>`` alike.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping
from pathlib import Path

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


# Prefect keeps its state (the temporary server's database of flow runs, cached results) in
# PREFECT_HOME, ~/.prefect by default: every checkout on the machine then shared one history,
# and runs of another checkout appeared beside this one's. Run from a checkout (this package
# sits beside dvc.yaml), it is the project's own `.prefect/` unless the user chose a home or
# a server (PREFECT_HOME, PREFECT_API_URL).
PROJECT_PREFECT_HOME = ".prefect"


def project_root() -> Path | None:
    """The checkout this package runs from (the folder of ``dvc.yaml`` and
    ``pyproject.toml``), or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "dvc.yaml").is_file() and (root / "pyproject.toml").is_file() else None


def apply_process_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set every variable of :data:`PROCESS_DEFAULTS` that ``environ`` (this process's
    environment) lacks, and ``PREFECT_HOME`` to the checkout's ``.prefect/`` when neither it
    nor ``PREFECT_API_URL`` is set."""
    environ = os.environ if environ is None else environ
    for name, value in PROCESS_DEFAULTS.items():
        environ.setdefault(name, value)
    root = project_root()
    if root is not None and not {"PREFECT_HOME", "PREFECT_API_URL"} & set(environ):
        environ["PREFECT_HOME"] = str(root / PROJECT_PREFECT_HOME)
