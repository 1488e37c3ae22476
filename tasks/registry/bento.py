"""Building the Bento of a registry version: rebuild the student from its MLflow model, save it
into BentoML's model store, build the Bento from ``serving/bentofile.yaml`` and export it.

The package stage (:mod:`tasks.stages.package`) chains these. The student is rebuilt from the
version's ``student_spec`` tag and the registered weights (checked key by key) and saved with
:func:`tasks.model.student_io.save_student`; the service loads it with
:func:`tasks.model.student_io.load_student`, so serving is numerically the in-process student.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import RegistryParams, ServingParams
from tasks.errors import MedtransferError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BENTOFILE = PROJECT_ROOT / "serving" / "bentofile.yaml"


@dataclass
class PackageResult:
    """The content of the package report (:data:`tasks.reports.PACKAGE`)."""

    model_name: str
    model_version: str
    dataset_version: str
    bento_model: str
    bento: str
    archive: str
    bentoml_home: str
    threshold: float | None
    batching: bool


def bentoml_home(config: ServingParams) -> Path:
    """Point BentoML at its store: ``BENTOML_HOME`` if set, else ``serving.bentoml_home``.

    BentoML reads the variable once, when it first touches its store, so this runs before any
    BentoML call; :func:`import_model` refuses a process whose store turns out to be elsewhere.
    """
    home = Path(os.environ.get("BENTOML_HOME") or config.bentoml_home).resolve()
    os.environ["BENTOML_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return home


def check_store(stored_path: str | Path) -> None:
    """Refuse when a stored model (its public ``Model.path``) is not under ``BENTOML_HOME``:
    this process used another store before :func:`bentoml_home` set the variable."""
    home = Path(os.environ.get("BENTOML_HOME", "")).resolve()
    path = Path(stored_path).resolve()  # <home>/models/<name>/<version>
    in_use = path.parents[2] if len(path.parents) > 2 else path
    if in_use != home:
        raise MedtransferError(
            f"BentoML in this process already uses {in_use}, not {home}; run `medtransfer "
            "package` in a fresh process."
        )


def find_version(client, registry: RegistryParams):
    """The registry version to package, ``registry.version`` or the alias's version, or
    ``None`` when the registry holds no such version (or no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        if registry.version is not None:
            return client.get_model_version(registry.model_name, str(registry.version))
        return client.get_model_version_by_alias(registry.model_name, registry.alias)
    except MlflowException:  # no such version or alias, or no such registered model
        return None


def resolve_version(client, registry: RegistryParams):
    """:func:`find_version`, refused in one line when the registry has no such version."""
    version = find_version(client, registry)
    if version is None:
        which = (
            f"version {registry.version}"
            if registry.version is not None
            else f"version with alias {registry.alias!r}"
        )
        raise MedtransferError(
            f"The registry has no {which} of {registry.model_name!r}. Run `medtransfer "
            "register` (a version gets the alias only when it passes the gates), or choose one "
            "with -S registry.version=N."
        )
    return version


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
    if isinstance(spec_dict.get("temperature"), list):  # multi-label: one per finding
        spec_dict["temperature"] = tuple(spec_dict["temperature"])
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


def import_model(
    model, spec, version, labels: dict[str, str], metadata: dict[str, Any], profile=None
) -> str:
    """Save the student (and the training data's ``profile``, a
    :class:`tasks.model.profile.DataProfile`, when given) into BentoML's model store; returns
    the model tag.

    The tag's version is ``v<registry version>-<first 12 hex of the SHA-256 of the saved
    files>``, so packaging the same weights with the same profile again reuses the stored model.

    Why ``bentoml.models.create`` and not a framework importer (checked with bentoml 1.4.39):
    ``bentoml.pytorch.save_model`` (deprecated since 1.4: importing it warns) stores the whole
    module with ``torch.save(model, pickle_module=cloudpickle)`` and its ``load_model`` reads it
    with a plain ``torch.load``, so the server would unpickle code; the student here is a
    state_dict and spec that the service reads with ``weights_only=True``, through the same
    ``tasks.model.student_io`` as training and evaluation. ``bentoml.mlflow.import_model``
    copies the logged MLflow model (a torch.export program) and loads it with
    ``mlflow.pyfunc.load_model``: MLflow in the service's image, and a pyfunc ``predict`` of
    the logged forward pass alone, where the service also needs the student's penultimate
    features for its OOD score (``features_and_probabilities``); nor has it a place for the
    files fitted at package time (``profile.json``, ``ood.npz``: the scope and OOD gates) but
    cloudpickled ``custom_objects``. ``bentoml.models.create`` is the store API both call
    underneath: the same tag, labels and metadata, with the files we choose.
    """
    import shutil

    import bentoml
    from bentoml.exceptions import NotFound

    from tasks.model.student_io import save_student

    with tempfile.TemporaryDirectory() as staging:
        save_student(model, spec, staging)
        if profile is not None:
            profile.save(staging)
        hasher = hashlib.sha256()
        for saved in sorted(Path(staging).iterdir()):
            hasher.update(saved.read_bytes())
        digest = hasher.hexdigest()
        tag = f"{_tag_name(version.name)}:v{version.version}-{digest[:12]}"
        try:
            check_store(bentoml.models.get(tag).path)
            return tag
        except NotFound:
            pass
        with bentoml.models.create(
            # None is no BentoML metadata value (a multi-label model has no one threshold)
            tag,
            labels=labels,
            metadata={
                **{k: v for k, v in metadata.items() if v is not None},
                "model_sha256": digest,
            },
        ) as stored:
            for saved in Path(staging).iterdir():  # model.pt, and profile.json, ood.npz
                shutil.copyfile(saved, Path(stored.path) / saved.name)
    # Checked once stored: inside ``create`` the model sits in a temporary folder.
    check_store(bentoml.models.get(tag).path)
    return tag


def approval(version, alias: str) -> tuple[bool, str]:
    """Whether registry ``version`` is approved (it carries ``alias``, which only a version
    that passed its gates gets) and a sentence saying so, which the Bento repeats in ``/info``,
    every reply and its labels."""
    if alias in (getattr(version, "aliases", None) or []):
        return True, f"approved: version {version.version} carries the alias '{alias}'"
    tags = version.tags or {}
    passed = {"true": "passed", "false": "failed"}.get(tags.get("robustness_passed", ""), "?")
    return False, (
        f"NOT APPROVED: version {version.version} does not carry the alias '{alias}' "
        f"(robustness gates {passed}, promotion {tags.get('promotion', '?')}); built on "
        "request with registry.version, for trials only, not for patient care"
    )


def build_bento(serving: ServingParams, args: dict[str, Any], version):
    """Build the Bento from ``serving/bentofile.yaml`` with ``args`` (the service's arguments)."""
    import bentoml

    return bentoml.bentos.build_bentofile(
        str(BENTOFILE),
        name=serving.bento_name,
        labels={
            "registered_model": version.name,
            "registry_version": str(version.version),
            "batching": "on" if serving.batching else "off",
            "approved": "true" if args.get("approved") else "false",
        },
        build_ctx=str(PROJECT_ROOT),
        args=args,
        # The service reads its arguments at import: a second package in one process (the
        # Prefect flow) must re-import it, or the Bento would carry the first one's model tag.
        reload=True,
    )


def export_bento(bento, serving: ServingParams) -> Path:
    """Export ``bento`` as ``<export_dir>/<name>-<version>.tar.gz``; returns its path."""
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


def parse_threshold(value: str | None) -> float | None:
    """A version's ``threshold`` tag as a number, or None when it is missing or not a number."""
    try:
        return float(value) if value not in (None, "", "nan") else None
    except ValueError:
        return None
