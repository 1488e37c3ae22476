"""The stage table: every ``medtransfer`` stage declared once.

A stage is an entry point ``run_<name>(params, ...)`` in ``tasks/stages/<name>.py`` that hands
its work to the domain packages. Its row here says what it is called, what ``params.yaml``
keys it reads, what it reads and writes (data, models, other stages' reports), and how it is
run. Everything that used to list the stages by hand follows this table:

- the ``medtransfer`` sub-commands and their handlers (``flows.cli``);
- the Prefect tasks, their cache keys and output checks (``flows.pipeline``, ``flows.cache``);
- the import closure each stage's code version covers (``tasks.code_closure``);
- ``dvc.yaml``'s ``deps``, ``params``, ``outs`` and ``metrics`` (checked by
  ``tests/test_stage_table.py``, which parses dvc.yaml and compares), and the run summary's
  sections (``flows.summary``, checked by the same test).

Adding a stage: write ``tasks/stages/<name>.py`` with ``run_<name>`` and add one row below
(plus, for a pipeline stage, its dvc.yaml entry, which the test spells out when missing).

The artifacts a stage reads or writes are named by :data:`ARTIFACTS`; another stage's report is
``"report:<stage>"`` (its file is :data:`tasks.reports.BY_STAGE`'s). This module imports
nothing from the project, so reading the table loads no stage.
"""

from __future__ import annotations

from dataclasses import dataclass

# What stages pass between them besides reports; dvc.yaml names each by the path given here.
ARTIFACTS: dict[str, str] = {
    "source": "${data.source}",  # the raw input folder or .npz
    "synthetic_set": "${synthetic.output_dir}",  # the built-in synthetic DICOM set
    "dataset": "data/processed",  # the processed dataset (data.processed_dir)
    "model": "models/student",  # the saved student (train.model_dir)
    "bentos": "bentos",  # the exported Bento archives
    "serving_profile": "reports/serving_profile",  # the training data's profile, for serving
    "requests": "${serving.monitor_store}",  # the service's per-request records
    # the figures that decide, one small file each: dvc.yaml's metrics (tasks.figures)
    "evaluate_figures": "reports/figures/evaluate",
    "robustness_figures": "reports/figures/robustness",
    # evaluate's test figures per group (a plot of dvc.yaml): the worst-group gate reads it
    "group_figures": "reports/plots/groups_test.json",
}
REPORT_PREFIX = "report:"


@dataclass(frozen=True)
class Stage:
    """One stage.

    Attributes:
        name: the sub-command and the module ``tasks.stages.<name>``.
        help: the sub-command's one-line description.
        params: the ``params.yaml`` keys it reads: sections (``"train"``) or single keys
            (``"eval.threshold"``); dvc.yaml's ``params`` and the cache key's parameters.
        logged_only: those of ``params`` that change only what the stage logs to MLflow, not
            its outputs (train's evaluation settings): dvc.yaml lists them, the Prefect cache
            key leaves them out, so a new threshold re-evaluates without retraining.
        reads: artifacts (:data:`ARTIFACTS`) and reports (``"report:<stage>"``) it reads.
        writes: artifacts it writes; its own report (if it has one) is ``"report:<name>"``.
        options: command-line options its entry function takes: ``"progress"`` (bars unless
            ``--quiet``), ``"resume"`` (``--resume``).
        pipeline: part of the DVC pipeline and the Prefect flow (a cached task).
        locks: holds the project lock while it runs (it writes the project's outputs).
        tracked: logs to MLflow, so the tracking store is part of its cache key.
        extra_modules: modules it runs besides ``tasks/stages/<name>.py``'s import closure
            (their ``tasks`` imports count, as the Bento ships them).
        extra_files: other files whose content its result depends on.
    """

    name: str
    help: str
    params: tuple[str, ...]
    logged_only: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    pipeline: bool = True
    locks: bool = True
    tracked: bool = False
    extra_modules: tuple[str, ...] = ()
    extra_files: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The entry point's module, ``tasks.stages.<name>``."""
        return f"tasks.stages.{self.name}"

    @property
    def entry(self) -> str:
        """The entry function, ``tasks.stages.<name>:run_<name>``."""
        return f"{self.module}:run_{self.name}"

    @property
    def report_reads(self) -> tuple[str, ...]:
        """The stages whose reports it reads."""
        return _reports(self.reads)

    @property
    def report_writes(self) -> tuple[str, ...]:
        """The stages whose reports it writes (its own, when it has one)."""
        return _reports(self.writes)


