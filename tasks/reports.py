"""Every stage report: its path, its producer, its content, and one way to write and read it.

A report is a JSON file in ``reports_dir`` (a DVC metric). Stages never spell a report's file
name: they write and read through the :class:`Report` constants below, so the Prefect cache
(``flows.cache``), ``dvc.yaml`` and the stages agree on where each one lives. Writes are atomic
(a temporary file renamed into place), so a crash never leaves half a report behind.

The ingest report's content is :class:`tasks.data.dataset_writer.IngestResult`; each other report's
is described below by a ``TypedDict`` (the keys other stages and the summary read). Dataclasses
are written through :func:`as_json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypedDict, TypeVar

from tasks.atomic import write_file
from tasks.errors import MedtransferError

Content = TypeVar("Content")

PLOTS_DIR = "plots"


@dataclass(frozen=True)
class Report(Generic[Content]):
    """One stage report: ``<reports_dir>/<file_name>``, written by ``medtransfer <stage>``;
    ``Content`` is what :meth:`read` returns (a ``TypedDict`` of the keys readers use)."""

    file_name: str
    stage: str

    def path(self, reports_dir: str | Path) -> Path:
        """Where the report lives under ``reports_dir``."""
        return Path(reports_dir) / self.file_name

    def write(self, reports_dir: str | Path, content: Any) -> Path:
        """Write ``content`` (a mapping or a dataclass) as JSON, atomically; returns the path.

        Non-finite numbers become ``null``: JSON has no ``NaN`` or ``Infinity``.
        """
        text = json.dumps(as_json(content), indent=2) + "\n"
        return write_file(self.path(reports_dir), lambda partial: partial.write_text(text))

    def read(self, reports_dir: str | Path) -> Content:
        """The report's content.

        Raises:
            MedtransferError: the report is missing or not JSON; the message names the command
                that writes it.
        """
        path = self.path(reports_dir)
        if not path.is_file():
            raise MedtransferError(f"{path} is missing: run `medtransfer {self.stage}` first.")
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise MedtransferError(
                f"{path} is not valid JSON ({err.msg}); re-run `medtransfer {self.stage}`."
            ) from err

    def read_if_present(self, reports_dir: str | Path) -> Content | None:
        """The report's content, or None when the stage has not run."""
        return self.read(reports_dir) if self.path(reports_dir).is_file() else None


# ----------------------------- content of the reports built as dicts: the keys others read


class TrainContent(TypedDict, total=False):
    run_id: str | None
    dataset_version: str
    strategy: str
    best_epoch: int  # 1-based, as the logs, MLflow's best_epoch and the run summary count
    best_val_auc: float
    epochs_run: int
    resumed_from_epoch: int | None
    auto: dict[str, Any]  # train.teacher/strategy auto: the evidence step's decision


class MetricsContent(TypedDict, total=False):
    threshold: float
    threshold_rule: str
    val: dict[str, float]
    test: dict[str, float]


class RobustnessContent(TypedDict, total=False):
    run_id: str | None  # the training run whose student was judged (register checks it)
    verdict: dict[str, Any]
    metrics: dict[str, float]


class RegisterContent(TypedDict, total=False):
    model_name: str
    version: str
    alias: str
    alias_moved: bool
    champion_version: str | None
    reasons: list[str]


class PackageContent(TypedDict, total=False):
    bento: str
    archive: str
    bento_model: str


# The ingest report is IngestResult.to_report() (tasks.data.dataset_writer): read as plain JSON.
INGEST: Report[dict[str, Any]] = Report("ingest.json", "ingest")
TRAIN: Report[TrainContent] = Report("train.json", "train")
METRICS: Report[MetricsContent] = Report("metrics.json", "evaluate")
ROBUSTNESS: Report[RobustnessContent] = Report("robustness.json", "robustness")
REGISTER: Report[RegisterContent] = Report("register.json", "register")
PACKAGE: Report[PackageContent] = Report("package.json", "package")
MONITOR: Report[dict[str, Any]] = Report("monitor.json", "monitor")  # tasks.monitoring.drift
ALL = (INGEST, TRAIN, METRICS, ROBUSTNESS, REGISTER, PACKAGE, MONITOR)
BY_STAGE = {report.stage: report for report in ALL}


def plot_path(reports_dir: str | Path, file_name: str) -> Path:
    """Where a plot (a DVC plot, also logged to MLflow) lives: ``<reports_dir>/plots/<name>``."""
    return Path(reports_dir) / PLOTS_DIR / file_name


def as_json(content: Any) -> Any:
    """``content`` as JSON-ready values: dataclasses as dicts, tuples as lists, paths as text,
    numpy scalars as Python numbers, non-finite floats as None."""
    if dataclasses.is_dataclass(content) and not isinstance(content, type):
        content = (
            content.to_report() if hasattr(content, "to_report") else dataclasses.asdict(content)
        )
    if isinstance(content, dict):
        return {str(key): as_json(value) for key, value in content.items()}
    if isinstance(content, list | tuple):
        return [as_json(value) for value in content]
    if isinstance(content, Path):
        return str(content)
    if hasattr(content, "item") and callable(content.item):  # numpy scalars
        content = content.item()
    if isinstance(content, float) and not math.isfinite(content):
        return None
    return content
