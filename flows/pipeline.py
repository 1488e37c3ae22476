"""The medtransfer Prefect flow: it reads like the table of contents of the work.

Each stage is the function in ``tasks/`` wrapped as a Prefect task (one per pipeline stage of
:mod:`tasks.stages.table`, checked by a test); nothing is re-implemented here. Run it with ``medtransfer run`` or ``python -m flows.pipeline``.

Caching: every stage task carries a cache key built from its inputs, parameters and code
(``flows.cache``), so a re-run with nothing changed decodes and trains nothing; Prefect
logs those tasks as ``Cached`` and the run summary lists them. A stage whose output files are
missing is recomputed whatever its key. After a crash, the finished stages are cache hits and
training resumes from its last epoch checkpoint.

I/O faults: a stage's OSError is retried when a retry can help (a busy share, a timeout); one
that describes the storage as it is (a file in place of a folder, a read-only or full disk) is
not. Either way an OSError left over fails the flow with a :class:`StageIOError`: one line
naming the stage, the path and what to do, which ``medtransfer run`` prints without a traceback.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.artifacts import publish
from flows.cache import outputs_present, recorded_result, stage_key
from flows.dvc_book import DvcBook, project_book
from flows.fanout import flow_task_runner, task_runner_decode_map
from flows.progress import PrefectProgressRecorder
from flows.summary import summary_lines
from tasks.config import Params, load_params
from tasks.data import synthetic
from tasks.errors import PERSISTENT_ERRNOS, MedtransferError, stage_io_error
from tasks.stages.evaluate import run_evaluate
from tasks.stages.ingest import run_ingest
from tasks.stages.package import run_package
from tasks.stages.register import run_register
from tasks.stages.robustness import run_robustness
from tasks.stages.synthesize import run_synthesize
from tasks.stages.table import PIPELINE
from tasks.stages.train import run_train
from tasks.training.recorders import quiet_bars


def _key(stage: str) -> Callable:
    def cache_key(context, parameters: dict) -> str:
        return stage_key(stage, parameters["params"])

    return cache_key


def is_transient_io_error(task, task_run, state) -> bool:
    """Retry I/O hiccups (a busy network share, a locked file); never a user error, nor an
    OSError that a retry would only meet again (:data:`PERSISTENT_ERRNOS`)."""
    error = state.result(raise_on_failure=False)
    return (
        isinstance(error, OSError)
        and not isinstance(error, MedtransferError)
        and error.errno not in PERSISTENT_ERRNOS
    )


STAGE_OPTIONS = {
    "persist_result": True,
    "retries": 2,
    "retry_delay_seconds": 2,
    "retry_condition_fn": is_transient_io_error,
}


def stage_task(name: str) -> Callable:
    """Wrap a stage's function as the Prefect task of stage ``name`` of the stage table: named
    after it, cached under its key (:func:`flows.cache.stage_key`), retried on I/O hiccups."""
    if name not in {stage.name for stage in PIPELINE}:
        raise KeyError(f"{name!r} is not a pipeline stage of tasks.stages.table")
    return task(name=name, cache_key_fn=_key(name), **STAGE_OPTIONS)


@stage_task("synthesize")
def synthesize(params: Params) -> dict:
    """Write the built-in synthetic DICOM set and its labels; returns where they are."""
    return run_synthesize(params)


@stage_task("ingest")
def ingest(params: Params, progress: bool = True) -> dict:
    """Decode the configured source into the processed dataset; returns the ingest report.

    The files are decoded by ``decode-files`` tasks on ``orchestration.task_runner``.
    ``progress``: a bar over the files on stderr (not part of the cache key).
    """
    return run_ingest(params, progress, decode_map=task_runner_decode_map(params)).to_report()


@stage_task("train")
def train(params: Params, resume: bool = True, progress: bool = True) -> dict:
    """Fine-tune the teacher into a student, logged to MLflow; returns the train report.

    The epochs' progress shows as a progress artifact (:mod:`flows.progress`).

    ``resume``: continue from this configuration's last epoch checkpoint when there is one
    (after a crash), otherwise start fresh. ``progress``: a bar over the epochs on stderr.
    """
    return run_train(
        params, progress=progress, resume=resume, recorders=[PrefectProgressRecorder()]
    )


@stage_task("evaluate")
def evaluate(params: Params) -> dict:
    """Val/test metrics, plots and Grad-CAM of the saved student; returns the metrics report."""
    return run_evaluate(params)


@stage_task("robustness")
def robustness(params: Params, progress: bool = True) -> dict:
    """Attacks on the student and its frozen teacher; returns the report with the verdict.
    ``progress``: a bar per attacked model over its budgets on stderr."""
    return run_robustness(params, progress)


@stage_task("register")
def register(params: Params) -> dict:
    """A new registry version; the alias moves only if the version earns it."""
    return run_register(params)


@stage_task("package")
def package(params: Params) -> dict:
    """The approved version as a Bento, exported as an archive."""
    return run_package(params)


def run_stage(
    prefect_task,
    stage: str,
    params: Params,
    cached: list[str],
    book: DvcBook | None = None,
    **kwargs,
) -> dict:
    """Run one stage task, recomputing it when its outputs are gone; note cache hits.

    With ``book`` (the flow runs the configuration dvc.yaml describes, :mod:`flows.dvc_book`),
    a stage DVC reports unchanged is a cache hit read from its report, and a stage that ran is
    recorded in ``dvc.lock``.

    Raises:
        StageIOError: the stage's I/O failed for good (an OSError left after the retries).
    """
    refresh = not outputs_present(stage, params)
    if book is not None and not refresh and book.up_to_date(stage):
        cached.append(stage)
        get_run_logger().info("%s: cache hit (dvc.lock matches its inputs and outputs)", stage)
        return recorded_result(stage, params)
    result = _run_task(prefect_task, stage, params, cached, refresh, **kwargs)
    if book is not None:
        book.record(stage)
    return result


def _run_task(
    prefect_task, stage: str, params: Params, cached: list[str], refresh: bool, **kwargs
) -> dict:
    """Run the Prefect task of ``stage``; a failure raises, a cache hit is noted."""
    state = prefect_task.with_options(refresh_cache=refresh)(params, return_state=True, **kwargs)
    try:
        result = state.result()  # a failed stage raises here and fails the flow with its message
    except MedtransferError:  # already says what to do, even if it were an OSError too
        raise
    except OSError as err:
        raise stage_io_error(stage, err, retries=STAGE_OPTIONS["retries"]) from err
    if state.name == "Cached":
        cached.append(stage)
        get_run_logger().info(
            "%s: cache hit (inputs, parameters and code unchanged), nothing recomputed", stage
        )
    return result


@flow(name="medtransfer", log_prints=True)
def medtransfer_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, progress: bool = True
) -> dict:
    """Run every stage on the configuration in ``params_file`` with ``overrides`` applied;
    ``progress=False`` (``medtransfer run --quiet``): no progress bar, ours or a library's.

    Returns:
        A summary dictionary with one entry per stage, plus ``cached``: the stages that were
        cache hits.
    """
    params = load_params(params_file, overrides or [])
    book = project_book(params_file, overrides or [])
    cached: list[str] = []
    summary: dict = {}
    with contextlib.nullcontext() if progress else quiet_bars():
        if uses_synthetic_set(params):
            summary["synthesize"] = run_stage(synthesize, "synthesize", params, cached, book)
        summary["ingest"] = run_stage(ingest, "ingest", params, cached, book, progress=progress)
        summary["train"] = run_stage(train, "train", params, cached, book, progress=progress)
        summary["evaluate"] = run_stage(evaluate, "evaluate", params, cached, book)
        summary["robustness"] = run_stage(
            robustness, "robustness", params, cached, book, progress=progress
        )
        summary["register"] = run_stage(register, "register", params, cached, book)
        # With no approved version, package records "nothing approved" and builds nothing.
        summary["package"] = run_stage(package, "package", params, cached, book)
    summary["cached"] = cached
    publish(summary, effective_tracking_uri(params))
    create_markdown_artifact(
        key="medtransfer-summary",
        markdown=summary_markdown(summary, params),
        description="What this medtransfer run produced",
    )
    return summary


def effective_tracking_uri(params: Params) -> str:
    """The MLflow store the stages log to: ``MLFLOW_TRACKING_URI`` wins over params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.mlflow.tracking_uri


def run_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None, progress: bool = True
) -> dict:
    """Run :func:`medtransfer_pipeline` on the task runner ``orchestration.task_runner`` names
    (``data.workers`` wide), where its ingest maps the decoding; returns the flow's summary."""
    params = load_params(params_file, overrides or [])
    runner = flow_task_runner(params)
    return medtransfer_pipeline.with_options(task_runner=runner)(
        params_file=params_file, overrides=overrides, progress=progress
    )


def uses_synthetic_set(params: Params) -> bool:
    """Whether ``data.source`` is the built-in synthetic set (the shorthand or its folder)."""
    recipe = synthetic.SyntheticConfig.from_params(params)
    return synthetic.is_synthetic_source(params.data.source, recipe)


def summary_markdown(summary: dict, params: Params) -> str:
    """The run summary shown as a Prefect artifact: the same lines ``medtransfer run`` prints."""
    lines = summary_lines(summary, params.mlflow.tracking_uri)
    return "# medtransfer run\n\n" + "\n".join(f"- {line.strip()}" for line in lines) + "\n"


if __name__ == "__main__":
    run_pipeline()
