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

from tasks.config import Params
from tasks.registry.candidate import gather_candidate, with_run_source
from tasks.registry.mlflow_registry import (
    check_run,
    current_champion,
    existing_version,
    run_dataset_source,
)
from tasks.registry.promotion import RegisterResult, promotion_decision, version_tags
from tasks.registry.registration import already_registered, log_decision, register_version
from tasks.stages.preflight import check_stage_outputs


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
        return already_registered(client, config, candidate, champion, found, params.reports_dir)
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

    result = register_version(
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
    log_decision(result, champion)
    return report
