"""Cache keys of the pipeline's stages: what each stage's result depends on.

The Prefect flow uses these as task cache keys, so a re-run with unchanged data, code and
parameters decodes and trains nothing (Prefect logs such a task as ``Cached``). A key covers:

- the parameters the stage reads;
- its inputs' content: the raw source (file names, sizes, modification times), the processed
  dataset's DVC hash, the saved student's bytes;
- the source code of the modules the stage runs (:func:`tasks.code_closure.code_version`:
  the import closure of ``tasks.stages.<stage>``, which dvc.yaml's code deps also follow), so a
  code change invalidates it.

Which parameters and inputs are those is the stage's row in :mod:`tasks.stages.table`.

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
from tasks.figures import figures_dir
from tasks.model.student_io import MODEL_FILE
from tasks.stages import table
from tasks.stages.synthesize import describe_set


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
    """Whether the files ``stage`` writes (its row's ``writes`` in the stage table) are all on
    disk."""
    return all(_output_present(name, params) for name in table.stage(stage).writes)


def _output_present(artifact: str, params: Params) -> bool:
    """Whether one artifact or report a stage writes is on disk."""
    if artifact.startswith(table.REPORT_PREFIX):
        return _report(artifact).path(params.reports_dir).is_file()
    if artifact == "synthetic_set":
        return (Path(params.synthetic.output_dir) / synthetic.FINGERPRINT_FILE).is_file()
    if artifact == "dataset":
        return (Path(params.data.processed_dir) / INFO_FILE).is_file()
    if artifact == "model":
        return _model_file(params).is_file()
    if artifact == "bentos":  # the archive the package report names, unless none approved
        written = reports.PACKAGE.read_if_present(params.reports_dir)
        if written is not None and written.get("built") is False:
            return True
        return Path((written or {}).get("archive") or "").is_file()
    if artifact == "serving_profile":  # tasks.stages.package.SERVING_PROFILE_DIR
        return (Path(params.reports_dir) / "serving_profile").is_dir()
    if artifact.endswith("_figures"):  # tasks.figures: a folder of one file per figure
        return figures_dir(params.reports_dir, artifact.removesuffix("_figures")).is_dir()
    raise KeyError(f"no output check for artifact {artifact!r}")


def recorded_result(stage: str, params: Params) -> dict:
    """What ``stage`` returned when it last ran, from what it left on disk: its report, or for
    ``synthesize`` (no report) where the set is and its file count."""
    if stage == "synthesize":
        return describe_set(params)
    return _report(table.REPORT_PREFIX + stage).read(params.reports_dir)


def stage_key(stage: str, params: Params) -> str:
    """The cache key of ``stage`` under ``params``, from its inputs as they are now: its code
    version, the seed and reports folder, the parameters its row in the stage table lists (less
    those that only change what it logs; plus the MLflow section when it logs there), and the content of each artifact it reads."""
    row = table.stage(stage)
    parts: list[Any] = [stage, code_version(stage), params.seed, params.reports_dir]
    parts += [_section(params, key) for key in row.params if key not in row.logged_only]
    if row.tracked:  # another tracking store holds other runs: not the same result
        parts.append(_section(params, "mlflow"))
    parts += [_input_digest(name, params) for name in row.reads]
    return f"medtransfer-{stage}-{_digest(*parts)}"


def _input_digest(artifact: str, params: Params) -> str:
    """What one artifact or report a stage reads is now, as a short digest."""
    if artifact.startswith(table.REPORT_PREFIX):
        return file_sha256(_report(artifact).path(params.reports_dir))
    if artifact == "source":
        return source_fingerprint(params)
    if artifact == "dataset":
        return dataset_version(Path(params.data.processed_dir))
    if artifact == "model":
        return file_sha256(_model_file(params))
    if artifact == "group_figures":  # absent when evaluate had no groups to measure
        path = reports.plot_path(params.reports_dir, Path(table.ARTIFACTS[artifact]).name)
        return file_sha256(path) if path.is_file() else "absent"
    raise KeyError(f"no digest for artifact {artifact!r}")


def _report(artifact: str) -> reports.Report:
    return reports.BY_STAGE[artifact.removeprefix(table.REPORT_PREFIX)]


def _model_file(params: Params) -> Path:
    return Path(params.train.model_dir) / MODEL_FILE


def _section(params: Params, key: str) -> Any:
    """One section (``"train"``) or key (``"eval.threshold"``) of ``params`` as plain values,
    for hashing."""
    value: Any = params
    for part in key.split("."):
        value = getattr(value, part)
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
