"""The ingest stage: the configured source (a DICOM folder, an image folder of PNG / JPEG /
TIFF files, either as ZIP / TAR archives, a MedMNIST ``.npz`` or the synthetic set) → the processed dataset in ``data.processed_dir`` and the ingest report.

Called by ``medtransfer ingest``, ``dvc repro ingest``, the Prefect flow and the tests.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tasks import reports
from tasks.config import Params
from tasks.data import archives, groups, synthetic
from tasks.data.dataset_writer import IngestResult
from tasks.data.file_decoding import DecodeMap
from tasks.data.findings import read_findings_source
from tasks.data.ingestion import ingest_folder, ingest_npz
from tasks.data.labels import find_csv, read_label_source
from tasks.data.source_guard import check_outputs_spare_source
from tasks.errors import MedtransferError
from tasks.stages.preflight import check_stage_outputs

logger = logging.getLogger(__name__)


def run_ingest(
    params: Params, progress: bool = True, decode_map: DecodeMap | None = None
) -> IngestResult:
    """Ingest ``params.data.source`` and write the ingest report.

    Args:
        params: the configuration (``data``, ``synthetic``, ``seed``, ``reports_dir``).
        progress: show a progress bar on the terminal.
        decode_map: decodes a folder's files (see :data:`~tasks.data.file_decoding.DecodeMap`);
            None uses a local process pool. The Prefect flow passes one that fans out through
            its task runner.

    Returns:
        The counts; the dataset is in ``data.processed_dir`` and the report at
        :data:`tasks.reports.INGEST`.

    Raises:
        MedtransferError: an empty or missing source, an unreadable labels CSV, fewer than two
            classes among the ingested images; a ``data.processed_dir`` or ``reports_dir``
            that would overwrite or delete the source (checked before anything is written).
    """
    result = _ingest_source(params, progress, decode_map)
    reports.INGEST.write(params.reports_dir, result)
    reasons = {k: v for k, v in result.quarantined_by_reason.items() if v}
    logger.info(
        "ingest: %d files seen, %d ingested (%d images), %d quarantined%s; images per split "
        "(split by %s): %s",
        result.files_seen,
        result.ingested,
        result.images,
        result.quarantined,
        f" {reasons}" if reasons else "",
        result.split_by,
        ", ".join(f"{split} {counts['images']}" for split, counts in result.splits.items()),
    )
    if result.labels_csv.get("rows_without_file"):
        logger.warning(
            "ingest: %d labels CSV rows name no file of the folder (ignored; counted in %s as "
            "labels_csv.rows_without_file)",
            result.labels_csv["rows_without_file"],
            reports.INGEST.file_name,
        )
    return result


def _ingest_source(params: Params, progress: bool, decode_map: DecodeMap | None) -> IngestResult:
    data = params.data
    names = groups.recorded(params.eval.groups, data.site)
    recipe = synthetic.SyntheticConfig.from_params(params)
    if synthetic.is_synthetic_source(data.source, recipe):
        # Generating is a no-op when `medtransfer synthesize` (its own DVC stage and flow
        # task) already wrote this recipe's set; it keeps `medtransfer ingest` usable alone.
        _refuse_findings_keys(data.multilabel, "the synthetic set brings its own")
        folder, labels_csv = synthetic.generate(recipe)
        _check_outputs(params, folder)
        labels = read_label_source(folder, labels_csv)
        return ingest_folder(
            folder, labels, data, params.seed, "synthetic", progress, decode_map, names
        )
    source = Path(data.source)
    _check_outputs(params, source)
    if source.suffix == ".npz":
        _refuse_findings_keys(data.multilabel, "a .npz brings its own ((N, K) 0/1 for findings)")
        return ingest_npz(source, data, params.seed, names, progress)
    if not (source.is_dir() or (source.is_file() and archives.is_archive(source))):
        raise MedtransferError(
            f"data.source {data.source!r} is neither 'synthetic', a folder, a ZIP / TAR archive "
            "nor a .npz file. Point it at a folder of DICOM or PNG / JPEG / TIFF files (or "
            "archives of them) or a MedMNIST-format .npz."
        )
    labels = (
        read_findings_source(source, data)
        if data.multilabel
        else read_label_source(source, data.labels_csv, data.patient_from_path)
    )
    _warn_if_labels_outside(source, data.labels_csv)
    return ingest_folder(
        source, labels, data, params.seed, "dicom_folder", progress, decode_map, names
    )


def _warn_if_labels_outside(source: Path, labels_csv: str | None) -> None:
    """One warning when the labels CSV (read already) lies outside the ``source`` folder: the
    ingest stage's DVC dependency is ``${data.source}``, so a change to that file alone would
    leave ``dvc status`` clean and ``dvc repro`` skipping ingest, on stale labels."""
    if labels_csv is None or not source.is_dir():
        return
    csv_path = find_csv(source, labels_csv).resolve()
    if not csv_path.is_relative_to(source.resolve()):
        # No path in the line: a folder's or file's name can carry a patient's.
        logger.warning(
            "data.labels_csv lies outside the data.source folder: DVC does not track it, so "
            "`dvc repro` will not re-run ingest when only the labels change. Move it into the "
            "folder (data.labels_csv relative to it), or `dvc add` it and list it among the "
            "ingest stage's deps."
        )


def _refuse_findings_keys(multilabel: bool, why: str) -> None:
    """Refuse ``data.findings`` / ``data.findings_column`` for a source with its own labels."""
    if multilabel:
        raise MedtransferError(
            "data.findings and data.findings_column read a folder's labels CSV; "
            f"{why} labels: set both to null."
        )


def _check_outputs(params: Params, source: Path) -> None:
    """Refuse, before anything is written, outputs that would overwrite or delete ``source``."""
    check_outputs_spare_source(source, Path(params.data.processed_dir), Path(params.reports_dir))
    check_stage_outputs("ingest", params)
