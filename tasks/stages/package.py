"""The package stage: the approved registry version becomes a Bento, exported as an archive.

``medtransfer package`` takes the version carrying ``registry.alias`` (or
``-S registry.version=N``), rebuilds the student from its MLflow model, saves it into BentoML's
model store, builds the Bento from ``serving/bentofile.yaml`` and exports
``<serving.export_dir>/<bento_name>-<version>.tar.gz`` (``bentoml import`` reads it).

BentoML's store is ``serving.bentoml_home`` inside the project unless ``BENTOML_HOME`` is set.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tasks import reports
from tasks.config import Params, ServingParams
from tasks.model.findings import check_findings
from tasks.registry.bento import (
    PackageResult,
    approval,
    bentoml_home,
    build_bento,
    export_bento,
    find_version,
    import_model,
    parse_threshold,
    resolve_version,
    student_from_version,
)
from tasks.registry.conformal_fit import fit_conformal, mlflow_metrics
from tasks.registry.profile_fit import fit_profile
from tasks.stages.preflight import check_stage_outputs

# Under reports_dir: the serving profile the drift monitor compares requests with.
SERVING_PROFILE_DIR = "serving_profile"

logger = logging.getLogger(__name__)


def run_package(params: Params) -> dict:
    """Build and export the Bento of the approved (or chosen) registry version.

    Returns:
        The content of the package report (:data:`tasks.reports.PACKAGE`): the version, the
        BentoML model and Bento tags, the archive's path; or, when no version carries the
        alias and none was chosen, ``built: false`` with why and the command that builds the
        latest version anyway (:func:`nothing_approved`): a gate saying no is an outcome, not
        an error, so ``dvc repro`` ends green. Also the
        served prediction sets' rule with their test coverage (``conformal``).

    Raises:
        MedtransferError: no such version, a version not registered by medtransfer, or weights
            that do not fit the version's architecture.
    """
    check_stage_outputs("package", params)
    from mlflow import MlflowClient

    from tasks.tracking.configure import configure_mlflow

    configure_mlflow(params)
    client = MlflowClient()
    version = find_version(client, params.registry)
    if version is None and params.registry.version is None:
        return nothing_approved(params)
    if version is None:
        version = resolve_version(client, params.registry)  # refuses in one line
    report = _build_and_export(params, version)
    _log_conformal(version, report["conformal"])
    logger.info(
        "package: Bento %s of %s version %s, archive %s",
        report["bento"],
        version.name,
        version.version,
        report["archive"],
    )
    return report


def _build_and_export(params: Params, version) -> dict:
    """Fit the serving profile and the prediction sets' rule for the registry ``version``,
    import the student into BentoML's store, build and export the Bento; write and return the
    package report (see :func:`run_package`) and the drift monitor's reference profile."""
    serving = params.serving
    model, spec = student_from_version(version)
    home = bentoml_home(serving)  # sets BENTOML_HOME: before any BentoML call
    threshold = parse_threshold(version.tags.get("threshold"))
    dataset_version = version.tags.get("dataset_version", "")
    approved, approval_text = approval(version, params.registry.alias)
    if not approved:
        logger.warning("package: %s", approval_text)
    logger.info("package: fitting the serving profile (scope, OOD detector) on the training data")
    profile = fit_profile(model, spec, params)
    sets_rule, conformal, kind_args = _sets_or_findings(model, spec, params, profile, version)
    logger.info("package: saving the student into BentoML's model store")
    model_tag = _import_student(model, spec, version, threshold, dataset_version, profile, approved)
    args = _service_arguments(serving, version, spec, model_tag, threshold, dataset_version)
    args.update(
        multiframe=profile.multiframe,
        scope=profile.scope,
        ood_threshold=profile.ood["threshold"],
        approved=approved,
        approval=approval_text,
        coverage=sets_rule.coverage,
        conformal_threshold=sets_rule.threshold,
        **kind_args,
    )
    logger.info("package: building and exporting the Bento")
    bento = build_bento(serving, args, version)
    archive = export_bento(bento, serving)
    result = PackageResult(
        model_name=version.name,
        model_version=str(version.version),
        dataset_version=dataset_version,
        bento_model=model_tag,
        bento=str(bento.tag),
        archive=str(archive),
        bentoml_home=str(home),
        threshold=threshold,
        batching=serving.batching,
    )
    report = {"built": True, **dataclasses.asdict(result), "approved": approved}
    report.update(approval=approval_text, profile=_profile_summary(profile), conformal=conformal)
    reports.PACKAGE.write(params.reports_dir, report)
    # The drift monitor's reference: the profile without the detector's arrays.
    profile.save(_profile_dir(params))
    return report