def _reports(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(
        name.removeprefix(REPORT_PREFIX) for name in names if name.startswith(REPORT_PREFIX)
    )


# The stages in run order; ``advise`` (no outputs) and ``monitor`` run on their own.
STAGES: tuple[Stage, ...] = (
    Stage(
        "synthesize",
        "write the built-in synthetic DICOM set (the default data.source) and its labels",
        params=("seed", "synthetic"),
        writes=("synthetic_set",),
    ),
    Stage(
        "ingest",
        "decode a DICOM folder, .npz or the synthetic set into the processed dataset",
        params=("seed", "data", "synthetic", "eval.groups"),
        reads=("source",),
        writes=("dataset", "report:ingest"),
        options=("progress",),
    ),
    Stage(
        "train",
        "fine-tune the teacher into a student and log the run to MLflow",
        params=("seed", "train", "eval.threshold", "eval.calibration", "eval.bootstrap"),
        logged_only=("eval.threshold", "eval.calibration", "eval.bootstrap"),
        reads=("dataset",),
        writes=("model", "report:train"),
        options=("resume", "progress"),
        tracked=True,
    ),
    Stage(
        "advise",
        "probe each teacher's frozen features on the training split and recommend a teacher, "
        "strategy and depth (no training)",
        params=("seed", "train"),
        reads=("dataset",),
        options=("progress",),
        pipeline=False,
        locks=False,
    ),
    Stage(
        "evaluate",
        "val/test metrics, plots and Grad-CAM of the saved student",
        params=("seed", "eval", "serving.coverage"),
        reads=("dataset", "model"),
        writes=("report:evaluate", "evaluate_figures"),
        tracked=True,
    ),
    Stage(
        "robustness",
        "white-box, teacher-transfer and noise attacks; the promotion verdict",
        params=(
            "seed",
            "robustness",
            "gates",
            "eval.threshold",
            "eval.calibration",
            "eval.bootstrap",
            "eval.groups",
            "eval.min_group_size",
        ),
        reads=("dataset", "model"),
        writes=("report:robustness", "robustness_figures"),
        options=("progress",),
        tracked=True,
    ),
    Stage(
        "register",
        "register the trained student in the MLflow registry; move the alias if it earns it",
        params=("registry", "gates"),
        reads=("report:train", "report:evaluate", "report:robustness", "group_figures"),
        writes=("report:register",),
        tracked=True,
    ),
    Stage(
        "package",
        "build and export the Bento of the approved registry version",
        params=("serving",),
        reads=("dataset", "report:register"),
        writes=("bentos", "serving_profile", "report:package"),
        # the Bento: the service, its recipe and its pinned requirements
        extra_modules=("serving.service",),
        extra_files=(
            "serving/__init__.py",
            "serving/args.py",
            "serving/dicom_capture.py",
            "serving/dicom_output.py",
            "serving/dicom_report.py",
            "serving/limits.py",
            "serving/metrics.py",
            "serving/operations.py",
            "serving/pacs.py",
            "serving/replies.py",
            "serving/service.py",
            "serving/uploads.py",
            "serving/bentofile.yaml",
            "serving/requirements.txt",
        ),
    ),
    Stage(
        "monitor",
        "compare the service's recent requests with the training profile (drift report; "
        "exit status 1 when drift is found)",
        params=("serving.monitor_store", "monitor"),
        reads=("serving_profile", "requests"),
        writes=("report:monitor",),
        pipeline=False,
        locks=False,
        tracked=True,
    ),
)
BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGES}
PIPELINE: tuple[Stage, ...] = tuple(stage for stage in STAGES if stage.pipeline)


def stage(name: str) -> Stage:
    """The row of stage ``name``.

    Raises:
        KeyError: no such stage; the message lists the stages.
    """
    if name not in BY_NAME:
        raise KeyError(f"unknown stage {name!r}; the stages are {tuple(BY_NAME)}")
    return BY_NAME[name]
