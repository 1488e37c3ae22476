"""Writing a version into the MLflow registry, all or nothing (the register stage's write side).

:func:`register_version` creates the version, attaches its model card, names it on the training
run (:data:`RUN_VERSION_TAG`), writes the register report and moves the alias last; any failure
on the way deletes the version again (and the registered model, if this call created it) and
puts the run's tag and the previous report back. :func:`already_registered` is the report for a
student the registry already holds; :func:`log_decision` says where the alias went and why.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from tasks import reports
from tasks.config import RegistryParams
from tasks.errors import MedtransferError
from tasks.registry.mlflow_registry import description, ensure_registered_model, roll_back
from tasks.registry.model_card import CardInputs, render_model_card
from tasks.registry.promotion import Candidate, Champion, RegisterResult

logger = logging.getLogger(__name__)

# The training run's tag naming its registry version, ``<model name>/<version>``.
RUN_VERSION_TAG = "registry.version"


def already_registered(
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


def register_version(
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
        registered = _register_quietly(mlflow, model_uri, config.model_name, tags)
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


def _register_quietly(mlflow, model_uri: str, name: str, tags: dict[str, str]):
    """``mlflow.register_model`` without its lines on stderr: "Registered model '<name>'
    already exists. Creating a new version of this model..." appeared on every fresh clone
    (ensure_registered_model creates the model first, with its description), then "Created
    version 'N'". The stage's own log line says which version it registered and why."""
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM  # what MLflow's eprint writes to
    was_enabled = stream.enabled
    stream.enabled = False
    try:
        return mlflow.register_model(model_uri, name, tags=tags)
    finally:
        stream.enabled = was_enabled


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
            groups=candidate.groups,
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


def log_decision(result: RegisterResult, champion: Champion | None) -> None:
    """Log the version registered and whether the alias moved to it, with the reasons."""
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
