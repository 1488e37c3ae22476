"""Where a DICOM file's label comes from: a CSV or the name of its class sub-folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from tasks.errors import MedtransferError


@dataclass
class LabelSource:
    """Labels for the files of one DICOM folder.

    Attributes:
        by_path: label per file path relative to the folder (POSIX separators).
        by_sop_uid: label per SOPInstanceUID.
        from_subfolders: when True, a file's label is its first-level sub-folder name.
        csv_path: the CSV the labels came from, if any (excluded from the files to ingest).
    """

    by_path: dict[str, str] = field(default_factory=dict)
    by_sop_uid: dict[str, str] = field(default_factory=dict)
    from_subfolders: bool = False
    csv_path: Path | None = None

    def label_for(self, relative_path: str, sop_instance_uid: str) -> str | None:
        """The label of one file, or None when the source does not label it."""
        if self.from_subfolders:
            parts = PurePosixPath(relative_path).parts
            return parts[0] if len(parts) > 1 else None
        label = self.by_path.get(relative_path)
        if label is None and sop_instance_uid:
            label = self.by_sop_uid.get(sop_instance_uid)
        return label


def read_label_source(folder: Path, labels_csv: str | Path | None) -> LabelSource:
    """Build the label source for ``folder``.

    Args:
        folder: the DICOM folder.
        labels_csv: a CSV with a ``label`` column and a ``path`` (relative to ``folder``) or
            ``SOPInstanceUID`` column; None to use class sub-folders. A relative CSV path is
            looked up inside ``folder`` first (where it is versioned with the images, one DVC
            dependency), then in the working directory.

    Raises:
        MedtransferError: the CSV is missing, unreadable, or lacks the needed columns.
    """
    if labels_csv is None:
        return LabelSource(from_subfolders=True)
    csv_path = Path(labels_csv)
    if not csv_path.is_absolute() and (folder / csv_path).is_file():
        csv_path = folder / csv_path
    if not csv_path.is_file():
        raise MedtransferError(
            f"The labels CSV {labels_csv} does not exist. Set data.labels_csv to a CSV with "
            "columns path (or SOPInstanceUID) and label, or to null to use class sub-folders."
        )
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise MedtransferError(
            f"The labels CSV {csv_path} could not be read ({type(err).__name__}: {err}). "
            "It must be a comma-separated UTF-8 file with a header row."
        ) from err
    columns = {name.strip(): name for name in table.columns}
    if "label" not in columns or not ({"path", "SOPInstanceUID"} & set(columns)):
        raise MedtransferError(
            f"The labels CSV {csv_path} has columns {list(table.columns)}; it needs a 'label' "
            "column and a 'path' or 'SOPInstanceUID' column."
        )
    labels = table[columns["label"]].str.strip()
    source = LabelSource(csv_path=csv_path.resolve())
    if "path" in columns:
        paths = (
            table[columns["path"]]
            .str.strip()
            .map(lambda p: PurePosixPath(p.replace("\\", "/")).as_posix())
        )
        source.by_path = {p: lab for p, lab in zip(paths, labels, strict=True) if p and lab}
    if "SOPInstanceUID" in columns:
        uids = table[columns["SOPInstanceUID"]].str.strip()
        source.by_sop_uid = {u: lab for u, lab in zip(uids, labels, strict=True) if u and lab}
    return source
