"""What each stage writes, checked before it replaces anything.

A stage that meets a disk refusing one of its outputs halfway (the dataset swapped in, then its
report refused) would leave outputs that disagree. Each stage calls :func:`check_stage_outputs`
first; :func:`tasks.atomic.check_can_write` probes every output's folder, so the refusal comes
while the old outputs are all still in place.
"""

from __future__ import annotations

from pathlib import Path

from tasks import reports
from tasks.atomic import check_can_write
from tasks.config import Params
from tasks.evaluation import plot_data
from tasks.figures import figures_dir

# Plot images under <reports_dir>/plots that each stage draws (besides its plot data).
_EVALUATE_PLOTS = ("roc.png", "confusion_test.png", "reliability_test.png", "gradcam_test.png")


def stage_outputs(stage: str, params: Params) -> tuple[list[Path], list[Path]]:
    """``(files, folders)`` that ``stage`` writes under ``params``.

    Stages without an entry here (advise, monitor) write nothing of the project's.
    """
    reports_dir = params.reports_dir
    plot = lambda name: reports.plot_path(reports_dir, name)  # noqa: E731
    report = reports.BY_STAGE[stage].path(reports_dir) if stage in reports.BY_STAGE else None
    files, folders = [report] if report else [], []
    if stage == "ingest":
        folders.append(Path(params.data.processed_dir))
    elif stage == "train":
        files.append(plot(plot_data.HISTORY))
        folders += [Path(params.train.model_dir), Path(params.train.checkpoint_dir)]
    elif stage == "evaluate":
        names = (plot_data.ROC, plot_data.CONFUSION, plot_data.RELIABILITY, *_EVALUATE_PLOTS)
        files += [plot(name) for name in names]
        folders.append(figures_dir(reports_dir, stage))
    elif stage == "robustness":
        files += [plot(plot_data.ROBUSTNESS), plot("robustness.png")]
        folders.append(figures_dir(reports_dir, stage))
    elif stage == "package":
        folders.append(Path(params.serving.export_dir))
    elif stage == "synthesize":
        folders.append(Path(params.synthetic.output_dir))
    return files, folders


def check_stage_outputs(stage: str, params: Params) -> None:
    """Refuse ``stage`` before it writes anything when the disk would refuse one of its
    outputs: raises the ``OSError`` of :func:`tasks.atomic.check_can_write`, which the command
    line and the flow print as one line naming the stage, the path and what to do."""
    files, folders = stage_outputs(stage, params)
    check_can_write(files, folders)
