"""Packaging stage: the approved registry version becomes a Bento, exported as an archive.

``medtransfer package`` takes the version carrying ``registry.alias`` (or
``-S registry.version=N``), rebuilds the student from its MLflow model (architecture from the
version's ``student_spec`` tag, weights from the registered model, checked key by key), saves it
with :func:`tasks.student_io.save_student` into BentoML's model store, builds the Bento from
``serving/bentofile.yaml`` (the service loads that model with
:func:`tasks.student_io.load_student`, so serving is numerically the in-process student), and
exports ``<serving.export_dir>/<bento_name>-<version>.tar.gz`` (``bentoml import`` reads it).

BentoML's store is ``serving.bentoml_home`` inside the project unless ``BENTOML_HOME`` is set.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.config import checked_section
from tasks.errors import MedtransferError
from tasks.stages.register import RegistryConfig

PACKAGE_REPORT = "package.json"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"


@dataclass(frozen=True)
class ServingConfig:
    """The ``serving`` section of params.yaml (see the comments there)."""

    bento_name: str = "medtransfer"
    bentoml_home: str = ".bentoml"
    export_dir: str = "bentos"
    max_upload_bytes: int = 64 * 1024 * 1024
    max_batch_files: int = 64
    max_image_dim: int = 8192
    batching: bool = True
    max_batch_size: int = 8
    max_latency_ms: int = 5000
    model_threads: int = 1

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ServingConfig:
        section = checked_section(params, "serving", cls.__dataclass_fields__)
        config = cls(**section)
        for name in ("max_upload_bytes", "max_batch_files", "max_image_dim", "max_latency_ms"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MedtransferError(f"serving.{name} must be a positive integer, not {value!r}.")
        if isinstance(config.model_threads, bool) or not isinstance(config.model_threads, int):
            raise MedtransferError(
                f"serving.model_threads must be an integer (0: torch's default), not "
                f"{config.model_threads!r}."
            )
        if not isinstance(config.max_batch_size, int) or config.max_batch_size < 2:
            raise MedtransferError(
                "serving.max_batch_size must be an integer >= 2 (BentoML's minimum); "
                "turn batching off with serving.batching=false instead."
            )
        return config


@dataclass
class PackageResult:
    """The content of ``reports/package.json``."""

    model_name: str
    model_version: str
    dataset_version: str
    bento_model: str
    bento: str
    archive: str
    bentoml_home: str
    threshold: float | None
    batching: bool


def bentoml_home(config: ServingConfig) -> Path:
    """Point BentoML at its store: ``BENTOML_HOME`` if set, else ``serving.bentoml_home``.

    BentoML reads the variable when it first touches its store, so this runs before any
    BentoML call; a process that already used another store is refused.
    """
    home = Path(os.environ.get("BENTOML_HOME") or config.bentoml_home).resolve()
    os.environ["BENTOML_HOME"] = str(home)
    from bentoml._internal.configuration.containers import BentoMLContainer

    in_use = Path(BentoMLContainer.bentoml_home.get()).resolve()
    if in_use != home:
        raise MedtransferError(
            f"BentoML in this process already uses {in_use}, not {home}; run `medtransfer "
            "package` in a fresh process."
        )
    home.mkdir(parents=True, exist_ok=True)
    return home


def resolve_version(client, registry: RegistryConfig):
    """The registry version to package: ``registry.version`` or the alias's version."""
    from mlflow.exceptions import MlflowException

    try:
        if registry.version is not None:
            return client.get_model_version(registry.model_name, str(registry.version))
        return client.get_model_version_by_alias(registry.model_name, registry.alias)
    except MlflowException as err:
        which = (
            f"version {registry.version}"
            if registry.version is not None
            else f"version with alias {registry.alias!r}"
        )
        raise MedtransferError(
            f"The registry has no {which} of {registry.model_name!r}. Run `medtransfer "
            "register` (a version gets the alias only when it passes the gates), or choose one "
            "with -S registry.version=N."
        ) from err


def student_from_version(version) -> tuple[Any, Any]:
    """Rebuild the student of a registry version: (model in eval mode, StudentSpec).

    The architecture comes from the version's ``student_spec`` tag, the weights from the
    registered MLflow model, loaded with ``strict=True`` so any mismatch is refused.
    """
    import mlflow

    from tasks.model.student_io import StudentSpec, build_from_spec

    raw = version.tags.get("student_spec")
    if not raw:
        raise MedtransferError(
            f"Version {version.version} of {version.name} has no student_spec tag: it was not "
            "registered by `medtransfer register`."
        )
    spec_dict = json.loads(raw)
    spec = StudentSpec(**{**spec_dict, "classes": tuple(spec_dict["classes"])})
    logged = mlflow.pytorch.load_model(
        f"models:/{version.name}/{version.version}", map_location="cpu"
    )
    model = build_from_spec(spec)
    try:
        model.load_state_dict(logged.state_dict(), strict=True)
    except RuntimeError as err:
        raise MedtransferError(
            f"The weights of {version.name} version {version.version} do not fit the "
            f"architecture its student_spec tag describes: {err}"
        ) from err
    model.eval()
    return model, spec


