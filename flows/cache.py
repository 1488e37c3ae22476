"""Cache keys of the pipeline's stages: what each stage's result depends on.

The Prefect flow uses these as task cache keys, so a re-run with unchanged data, code and
parameters decodes and trains nothing (Prefect logs such a task as ``Cached``). A key covers:

- the parameters the stage reads;
- its inputs' content: the raw source (file names, sizes, modification times), the processed
  dataset's DVC hash, the saved student's bytes;
- the source code of the modules the stage runs (:func:`tasks.code_closure.code_version`:
  the import closure of ``tasks.stages.<stage>``, the one stage table that dvc.yaml's code deps
  also follow), so a code change invalidates it.

A cached result must never stand for files that are gone: the flow refreshes a stage whose
outputs (:func:`outputs_present`) are missing instead of reusing its cache entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tasks.code_closure import code_version
from tasks.data import synthetic
from tasks.data.dataset import INFO_FILE, dataset_version


def source_fingerprint(params: dict) -> str:
    """What the raw source is right now, cheaply: the synthetic recipe, or file stats."""
    source = str(params["data"]["source"])
    recipe = synthetic.SyntheticConfig.from_params(params)
    if synthetic.is_synthetic_source(source, recipe):
        return _digest(params.get("synthetic"), params.get("seed"))
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    entries = []
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            entries.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    labels_csv = params["data"].get("labels_csv")
    if labels_csv and Path(labels_csv).is_file():
        stat = Path(labels_csv).stat()
        entries.append((str(labels_csv), stat.st_size, stat.st_mtime_ns))
    return _digest(str(path.resolve()), entries)


def outputs_present(stage: str, params: dict) -> bool:
    """Whether the files ``stage`` writes are all on disk."""
    reports = Path(params.get("reports_dir", "reports"))
    outputs = {
        "synthesize": [Path(params["synthetic"]["output_dir"]) / synthetic.FINGERPRINT_FILE],
        "ingest": [Path(params["data"]["processed_dir"]) / INFO_FILE, reports / "ingest.json"],
        "train": [_model_file(params), reports / "train.json"],
        "evaluate": [reports / "metrics.json"],
        "robustness": [reports / "robustness.json"],
        "register": [reports / "register.json"],
        "package": [reports / "package.json"],
    }[stage]
    if stage == "package" and outputs[0].is_file():
        outputs.append(Path(json.loads(outputs[0].read_text()).get("archive", "")))
    return all(path.is_file() for path in outputs)


def stage_key(stage: str, params: dict) -> str:
    """The cache key of ``stage`` under ``params``, from its inputs as they are now."""
    reports = Path(params.get("reports_dir", "reports"))
    processed = Path(params["data"]["processed_dir"])
    model_file = _model_file(params)
    parts: list[Any] = [stage, code_version(stage), params.get("seed"), str(reports)]
    if stage in ("register", "package"):
        # What the registry sees: the run, its evaluation and verdict; then the registered version.
        inputs = ("train", "metrics", "robustness") if stage == "register" else ("register",)
        parts += [params.get("registry"), params.get("gates"), params.get("serving")]
        parts += [_file_digest(reports / f"{name}.json") for name in inputs]
        return f"medtransfer-{stage}-{_digest(*parts)}"
    if stage == "synthesize":
        return f"medtransfer-{stage}-{_digest(*parts, params.get('synthetic'))}"
    if stage == "ingest":
        parts += [params.get("data"), params.get("synthetic"), source_fingerprint(params)]
    else:
        parts += [dataset_version(processed), params.get("train"), params.get("mlflow")]
    if stage in ("evaluate", "robustness"):
        parts += [_file_digest(model_file), params.get("eval")]
    if stage == "robustness":
        parts += [params.get("robustness"), params.get("gates")]
    return f"medtransfer-{stage}-{_digest(*parts)}"


def _model_file(params: dict) -> Path:
    return Path((params.get("train") or {}).get("model_dir", "models/student")) / "model.pt"


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
