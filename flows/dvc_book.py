"""One book of what ran: the Prefect flow reads and writes DVC's record (``dvc.lock``).

``dvc repro`` and ``medtransfer run`` run the same stage functions; without this module each
kept its own record (Prefect's cache, DVC's lock file), so after a flow run ``dvc status`` said
every stage had changed and ``dvc repro`` redid the whole pipeline. Now, when the flow runs on
the project's own ``params.yaml`` (the file ``dvc.yaml`` reads) with no ``-S`` overrides:

- before a stage, a stage that ``dvc status`` reports unchanged is a cache hit: its report is
  read from disk and nothing is recomputed (so ``medtransfer run`` after ``dvc repro`` is all
  cache hits);
- after a stage, its outputs and inputs are recorded in ``dvc.lock`` the way ``dvc commit
  <stage>`` records them (the DVC Python API's ``Repo.commit``), so ``dvc status`` is clean and
  ``dvc repro`` does nothing after the flow.

Why record rather than run the stages through ``dvc repro``: the flow keeps what only Prefect
gives (cache keys that cover ``-S`` overrides and the MLflow store, retries of I/O hiccups,
ingest's decoding fanned out over the task runner, training resumed after a crash), and DVC
keeps being the record of the committed configuration. With overrides, or a parameter file that
is not the project's, the flow ran something ``dvc.yaml`` does not describe: it records nothing
and says so, and ``dvc status`` truthfully shows those stages as changed.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

logger = logging.getLogger("medtransfer.dvc")


class DvcBook:
    """``dvc.lock`` of the DVC project at ``root`` (the folder of ``dvc.yaml`` and ``.dvc/``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def up_to_date(self, stage: str) -> bool:
        """Whether ``dvc status <stage>`` finds nothing changed: its ``dvc.lock`` entry matches
        its dependencies, parameters and outputs on disk (a stage never recorded is not)."""
        from dvc.repo import Repo

        # DVC resolves a stage's paths against the working directory, as its command line
        # does from the project root (a no-op for `medtransfer run` started there).
        with contextlib.chdir(self.root), Repo(str(self.root)) as repo:
            return not repo.status(targets=[f"dvc.yaml:{stage}"])

    def record(self, stage: str) -> None:
        """Record ``stage``'s dependencies, parameters and outputs as they are now in
        ``dvc.lock`` (``dvc commit --force <stage>``; cached outputs go to DVC's cache)."""
        from dvc.repo import Repo

        with contextlib.chdir(self.root), Repo(str(self.root)) as repo:
            repo.commit(f"dvc.yaml:{stage}", force=True)
        logger.info("%s: recorded in dvc.lock", stage)


def project_book(params_file: str | Path, overrides: list[str]) -> DvcBook | None:
    """The book of the DVC project the flow runs, or None (with a log line saying why) when
    the flow's configuration is not the one ``dvc.yaml`` describes.

    Args:
        params_file: the flow's parameter file.
        overrides: the flow's ``-S key=value`` overrides.
    """
    path = Path(params_file).resolve()
    root = path.parent
    if not ((root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()):
        return None  # not a DVC project (a parameter file elsewhere): nothing to keep in step
    if path.name != "params.yaml":
        logger.info(
            "dvc.lock not updated: %s is not the params.yaml that dvc.yaml reads", path.name
        )
        return None
    if overrides:
        logger.info(
            "dvc.lock not updated: -S %s changes what dvc.yaml describes, so `dvc status` "
            "will show the stages that ran as changed (use `dvc exp run -S ...` to record "
            "a variant as a DVC experiment)",
            " -S ".join(overrides),
        )
        return None
    return DvcBook(root)
