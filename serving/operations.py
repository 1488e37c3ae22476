"""Running the service inside BentoML's processes: the environment and readiness.

Everything here is about the processes ``bentoml serve`` starts, not about a request:

- :func:`prepare_process`, run once when a process imports the service: a relative
  ``BENTOML_HOME`` made absolute, and a worker stopped with its arbiter (``PR_SET_PDEATHSIG``).
- :func:`model_ready`, the entry service's ``/readyz``: asks the model worker, never waits long.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bentoml

# /readyz asks the model worker's /readyz and gives up (503) after this many seconds.
READY_TIMEOUT_S = 2.0


def prepare_process() -> None:
    """Ready this process for serving (called when the service module is imported, in the
    arbiter and in every worker): :func:`absolute_bentoml_home`,
    :func:`stop_with_the_arbiter`, in that order."""
    absolute_bentoml_home()
    stop_with_the_arbiter()


def absolute_bentoml_home(module_file: str = __file__) -> str | None:
    """Make a relative ``BENTOML_HOME`` absolute in this process's environment; the value set,
    or None when there was nothing to do.

    ``bentoml serve`` imports the service (and so this module) in its own process before it
    starts the workers with a copy of its environment, and each worker changes directory to the
    Bento's ``src/`` before it opens the model store: with the README's
    ``BENTOML_HOME=.bentoml`` the model worker looked for ``src/.bentoml`` and crash-looped.
    Served from the store, this file is ``<home>/bentos/<name>/<version>/src/serving/<file>.py``
    whatever the working directory,
    so ``<home>`` is the absolute home; served from the project folder (``bentoml serve
    serving.service:Classifier``) the import runs where the relative path was given.
    """
    home = os.environ.get("BENTOML_HOME", "")
    if not home or os.path.isabs(os.path.expanduser(home)):
        return None
    here = Path(module_file).absolute()
    in_store = len(here.parents) > 5 and here.parents[4].name == "bentos"
    absolute = str(here.parents[5]) if in_store else os.path.abspath(home)
    os.environ["BENTOML_HOME"] = absolute
    return absolute


def stop_with_the_arbiter() -> None:
    """In a BentoML worker on Linux, have the kernel send SIGTERM when the worker's parent (the
    arbiter of ``bentoml serve``) dies: a SIGKILLed arbiter left its entry worker running. The
    arbiter itself (no worker index) is left to its own parent."""
    if not sys.platform.startswith("linux"):
        return
    if bentoml.server_context.worker_index is None:
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


async def model_ready(student, timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Whether the model worker says it is ready within ``timeout_s`` seconds.

    BentoML's own probe of a dependency waited on a worker that was not up (a model worker in a
    crash loop left ``/readyz`` hanging, and the hung probes kept SIGTERM from stopping the
    server): here any failure or delay is "not ready", and ``/readyz`` answers 503 at once.
    """
    import asyncio

    try:
        return bool(await asyncio.wait_for(student.is_ready(timeout_s), timeout_s))
    except Exception:  # not reachable, timed out, closed: all mean "not ready"
        return False
