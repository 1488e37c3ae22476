"""Registry stage: the trained student becomes a new version of the MLflow registered model.

``medtransfer register`` reads the stage reports (``train.json``: the MLflow run and dataset
version; ``metrics.json``: test AUC and threshold; ``robustness.json``: the gate verdict;
``ingest.json``: counts), registers the run's logged model as a new version tagged with what it
is and how it did, attaches a model card, and moves the alias (``registry.alias``, default
``champion``) to it only when it deserves it (see :func:`promotion_decision`). The outcome is
written to ``reports/register.json``.

Registration is all or nothing: everything that can be checked is checked before the version
exists, and a failure after that deletes the version again (and the registered model, if this
call created it), so the registry never holds a half-registered version.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import checked_section
from tasks.errors import MedtransferError
from tasks.registry.model_card import CardInputs, render_model_card

REGISTER_REPORT = "register.json"
MAX_DESCRIPTION = 5000  # the SQL registry's description column holds 5000 characters
MAX_TAG_VALUE = 5000


@dataclass(frozen=True)
class RegistryConfig:
    """The ``registry`` section of params.yaml."""

    model_name: str = "medtransfer-student"
    alias: str = "champion"
    version: int | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RegistryConfig:
        section = checked_section(params, "registry", cls.__dataclass_fields__)
        version = section.get("version")
        if version is not None and (isinstance(version, bool) or not str(version).isdigit()):
            raise MedtransferError(f"registry.version must be a version number, not {version!r}.")
        section["version"] = int(version) if version is not None else None
        return cls(**section)


@dataclass(frozen=True)
class Candidate:
    """The trained student about to be registered, with its reports."""

    run_id: str
    dataset_version: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    robustness: dict[str, Any] | None
    ingest: dict[str, Any]

    @property
    def test_auc(self) -> float:
        return _float((self.metrics.get("test") or {}).get("auc"))

    @property
    def robustness_passed(self) -> bool:
        return bool(self.robustness and (self.robustness.get("verdict") or {}).get("passed"))

    @property
    def robustness_reasons(self) -> list[str]:
        if self.robustness is None:
            return ["no robustness report (run the robustness check before registering)"]
        reasons = (self.robustness.get("verdict") or {}).get("reasons") or []
        return [str(r) for r in reasons]


@dataclass(frozen=True)
class Champion:
    """The version that holds the alias now."""

    version: str
    dataset_version: str
    test_auc: float


@dataclass
class RegisterResult:
    """The content of ``reports/register.json``."""

    model_name: str
    version: str
    alias: str
    alias_moved: bool
    champion_version: str | None
    previous_champion: str | None
    reasons: list[str]
    dataset_version: str
    test_auc: float
    robustness_passed: bool
    run_id: str
    model_card: str
    tags: dict[str, str] = field(default_factory=dict)


def promotion_decision(candidate: Candidate, champion: Champion | None) -> tuple[bool, list[str]]:
    """Whether the alias moves to ``candidate``, and why (one sentence per reason).

    Rules, in order:

    1. A candidate that failed the robustness gates (or has no robustness report) never takes
       the alias; the gate reasons are returned.
    2. A candidate without a finite test AUC never takes it.
    3. With no champion, a passing candidate takes the alias.
    4. A champion evaluated on a *different* dataset version is not comparable by AUC (another
       test set); the passing candidate takes over, because registering a student trained on
       new data says the data moved on. Roll back by pointing the alias at the old version.
    5. On the same dataset version the candidate must have a strictly higher test AUC.
    """
    if not candidate.robustness_passed:
        return False, [f"robustness gates failed: {r}" for r in candidate.robustness_reasons] or [
            "robustness gates failed"
        ]
    auc = candidate.test_auc
    if not math.isfinite(auc):
        return False, ["the test AUC is undefined (the test split has a single class?)"]
    if champion is None:
        return True, ["passed the robustness gates; no version held the alias"]
    if champion.dataset_version != candidate.dataset_version:
        return True, [
            f"passed the robustness gates; the previous holder (version {champion.version}) was "
            f"evaluated on dataset {champion.dataset_version or 'unknown'}, not "
            f"{candidate.dataset_version}: a passing version on the new data takes over"
        ]
    if not math.isfinite(champion.test_auc):
        return True, [
            f"passed the robustness gates; version {champion.version} has no recorded test AUC"
        ]
    if auc > champion.test_auc:
        return True, [
            f"passed the robustness gates; test AUC {auc:.4f} beats version "
            f"{champion.version}'s {champion.test_auc:.4f} on the same dataset"
        ]
    return False, [
        f"test AUC {auc:.4f} does not beat version {champion.version}'s "
        f"{champion.test_auc:.4f} on the same dataset"
    ]


def version_tags(candidate: Candidate, promoted: bool, reasons: list[str]) -> dict[str, str]:
    """The tags of the new version: provenance, metrics, robustness verdict, promotion."""
    spec = candidate.spec
    test = candidate.metrics.get("test") or {}
    val = candidate.metrics.get("val") or {}
    tags = {
        "run_id": candidate.run_id,
        "dataset_version": candidate.dataset_version,
        "teacher": str(spec["teacher"]),
        "teacher_weights_sha256": str(spec["teacher_weights_sha256"]),
        "strategy": str(spec["strategy"]),
        "image_size": str(spec["image_size"]),
        "classes": ",".join(spec["classes"]),
        "student_spec": json.dumps(spec, sort_keys=True),
        "test_auc": _text(test.get("auc")),
        "test_accuracy": _text(test.get("accuracy")),
        "test_sensitivity": _text(test.get("sensitivity")),
        "test_specificity": _text(test.get("specificity")),
        "val_auc": _text(val.get("auc")),
        "threshold": _text(candidate.metrics.get("threshold")),
        "threshold_rule": str(candidate.metrics.get("threshold_rule", "")),
        "robustness_passed": "true" if candidate.robustness_passed else "false",
        "robustness_reasons": "; ".join(candidate.robustness_reasons),
        "promotion": "promoted" if promoted else "not_promoted",
        "promotion_reasons": "; ".join(reasons),
    }
    robust_metrics = (candidate.robustness or {}).get("metrics") or {}
    for key, value in robust_metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            tags[f"robustness.{key}"] = _text(value)
    return {k: v[:MAX_TAG_VALUE] for k, v in tags.items()}


def gather_candidate(params: Mapping[str, Any]) -> tuple[Candidate, Any]:
    """Read and check the reports of the student to register; returns it and the saved model.

    Raises:
        MedtransferError: a missing or malformed report, or a saved student that is not the
            one the training run logged.
    """
    from tasks.model.student_io import load_student

    reports = Path(params.get("reports_dir", "reports"))
    train = _read_json(reports / "train.json", "medtransfer train")
    run_id = train.get("run_id")
    if not run_id:
        raise MedtransferError(
            f"{reports / 'train.json'} names no MLflow run (was training run with MLflow "
            "logging?). Re-run `medtransfer train`."
        )
    metrics = _read_json(reports / "metrics.json", "medtransfer evaluate")
    if not isinstance(metrics.get("test"), dict) or "threshold" not in metrics:
        raise MedtransferError(
            f"{reports / 'metrics.json'} has no test metrics or threshold; re-run "
            "`medtransfer evaluate`."
        )
    robustness_path = reports / "robustness.json"
    robustness = _read_json(robustness_path, "") if robustness_path.is_file() else None
    if robustness is not None and not isinstance(robustness.get("verdict"), dict):
        raise MedtransferError(f"{robustness_path} has no verdict; re-run the robustness check.")
    ingest_path = reports / "ingest.json"
    ingest = _read_json(ingest_path, "") if ingest_path.is_file() else {}
    model_dir = (params.get("train") or {}).get("model_dir", "models/student")
    saved, spec = load_student(model_dir)
    spec_dict = {**asdict(spec), "classes": list(spec.classes)}
    candidate = Candidate(
        run_id=str(run_id),
        dataset_version=str(train.get("dataset_version") or ""),
        spec=spec_dict,
        metrics=metrics,
        robustness=robustness,
        ingest=ingest,
    )
    return candidate, saved


def run_register(params: Mapping[str, Any]) -> dict:
    """The registry stage; returns the content of ``reports/register.json``."""
    import mlflow
    from mlflow import MlflowClient

    from tasks.tracking import configure_mlflow

    config = RegistryConfig.from_params(params)
    candidate, saved = gather_candidate(params)
    configure_mlflow(params)
    client = MlflowClient()
    model_uri = _check_run(client, candidate, saved)

    champion = current_champion(client, config)
    promoted, reasons = promotion_decision(candidate, champion)
    tags = version_tags(candidate, promoted, reasons)

    created_model = _ensure_registered_model(client, config.model_name)
    version = None
    try:
        registered = mlflow.register_model(model_uri, config.model_name, tags=tags)
        version = str(registered.version)
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
            )
        )
        card_path = f"model_card/{config.model_name}-v{version}.md"
        client.log_text(candidate.run_id, card, card_path)
        card_uri = f"runs:/{candidate.run_id}/{card_path}"
        client.update_model_version(
            config.model_name, version, description=_description(card, card_uri)
        )
        client.set_model_version_tag(config.model_name, version, "model_card", card_uri)
        client.set_tag(candidate.run_id, "registry.version", f"{config.model_name}/{version}")
        if promoted:  # last: until here the alias still points at the previous holder
            client.set_registered_model_alias(config.model_name, config.alias, version)
    except BaseException:
        _roll_back(client, config.model_name, version, created_model)
        raise

    result = RegisterResult(
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
    report = asdict(result)
    reports = Path(params.get("reports_dir", "reports"))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / REGISTER_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def current_champion(client, config: RegistryConfig) -> Champion | None:
    """The version holding ``config.alias``, or ``None`` (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(config.model_name, config.alias)
    except MlflowException:
        return None
    return Champion(
        version=str(version.version),
        dataset_version=str(version.tags.get("dataset_version", "")),
        test_auc=_float(version.tags.get("test_auc")),
    )


def _check_run(client, candidate: Candidate, saved) -> str:
    """The run exists, is live, logged a model, and that model is the saved student.

    Returns:
        The URI of the run's logged model named ``model`` (MLflow 3 keeps it as a LoggedModel,
        ``models:/<model id>``; ``runs:/<run>/model`` for older stores).
    """
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(candidate.run_id)
    except MlflowException as err:
        raise MedtransferError(
            f"MLflow run {candidate.run_id} (from train.json) is not in the tracking store "
            f"{mlflow.get_tracking_uri()}. Check MLFLOW_TRACKING_URI / mlflow.tracking_uri."
        ) from err
    if run.info.lifecycle_stage != "active":
        raise MedtransferError(f"MLflow run {candidate.run_id} is deleted; re-run training.")
    model_uri = _logged_model_uri(client, run)
    try:
        logged = mlflow.pytorch.load_model(model_uri, map_location="cpu")
    except Exception as err:  # MLflow raises several types for a missing or broken model
        raise MedtransferError(
            f"MLflow run {candidate.run_id} has no loadable model named 'model' "
            f"({type(err).__name__}). Re-run `medtransfer train`."
        ) from err
    logged_state, saved_state = logged.state_dict(), saved.state_dict()
    same = logged_state.keys() == saved_state.keys() and all(
        torch.equal(logged_state[k].cpu(), saved_state[k]) for k in saved_state
    )
    if not same:
        raise MedtransferError(
            f"The saved student in train.model_dir is not the model MLflow run "
            f"{candidate.run_id} logged; re-run `medtransfer train` so that both agree."
        )
    run_dataset = run.data.tags.get("dataset_version")
    if run_dataset and candidate.dataset_version and run_dataset != candidate.dataset_version:
        raise MedtransferError(
            f"train.json says dataset {candidate.dataset_version} but run {candidate.run_id} "
            f"is tagged {run_dataset}; re-run `medtransfer train`."
        )
    return model_uri


def _logged_model_uri(client, run) -> str:
    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.name == "model":
            return model.model_uri
    return f"runs:/{run.info.run_id}/model"


def _ensure_registered_model(client, name: str) -> bool:
    """Create the registered model if missing; returns whether this call created it."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException:
        client.create_registered_model(
            name, description="Students fine-tuned from an ImageNet teacher by medtransfer."
        )
        return True


def _roll_back(client, name: str, version: str | None, created_model: bool) -> None:
    """Undo a registration that failed half-way (best effort: the original error wins)."""
    try:
        if version is not None:
            client.delete_model_version(name, version)
        if created_model:
            client.delete_registered_model(name)
    except Exception:  # the caller re-raises the original error, which says more
        pass


def _description(card: str, card_uri: str) -> str:
    if len(card) <= MAX_DESCRIPTION:
        return card
    note = f"\n\n(cut here; the full card is the artifact {card_uri})\n"
    return card[: MAX_DESCRIPTION - len(note)] + note


def _read_json(path: Path, producer: str) -> dict:
    if not path.is_file():
        raise MedtransferError(f"No {path}. Run `{producer}` first.")
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MedtransferError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(content, dict):
        raise MedtransferError(f"{path} must hold a JSON object.")
    return content


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: Any) -> str:
    number = _float(value)
    return "nan" if math.isnan(number) else repr(number)
