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

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from tasks import reports
from tasks.code_closure import code_version
from tasks.config import Params
from tasks.data import synthetic
from tasks.data.dataset import INFO_FILE, dataset_version
from tasks.digest import file_sha256
from tasks.model.student_io import MODEL_FILE


def source_fingerprint(params: Params) -> str:
    """What the raw source is right now, cheaply: the synthetic recipe, or file stats."""
    source = params.data.source
    recipe = synthetic.SyntheticConfig.from_params(params)
    if synthetic.is_synthetic_source(source, recipe):
        return _digest(_section(params, "synthetic"), params.seed)
    path = Path(source)
    if path.is_file():
        stat = path.stat()
        return _digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    entries = []
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            entries.append((file.relative_to(path).as_posix(), stat.st_size, stat.st_mtime_ns))
    labels_csv = params.data.labels_csv
    if labels_csv and Path(labels_csv).is_file():
        stat = Path(labels_csv).stat()
        entries.append((str(labels_csv), stat.st_size, stat.st_mtime_ns))
    return _digest(str(path.resolve()), entries)


def outputs_present(stage: str, params: Params) -> bool:
    """Whether the files ``stage`` writes are all on disk."""
    if stage == "synthesize":
        return (Path(params.synthetic.output_dir) / synthetic.FINGERPRINT_FILE).is_file()
    outputs = [reports.BY_STAGE[stage].path(params.reports_dir)]
    if stage == "ingest":
        outputs.append(Path(params.data.processed_dir) / INFO_FILE)
    if stage == "train":
        outputs.append(_model_file(params))
    if stage == "package" and outputs[0].is_file():
        archive = (reports.PACKAGE.read(params.reports_dir) or {}).get("archive", "")
        outputs.append(Path(archive))
    return all(path.is_file() for path in outputs)


def stage_key(stage: str, params: Params) -> str:
    """The cache key of ``stage`` under ``params``, from its inputs as they are now."""
    processed = Path(params.data.processed_dir)
    model_file = _model_file(params)
    parts: list[Any] = [stage, code_version(stage), params.seed, params.reports_dir]
    if stage in ("register", "package"):
        # What the registry sees: the run, its evaluation and verdict; then the registered version.
        inputs = (
            (reports.TRAIN, reports.METRICS, reports.ROBUSTNESS)
            if stage == "register"
            else (reports.REGISTER,)
        )
        parts += [_section(params, name) for name in ("registry", "gates", "serving")]
        parts += [file_sha256(report.path(params.reports_dir)) for report in inputs]
        if stage == "package":  # the training data's profile is recorded with the model
            parts.append(dataset_version(processed))
        return f"medtransfer-{stage}-{_digest(*parts)}"
    if stage == "synthesize":
        return f"medtransfer-{stage}-{_digest(*parts, _section(params, 'synthetic'))}"
    if stage == "ingest":
        parts += [
            _section(params, "data"),
            _section(params, "synthetic"),
            source_fingerprint(params),
        ]
    else:
        parts += [dataset_version(processed), _section(params, "train"), _section(params, "mlflow")]
    if stage in ("evaluate", "robustness"):
        parts += [file_sha256(model_file), _section(params, "eval")]
    if stage == "robustness":
        parts += [_section(params, "robustness"), _section(params, "gates")]
    return f"medtransfer-{stage}-{_digest(*parts)}"


def _model_file(params: Params) -> Path:
    return Path(params.train.model_dir) / MODEL_FILE


def _section(params: Params, name: str) -> Any:
    """One section of ``params`` as plain values, for hashing."""
    return dataclasses.asdict(getattr(params, name))


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
