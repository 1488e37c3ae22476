"""The MLflow registry operations of the register stage: the current champion, the checks on
the training run before a version exists, and the rollback after a failed registration."""

from __future__ import annotations

from tasks.config import RegistryParams
from tasks.errors import MedtransferError
from tasks.registry.promotion import WEIGHTS_TAG, Candidate, Champion, as_float

MAX_DESCRIPTION = 5000  # the SQL registry's description column holds 5000 characters


def current_champion(client, config: RegistryParams) -> Champion | None:
    """The version holding ``config.alias``, or ``None`` (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(config.model_name, config.alias)
    except MlflowException:
        return None
    return Champion(
        version=str(version.version),
        dataset_version=str(version.tags.get("dataset_version", "")),
        test_auc=as_float(version.tags.get("test_auc")),
    )


def check_run(client, candidate: Candidate, saved) -> str:
    """The run exists, is live, logged a model, and that model is the saved student.

    Returns:
        The URI of the run's logged student (``student_classifier``, or ``model`` in runs
        logged before; MLflow 3 keeps it as a LoggedModel, ``models:/<model id>``;
        ``runs:/<run>/model`` for older stores).
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
            f"MLflow run {candidate.run_id} has no loadable logged student "
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


SOURCE_TAGS = ("dataset.source", "dataset.source_kind", "dataset.content_sha256")


def run_dataset_source(client, run_id: str) -> dict[str, str]:
    """The ``dataset.*`` source tags the train stage set on ``run_id`` from the dataset's own
    record (:meth:`tasks.data.dataset.DatasetSource.mlflow_tags`); ``{}`` for a run that set
    none. These name what the student was trained on, even when the processed dataset has
    been re-ingested since."""
    tags = client.get_run(run_id).data.tags
    return {key: tags[key] for key in SOURCE_TAGS if key in tags}


def _logged_model_uri(client, run) -> str:
    from tasks.tracking.configure import LEGACY_MODEL_NAME, MODEL_NAME

    outputs = run.outputs.model_outputs if run.outputs is not None else []
    for output in outputs:
        model = client.get_logged_model(output.model_id)
        if model.name in (MODEL_NAME, LEGACY_MODEL_NAME):
            return model.model_uri
    return f"runs:/{run.info.run_id}/{LEGACY_MODEL_NAME}"


def weights_digest(model) -> str:
    """SHA-256 over a model's ``state_dict``: each entry's name, dtype, shape and bytes, in name
    order. Equal for two models exactly when their weights (and buffers) are equal."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def existing_version(client, name: str, run_id: str, weights: str) -> tuple[str, str] | None:
    """The version of ``name`` that already holds this student, and why: one whose source is
    the training run ``run_id``, or one tagged with the same weights digest; None when none
    does (or the model does not exist yet). The lowest such version wins."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return None
    for version in sorted(versions, key=lambda v: int(v.version)):
        if version.run_id == run_id:
            return str(version.version), f"training run {run_id}"
        if weights and version.tags.get(WEIGHTS_TAG) == weights:
            return str(version.version), "identical weights"
    return None


def ensure_registered_model(client, name: str) -> bool:
    """Create the registered model if missing; returns whether this call created it. Only
    MLflow's "does not exist" counts as missing: a store that failed to answer (locked,
    unreachable) raises, as treating it as missing would make a rollback delete a model that
    holds versions."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return False
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    try:
        client.create_registered_model(
            name, description="Students fine-tuned from an ImageNet teacher by medtransfer."
        )
    except MlflowException as err:
        if err.error_code == "RESOURCE_ALREADY_EXISTS":  # another process made it meanwhile
            return False
        raise
    return True


def roll_back(client, name: str, version: str | None, created_model: bool) -> None:
    """Undo a registration that failed half-way (best effort: the original error wins). The
    registered model goes only if this call created it and it holds no version (never one
    another registration made in between)."""
    try:
        if version is not None:
            client.delete_model_version(name, version)
        if created_model and not client.search_model_versions(f"name='{name}'"):
            client.delete_registered_model(name)
    except Exception:  # the caller re-raises the original error, which says more
        pass


def description(card: str, card_uri: str) -> str:
    if len(card) <= MAX_DESCRIPTION:
        return card
    note = f"\n\n(cut here; the full card is the artifact {card_uri})\n"
    return card[: MAX_DESCRIPTION - len(note)] + note
