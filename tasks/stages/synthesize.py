"""Synthesis stage: the built-in synthetic data set, written as DICOM files and a labels CSV.

``medtransfer synthesize`` / ``dvc repro synthesize`` / the Prefect flow (when ``data.source``
is the synthetic set) call :func:`run_synthesize`. Its output folder is a DVC output that the
``ingest`` stage depends on through ``data.source``, like any DICOM folder of the user's.
"""

from __future__ import annotations

from tasks.config import Params
from tasks.data import synthetic
from tasks.stages.preflight import check_stage_outputs


def run_synthesize(params: Params) -> dict:
    """Generate the set described by ``params`` (its ``synthetic`` section and ``seed``).

    Returns:
        ``{"dicom_dir", "labels_csv", "files"}``: where the set is and how many DICOM files it
        holds. An identical set already on disk is kept as it is.
    """
    check_stage_outputs("synthesize", params)
    synthetic.generate(synthetic.SyntheticConfig.from_params(params))
    return describe_set(params)


def describe_set(params: Params) -> dict:
    """``{"dicom_dir", "labels_csv", "files"}`` of the synthetic set on disk (what
    :func:`run_synthesize` returns; the flow reads it so when DVC says the set is current)."""
    folder = synthetic.source_folder(synthetic.SyntheticConfig.from_params(params))
    files = sum(1 for path in folder.rglob("*.dcm") if path.is_file())
    labels_csv = folder / synthetic.LABELS_FILE
    return {"dicom_dir": str(folder), "labels_csv": str(labels_csv), "files": files}