def _sets_or_findings(model, spec, params: Params, profile, version) -> tuple[Any, dict, dict]:
    """The prediction sets' rule and report block (:func:`fit_conformal`) of a single-label
    student, and no extra service arguments; for a multi-label one no sets (they are defined
    on one class per image), and the arguments ``label_kind`` and ``thresholds`` (each
    finding's, from the version's ``thresholds`` tag), checked against its findings."""
    if spec.label_kind == "single-label":
        return (*fit_conformal(model, spec, params, profile.detector), {})
    thresholds = json.loads(version.tags.get("thresholds") or "null")
    check_findings(spec.classes, spec.classes, thresholds)
    no_sets = SimpleNamespace(coverage=None, threshold=None)
    block = {"not_measured": "prediction sets are defined on one class per image"}
    return no_sets, block, {"label_kind": spec.label_kind, "thresholds": thresholds}


def nothing_approved(params: Params) -> dict:
    """Write and return the package report of a run with no approved version: nothing built,
    which version the registry holds, the gates that stopped it and the command that builds it
    anyway. The Bento folder and the serving profile are left as they are (created empty when
    missing: they are the stage's DVC outputs)."""
    registry = params.registry
    registered = reports.REGISTER.read_if_present(params.reports_dir) or {}
    version = registered.get("version")
    stopped_by = list(registered.get("reasons") or [])
    report = {
        "built": False,
        "bento": None,
        "archive": None,
        "model_name": registry.model_name,
        "model_version": None,
        "reason": f"nothing approved: no version of {registry.model_name!r} carries the alias "
        f"{registry.alias!r}",
        "latest_version": version,
        "stopped_by": stopped_by,
        "next": (
            f"medtransfer package -S registry.version={version}"
            if version
            else "medtransfer register"
        ),
    }
    Path(params.serving.export_dir).mkdir(parents=True, exist_ok=True)
    _profile_dir(params)
    reports.PACKAGE.write(params.reports_dir, report)
    logger.info("package: %s; nothing built", report["reason"])
    return report


def _log_conformal(version, conformal: dict) -> None:
    """The served sets' test coverage on the registry version's training run, beside the
    evaluate stage's own (``package_conformal_*``: what the Bento serves)."""
    if not version.run_id:
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    if "test" not in conformal:  # not measured (multi-label)
        return
    for key, value in mlflow_metrics(conformal).items():
        client.log_metric(version.run_id, key, value)


def _profile_summary(profile) -> dict[str, Any]:
    """What the package report says about the recorded profile (no arrays)."""
    return {
        "scope": profile.scope,
        "multiframe": profile.multiframe,
        "n_train": profile.n_train,
        "n_val": profile.n_val,
        "ood": profile.ood,
    }


def _profile_dir(params: Params):
    """Where ``profile.json`` (and ``ood.npz``) are kept for ``medtransfer monitor``."""
    folder = Path(params.reports_dir) / SERVING_PROFILE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _import_student(
    model, spec, version, threshold: float | None, dataset_version: str, profile, approved: bool
) -> str:
    """Save the student and its data profile into BentoML's model store with its provenance;
    returns the tag."""
    return import_model(
        model,
        spec,
        version,
        labels={
            "registry_version": str(version.version),
            "dataset_version": dataset_version[:63],
            "teacher": spec.teacher,
            "strategy": spec.strategy,
            "approved": "true" if approved else "false",
        },
        metadata={
            "registered_model": version.name,
            "registry_version": str(version.version),
            "run_id": version.run_id or "",
            "dataset_version": dataset_version,
            "threshold": threshold,
            "classes": list(spec.classes),
            "image_size": spec.image_size,
            "ood_method": profile.ood["method"],
            "ood_threshold": profile.ood["threshold"],
            "multiframe": profile.multiframe,
            "label_kind": spec.label_kind,
        },
        profile=profile,
    )


def _service_arguments(
    serving: ServingParams,
    version,
    spec,
    model_tag: str,
    threshold: float | None,
    dataset_version: str,
) -> dict[str, Any]:
    """The Bento's arguments (``serving/service.py:ServingArgs``)."""
    return {
        "model_tag": model_tag,
        "model_name": version.name,
        "model_version": str(version.version),
        "dataset_version": dataset_version,
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "channels": spec.channels,
        "threshold": threshold,
        "max_upload_bytes": serving.max_upload_bytes,
        "max_batch_files": serving.max_batch_files,
        "max_image_dim": serving.max_image_dim,
        "max_decoded_mib": serving.max_decoded_mib,
        "max_concurrent_decodes": serving.max_concurrent_decodes,
        "request_timeout_s": serving.request_timeout_s,
        "batching": serving.batching,
        "max_batch_size": serving.max_batch_size,
        "max_latency_ms": serving.max_latency_ms,
        "model_threads": serving.model_threads,
        "ood_gate": serving.ood_gate,
        # Absolute: `bentoml serve` runs the service inside the Bento's own folder.
        "monitor_store": str(Path(serving.monitor_store).resolve()),
        "monitor_max_records": serving.monitor_max_records,
        "pacs": dataclasses.asdict(serving.pacs),
    }