def import_model(model, spec, version, labels: dict[str, str], metadata: dict[str, Any]) -> str:
    """Save the student into BentoML's model store; returns the model tag.

    The tag's version is ``v<registry version>-<first 12 hex of model.pt's SHA-256>``, so
    packaging the same weights again reuses the stored model.
    """
    import shutil

    import bentoml
    from bentoml.exceptions import NotFound

    from tasks.model.student_io import MODEL_FILE, save_student

    with tempfile.TemporaryDirectory() as staging:
        path = save_student(model, spec, staging)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        tag = f"{_tag_name(version.name)}:v{version.version}-{digest[:12]}"
        try:
            bentoml.models.get(tag)
            return tag
        except NotFound:
            pass
        with bentoml.models.create(
            tag, labels=labels, metadata={**metadata, "model_sha256": digest}
        ) as stored:
            shutil.copyfile(path, Path(stored.path) / MODEL_FILE)
    return tag


def run_package(params: Mapping[str, Any]) -> dict:
    """The packaging stage; returns the content of ``reports/package.json``."""
    from mlflow import MlflowClient

    from tasks.tracking import configure_mlflow

    registry = RegistryConfig.from_params(params)
    serving = ServingConfig.from_params(params)
    configure_mlflow(params)
    version = resolve_version(MlflowClient(), registry)
    model, spec = student_from_version(version)
    home = bentoml_home(serving)
    tags = version.tags
    threshold = _threshold(tags.get("threshold"))
    dataset_version = tags.get("dataset_version", "")
    model_tag = import_model(
        model,
        spec,
        version,
        labels={
            "registry_version": str(version.version),
            "dataset_version": dataset_version[:63],
            "teacher": spec.teacher,
            "strategy": spec.strategy,
        },
        metadata={
            "registered_model": version.name,
            "registry_version": str(version.version),
            "run_id": version.run_id or "",
            "dataset_version": dataset_version,
            "threshold": threshold,
            "classes": list(spec.classes),
            "image_size": spec.image_size,
        },
    )
    args = {
        "model_tag": model_tag,
        "model_name": version.name,
        "model_version": str(version.version),
        "dataset_version": dataset_version,
        "classes": list(spec.classes),
        "image_size": spec.image_size,
        "threshold": threshold,
        "max_upload_bytes": serving.max_upload_bytes,
        "max_batch_files": serving.max_batch_files,
        "max_image_dim": serving.max_image_dim,
        "batching": serving.batching,
        "max_batch_size": serving.max_batch_size,
        "max_latency_ms": serving.max_latency_ms,
        "model_threads": serving.model_threads,
    }
    bento = _build(serving, args, version)
    archive = _export(bento, serving)
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
    report = asdict(result)
    reports = Path(params.get("reports_dir", "reports"))
    reports.mkdir(parents=True, exist_ok=True)
    (reports / PACKAGE_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _build(serving: ServingConfig, args: dict[str, Any], version):
    import bentoml

    return bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        name=serving.bento_name,
        labels={
            "registered_model": version.name,
            "registry_version": str(version.version),
            "batching": "on" if serving.batching else "off",
        },
        build_ctx=str(PROJECT_ROOT),
        args=args,
        # The service reads its arguments at import: a second package in one process (the
        # Prefect flow) must re-import it, or the Bento would carry the first one's model tag.
        reload=True,
    )


def _export(bento, serving: ServingConfig) -> Path:
    import bentoml

    export_dir = Path(serving.export_dir).resolve()
    export_dir.mkdir(parents=True, exist_ok=True)
    # gzip, not BentoML's default xz: as small within a few percent, and ten times faster.
    path = export_dir / f"{bento.tag.name}-{bento.tag.version}.tar.gz"
    return Path(bentoml.bentos.export_bento(bento.tag, str(path), output_format="gz"))


def _tag_name(name: str) -> str:
    """A registered model's name as a BentoML tag name (lower case, ``[a-z0-9_.-]``)."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower())
    return cleaned.strip("-_.") or "student"


def _threshold(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "nan") else None
    except ValueError:
        return None
