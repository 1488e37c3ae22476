"""The student the register stage is asked to register: what the stage reports say about it.

:func:`gather_candidate` reads and checks the train, metrics, robustness and ingest reports and
the saved student, and returns a :class:`tasks.registry.promotion.Candidate` (run id, dataset
version, spec, metrics, verdict, ingest counts, weights digest) and the loaded model; a missing
or malformed report, or a verdict that judged another training run, is refused here, before
anything exists in the registry.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tasks import reports
from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.registry.mlflow_registry import weights_digest
from tasks.registry.promotion import Candidate


def with_run_source(ingest: dict[str, Any], source: dict[str, str]) -> dict[str, Any]:
    """The ingest report's counts for the model card, with its source replaced by the training
    run's own record: the report describes the latest ingestion, which need not be the data
    this student was trained on."""
    counts = {k: v for k, v in ingest.items() if k not in ("source_kind", "source")}
    if not source:
        return counts
    return {
        **counts,
        "source_kind": source.get("dataset.source_kind", ""),
        "source": source.get("dataset.source", ""),
    }


def gather_candidate(params: Params) -> tuple[Candidate, Any]:
    """Read and check the reports of the student to register; returns it and the saved model.

    Raises:
        MedtransferError: a missing or malformed report, or a saved student that is not the
            one the training run logged.
    """
    from tasks.model.student_io import load_student

    train = reports.TRAIN.read(params.reports_dir)
    if not train.get("run_id"):
        raise MedtransferError(
            f"{reports.TRAIN.path(params.reports_dir)} names no MLflow run (was training run "
            "with MLflow logging?). Re-run `medtransfer train`."
        )
    metrics = reports.METRICS.read(params.reports_dir)
    if not isinstance(metrics.get("test"), dict) or "threshold" not in metrics:
        raise MedtransferError(
            f"{reports.METRICS.path(params.reports_dir)} has no test metrics or threshold; "
            "re-run `medtransfer evaluate`."
        )
    robustness = reports.ROBUSTNESS.read_if_present(params.reports_dir)
    if robustness is not None and not isinstance(robustness.get("verdict"), dict):
        raise MedtransferError(
            f"{reports.ROBUSTNESS.path(params.reports_dir)} has no verdict; re-run the "
            "robustness check."
        )
    check_verdict_is_for(robustness, str(train["run_id"]), params.reports_dir)
    saved, spec = load_student(params.train.model_dir)
    candidate = Candidate(
        run_id=str(train["run_id"]),
        dataset_version=str(train.get("dataset_version") or ""),
        spec={**dataclasses.asdict(spec), "classes": list(spec.classes)},
        metrics=metrics,
        robustness=robustness,
        ingest=reports.INGEST.read_if_present(params.reports_dir) or {},
        selection=train.get("auto"),
        weights_sha256=weights_digest(saved),
        groups=_group_rows(params.reports_dir),
    )
    return candidate, saved


def _group_rows(reports_dir: str) -> list[dict[str, Any]]:
    """The evaluate stage's test figures per group (its plot data), or none when absent."""
    import json

    from tasks.evaluation.plot_data import GROUPS

    path = reports.plot_path(reports_dir, GROUPS)
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as err:
        raise MedtransferError(
            f"{path} is not valid JSON rows; re-run `medtransfer evaluate`."
        ) from err


def check_verdict_is_for(robustness: dict[str, Any] | None, run_id: str, reports_dir: str) -> None:
    """Refuse a robustness verdict that judged another training run than ``run_id`` (or names
    none): tagged on this version, it would vouch for a model it never attacked."""
    if robustness is None:
        return  # no verdict: registered as unchecked, never promoted
    judged = robustness.get("run_id")
    if judged != run_id:
        raise MedtransferError(
            f"{reports.ROBUSTNESS.path(reports_dir)} judged training run "
            f"{judged or '(none named)'}, not run {run_id} of train.json; re-run "
            "`medtransfer robustness` for this student, then register."
        )
