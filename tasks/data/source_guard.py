"""Refuse output paths that would overwrite or delete the user's source data.

Ingestion replaces ``data.processed_dir`` whole (a staging folder swapped in, the old one
removed). Pointed at the source itself, at a folder inside it or at one that contains it, that
swap deletes the user's DICOM files; pointed at an existing file, it replaces the file. So the
paths are checked before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from tasks.errors import MedtransferError


def check_outputs_spare_source(source: Path, processed_dir: Path, reports_dir: Path) -> None:
    """Raise unless ingesting ``source`` into ``processed_dir`` leaves ``source`` untouched.

    Args:
        source: the folder or ``.npz`` file being ingested (``data.source``).
        processed_dir: the folder the dataset replaces whole (``data.processed_dir``).
        reports_dir: the folder the ingest report is written into (``reports_dir``).

    Raises:
        MedtransferError: ``processed_dir`` equals, lies inside or contains ``source``, or is
            an existing file; ``reports_dir`` equals or lies inside ``source``, or is a file.
    """
    source, processed, reports = (p.resolve() for p in (source, processed_dir, reports_dir))
    if processed == source or source in processed.parents or processed in source.parents:
        raise MedtransferError(
            f"data.processed_dir {_relation(processed, source)} data.source, and ingesting "
            "replaces that folder whole, which would delete the source files. Point "
            "data.processed_dir at a folder outside the source (the default is data/processed)."
        )
    if processed.exists() and not processed.is_dir():
        raise MedtransferError(
            "data.processed_dir names an existing file, which ingesting would replace. "
            "Point it at a folder (new or a previous dataset)."
        )
    if reports == source or source in reports.parents:
        raise MedtransferError(
            "reports_dir lies inside data.source, so the reports would be written among the "
            "source files. Point reports_dir elsewhere (the default is reports)."
        )
    if reports.exists() and not reports.is_dir():
        raise MedtransferError(
            "reports_dir names an existing file. Point it at a folder (the default is reports)."
        )


def _relation(processed: Path, source: Path) -> str:
    """How ``processed`` sits against ``source``, for the error (no path is quoted: folder
    names can carry patient names or accession numbers)."""
    if processed == source:
        return "is the same folder as"
    return "lies inside" if source in processed.parents else "contains"
