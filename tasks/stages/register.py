"""The register stage: the trained student becomes a new version of the MLflow registered model.

``medtransfer register`` reads the stage reports (train: the MLflow run and dataset version;
metrics: test AUC and threshold; robustness: the gate verdict; ingest: counts), registers the
run's logged model as a new version tagged with what it is and how it did, attaches a model
card, and moves the alias (``registry.alias``, default ``champion``) to it only when it deserves
it (see :func:`tasks.registry.promotion.promotion_decision`). The outcome is the register report.

One version per model: a training run the registered model already holds, or a student whose
weights equal an existing version's (its ``weights_sha256`` tag), returns that version and
makes none; a robustness verdict that judged another training run is refused.

Registration is all or nothing: everything that can be checked is checked before the version
exists, and a failure after that (the register report's write included) deletes the version
again (and the registered model, if this call created it) and puts the previous report back, so
the registry never holds a half-registered version, nor one that the next run registers again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from tasks import reports
from tasks.config import Params, RegistryParams
from tasks.errors import MedtransferError
from tasks.registry.mlflow_registry import (
    check_run,
    current_champion,
    description,
    ensure_registered_model,
    existing_version,
    roll_back,
    run_dataset_source,
    weights_digest,
)
from tasks.registry.model_card import CardInputs, render_model_card
from tasks.registry.promotion import (
    Candidate,
    Champion,
    RegisterResult,
    promotion_decision,
    version_tags,
)
from tasks.stages.preflight import check_stage_outputs

logger = logging.getLogger(__name__)


def run_register(params: Params) -> dict:
    """Register the trained student; move the alias if it earns it.

    Returns:
        The content of the register report (:data:`tasks.reports.REGISTER`).

    Raises:
        MedtransferError: a missing or malformed report, a training run that is not in the
            tracking store, or a saved student that is not the model the run logged.
    """
    check_stage_outputs("register", params)
    from mlflow import MlflowClient

    from tasks.tracking.configure import configure_mlflow

    config = params.registry
    candidate, saved = gather_candidate(params)
    configure_mlflow(params)
    client = MlflowClient()
    model_uri = check_run(client, candidate, saved)
    source = run_dataset_source(client, candidate.run_id)
    candidate = dataclasses.replace(candidate, ingest=with_run_source(candidate.ingest, source))
    champion = current_champion(client, config)
    found = existing_version(client, config.model_name, candidate.run_id, candidate.weights_sha256)
    if found is not None:
        return _already_registered(client, config, candidate, champion, found, params.reports_dir)
    promoted, reasons = promotion_decision(candidate, champion)
    tags = version_tags(candidate, promoted, reasons)

    def result_for(version: str, card_uri: str) -> RegisterResult:
        return RegisterResult(
            model_name=config.model_name,
            version=version,
            alias=config.alias,
            alias_moved=promoted,
            champion_version=version if promoted else (champion.version if champion else None),
            previous_champion=champion.version if champion else None,
            reasons=reasons,
            dataset_version=candidate.dataset_version,
            test_auc=candidate.test_auc,
            robustness_passed=candidate.robustness_passed,
            run_id=candidate.run_id,
            model_card=card_uri,
            tags=tags,
        )

    result = _register_version(
        client,
        config,
        model_uri,
        candidate,
        promoted,
        reasons,
        tags,
        params.reports_dir,
        result_for,
    )
    report = dataclasses.asdict(result)
    _log_decision(result, champion)
    return report


# The training run's tag naming its registry version, ``<model name>/<version>``.
RUN_VERSION_TAG = "registry.version"


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
    _check_verdict_is_for(robustness, str(train["run_id"]), params.reports_dir)
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
    )
    return candidate, saved


def _check_verdict_is_for(robustness: dict[str, Any] | None, run_id: str, reports_dir: str) -> None:
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


def _already_registered(
    client,
    config: RegistryParams,
    candidate: Candidate,
    champion: Champion | None,
    found: tuple[str, str],
    reports_dir: str,
) -> dict:
    """The register report for a student the registry already holds as version ``found[0]``
    (same training run or identical weights, ``found[1]``): that version is returned, no new
    one is made and the alias stays where it is."""
    version, why = found
    existing = client.get_model_version(config.model_name, version)
    champion_version = champion.version if champion else None
    result = RegisterResult(
        model_name=config.model_name,
        version=version,
        alias=config.alias,
        alias_moved=False,
        champion_version=champion_version,
        previous_champion=champion_version,
        reasons=[f"already registered as version {version} ({why}): no new version"],
        dataset_version=candidate.dataset_version,
        test_auc=candidate.test_auc,
        robustness_passed=candidate.robustness_passed,
        run_id=candidate.run_id,
        model_card=existing.tags.get("model_card", ""),
        tags=dict(existing.tags),
        already_registered=True,
    )
    reports.REGISTER.write(reports_dir, dataclasses.asdict(result))
    logger.info(
        "register: %s version %s already holds this student (%s); no new version",
        config.model_name,
        version,
        why,
    )
    return dataclasses.asdict(result)


def _register_version(
    client,
    config: RegistryParams,
    model_uri: str,
    candidate: Candidate,
    promoted: bool,
    reasons: list[str],
    tags: dict[str, str],
    reports_dir: str,
    result_for: Callable[[str, str], RegisterResult],
) -> RegisterResult:
    """Create the version, attach its model card, write the register report (``result_for``
    the version and the card's URI), move the alias last; all or nothing.

    The report is written inside: a version whose report could not be written would stay in
    the registry under a failed stage, and the next run would register the same student again.

    Returns:
        The result, as written to the report.
    """
    import mlflow

    created_model = ensure_registered_model(client, config.model_name)
    version = None
    previous_report = _current_report(reports_dir)
    previous_tag = client.get_run(candidate.run_id).data.tags.get(RUN_VERSION_TAG)
    written = False
    try:
        registered = mlflow.register_model(model_uri, config.model_name, tags=tags)
        version = str(registered.version)
        card_uri = _attach_model_card(client, config, version, candidate, promoted, reasons)
        client.set_tag(candidate.run_id, RUN_VERSION_TAG, f"{config.model_name}/{version}")
        result = result_for(version, card_uri)
        reports.REGISTER.write(reports_dir, dataclasses.asdict(result))
        written = True
        if promoted:  # last: until here the alias still points at the previous holder
            client.set_registered_model_alias(config.model_name, config.alias, version)
    except BaseException:
        roll_back(client, config.model_name, version, created_model)
        if version is not None:  # the run must not name the version just removed
            _restore_run_tag(client, candidate.run_id, previous_tag)
        if written:  # it describes the version just removed: the previous one is true again
            _restore_report(reports_dir, previous_report)
        raise
    return result


def _attach_model_card(
    client,
    config: RegistryParams,
    version: str,
    candidate: Candidate,
    promoted: bool,
    reasons: list[str],
) -> str:
    """Render the version's model card, log it on the training run and make it the version's
    description and ``model_card`` tag; returns the card's URI."""
    card = render_model_card(
        CardInputs(
            model_name=config.model_name,
            version=version,
            run_id=candidate.run_id,
            spec=candidate.spec,
            dataset_version=candidate.dataset_version,
            ingest=candidate.ingest,
            metrics=candidate.metrics,
            robustness=candidate.robustness,
            promoted=promoted,
            alias=config.alias,
            reasons=reasons,
            selection=candidate.selection,
        )
    )
    card_path = f"model_card/{config.model_name}-v{version}.md"
    client.log_text(candidate.run_id, card, card_path)
    card_uri = f"runs:/{candidate.run_id}/{card_path}"
    client.update_model_version(config.model_name, version, description=description(card, card_uri))
    client.set_model_version_tag(config.model_name, version, "model_card", card_uri)
    return card_uri


def _restore_run_tag(client, run_id: str, previous: str | None) -> None:
    """Put the run's :data:`RUN_VERSION_TAG` back as it was (best effort, like the rollback)."""
    try:
        if previous is None:
            client.delete_tag(run_id, RUN_VERSION_TAG)
        else:
            client.set_tag(run_id, RUN_VERSION_TAG, previous)
    except Exception:  # no tag to delete, or the store is down: the original error says more
        pass


def _current_report(reports_dir: str) -> dict[str, Any] | None:
    """The register report as it is, to put back if this registration fails; None when there
    is none or it is broken (a broken one is not worth restoring)."""
    try:
        return reports.REGISTER.read_if_present(reports_dir)
    except MedtransferError:
        return None


def _restore_report(reports_dir: str, previous: dict[str, Any] | None) -> None:
    """Put the register report back as it was before this call (best effort, like the rollback:
    the original error wins)."""
    try:
        if previous is None:
            reports.REGISTER.path(reports_dir).unlink(missing_ok=True)
        else:
            reports.REGISTER.write(reports_dir, previous)
    except OSError:
        pass


def _log_decision(result: RegisterResult, champion: Champion | None) -> None:
    if result.alias_moved:
        logger.info(
            "register: %s version %s; alias %r moved to it: %s",
            result.model_name,
            result.version,
            result.alias,
            "; ".join(result.reasons),
        )
    else:
        logger.info(
            "register: %s version %s; alias %r stays on version %s: %s",
            result.model_name,
            result.version,
            result.alias,
            champion.version if champion else None,
            "; ".join(result.reasons),
        )
