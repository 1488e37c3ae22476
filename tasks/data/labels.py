"""Where a folder's file gets its label (and, optionally, its patient): a CSV or the name of
its class sub-folder. The same for a DICOM folder and an image folder (PNG / JPEG / TIFF).

A labels CSV is taken only when it says one thing per file: two rows giving one file
different labels (or patients), or two labels that differ only in case
(``Opacity``/``opacity``, which would become two classes), are refused with one line of counts.
Rows repeated word for word are accepted and counted, and rows naming no file in the folder are
counted in the ingest report (``labels_csv.rows_without_file``): neither changes what any image
is labelled; a CSV none of whose rows names a file is refused (:meth:`LabelSource.check_rows_name_files`).

An optional ``patient`` column names each file's patient (an image file has no header to say
it): ingestion keeps only its salted hash, to split by patient. The table itself is read by
:func:`read_table` and its paths normalised by :func:`normalise_path`, so another reader of the
same CSV (findings columns, say) keys the same rows to the same files.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
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
        rows: the CSV's distinct labelled rows as ``(path, SOPInstanceUID)`` keys ("" where
            the column is absent or empty), to count the rows that name no file.
        identical_duplicates: CSV rows that repeat an earlier row exactly (ignored).
        patients: the ``patient`` column's value per file path (empty without the column).
        has_patients: whether the CSV has a ``patient`` column.
        findings: the K finding names of a multi-label CSV (:mod:`tasks.data.findings`), whose
            labels are each file's findings written as one string; None: one class per file.
        vectors: for a multi-label CSV, each label string's findings ``(K,)`` float32 (1
            present, 0 absent, NaN unknown).
    """

    by_path: dict[str, str] = field(default_factory=dict)
    by_sop_uid: dict[str, str] = field(default_factory=dict)
    from_subfolders: bool = False
    csv_path: Path | None = None
    rows: list[tuple[str, str]] = field(default_factory=list)
    identical_duplicates: int = 0
    patients: dict[str, str] = field(default_factory=dict)
    has_patients: bool = False
    findings: tuple[str, ...] | None = None
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    # by_name: the CSV's paths are bare file names found in sub-folders (ChestX-ray14's
    # Image Index beside images_001/images/...): each file is looked up by its name
    by_name: bool = False
    _matched_uids: set[str] = field(default_factory=set)

    def label_for(self, relative_path: str, sop_instance_uid: str) -> str | None:
        """The label of one file, or None when the source does not label it."""
        if self.from_subfolders:
            parts = PurePosixPath(relative_path).parts
            return parts[0] if len(parts) > 1 else None
        label = self.by_path.get(self._key(relative_path))
        if label is None and sop_instance_uid:
            label = self.by_sop_uid.get(sop_instance_uid)
            if label is not None:
                self._matched_uids.add(sop_instance_uid)
        return label

    def findings_of(self, label: str) -> np.ndarray:
        """The findings ``(K,)`` a multi-label source's ``label`` (from :meth:`label_for`)
        stands for."""
        return self.vectors[label]

    def patient_for(self, relative_path: str) -> str | None:
        """The ``patient`` column's value for one file, or None (no column, or an empty cell)."""
        return self.patients.get(self._key(relative_path)) or None

    def _key(self, relative_path: str) -> str:
        """The CSV key of a file: its relative path, or its name when :attr:`by_name`."""
        return PurePosixPath(relative_path).name if self.by_name else relative_path

    def match_bare_names(self, listed_files: list[str]) -> None:
        """Look files up by name when the CSV names files bare and they lie in sub-folders.

        ChestX-ray14's table names ``00000001_000.png`` while the file is
        ``images_001/images/00000001_000.png``. When no CSV path is a listed file, every CSV
        path is a bare name and some listed file has that name, each file is looked up by its
        name (:attr:`by_name`); otherwise nothing changes.

        Args:
            listed_files: every file of the folder, relative POSIX paths.

        Raises:
            MedtransferError: a name the CSV uses belongs to two files of the folder (which
                one it labels is unknown; counted, never quoted).
        """
        paths = {path for path, _ in self.rows if path}
        if not paths or any("/" in path for path in paths) or paths & set(listed_files):
            return
        names = [PurePosixPath(f).name for f in listed_files]
        named = [name for name in names if name in paths]
        if not named:
            return
        twice = len(named) - len(set(named))
        if twice:
            raise MedtransferError(
                f"The labels CSV {self.csv_path} names files without their folders, and "
                f"{twice} of those names belong to more than one file in data.source; write "
                "each row's path relative to data.source (images_001/images/x.png) instead."
            )
        self.by_name = True

    def check_rows_name_files(self, listed_files: set[str]) -> dict[str, int]:
        """:meth:`csv_counts`, refusing a CSV none of whose rows names a file of the folder.

        Raises:
            MedtransferError: every row names a missing file (one line; no name is quoted).
        """
        counts = self.csv_counts(listed_files)
        if self.rows and counts["rows_without_file"] == len(self.rows):
            raise MedtransferError(
                f"The labels CSV {self.csv_path} names {len(self.rows)} file(s) and none of "
                "them is in data.source. Write each file's path relative to data.source, with "
                "/ separators (sub/image.png, not an absolute path), or point data.source at "
                "the folder the CSV describes."
            )
        return counts

    def csv_counts(self, listed_files: set[str]) -> dict[str, int]:
        """The CSV's row counts for the ingest report, once every file was labelled.

        Args:
            listed_files: every file of the folder, relative POSIX paths.

        Returns:
            ``{"rows", "identical_duplicates", "rows_without_file"}``; empty without a CSV. A row
            names no file when its path is not in ``listed_files`` and its SOPInstanceUID
            labelled no decoded file.
        """
        if self.csv_path is None:
            return {}
        listed = {self._key(f) for f in listed_files}
        without_file = sum(
            (not path or path not in listed) and (not uid or uid not in self._matched_uids)
            for path, uid in self.rows
        )
        return {
            "rows": len(self.rows) + self.identical_duplicates,
            "identical_duplicates": self.identical_duplicates,
            "rows_without_file": without_file,
        }


def read_label_source(
    folder: Path, labels_csv: str | Path | None, patient_pattern: str | None = None
) -> LabelSource:
    """Build the label source for ``folder``.

    Args:
        folder: the DICOM or image folder.
        labels_csv: a CSV with a ``label`` column and a ``path`` (relative to ``folder``) or
            ``SOPInstanceUID`` column, optionally a ``patient`` column; None to use class
            sub-folders. A relative CSV path is
            looked up inside ``folder`` first (where it is versioned with the images, one DVC
            dependency), then in the working directory.
        patient_pattern: ``data.patient_from_path`` (see :func:`patients_from_paths`) or None.

    Raises:
        MedtransferError: the CSV is missing, unreadable, or lacks the needed columns; it
            gives one file two labels or two patients, or spells one label in two cases.
    """
    if labels_csv is None:
        return LabelSource(from_subfolders=True)
    csv_path = find_csv(folder, labels_csv)
    table = read_table(csv_path)
    columns = {name.strip(): name for name in table.columns}
    if "label" not in columns or not ({"path", "SOPInstanceUID"} & set(columns)):
        raise MedtransferError(
            f"The labels CSV {csv_path} has columns {list(table.columns)}; it needs a 'label' "
            "column and a 'path' or 'SOPInstanceUID' column."
        )
    labels = table[columns["label"]].str.strip()
    return source_from_table(
        csv_path, table, columns, labels, keep=labels != "", patient_pattern=patient_pattern
    )


def source_from_table(
    csv_path: Path,
    table: pd.DataFrame,
    columns: dict[str, str],
    labels: pd.Series,
    keep: pd.Series,
    patient_pattern: str | None = None,
) -> LabelSource:
    """The :class:`LabelSource` of a read labels table: each row's label is ``labels`` (one
    string per row; a multi-label reader passes its findings written as one string), rows where
    ``keep`` is False are left out.

    Args:
        columns: ``{stripped name: column}``; ``path`` and/or ``SOPInstanceUID`` key the rows,
            ``patient`` (optional) names each file's patient.
        patient_pattern: ``data.patient_from_path`` (a regular expression with one group,
            searched in each path: the group is the patient), for a table without a patient
            column; None: none.

    Raises:
        MedtransferError: one file given two labels or two patients, a label in two cases;
            a patient pattern beside a patient column, or one that misses some paths.
    """
    paths = (
        table[columns["path"]].map(normalise_path)
        if "path" in columns
        else pd.Series([""] * len(table), dtype=str)
    )
    uids = (
        table[columns["SOPInstanceUID"]].str.strip()
        if "SOPInstanceUID" in columns
        else pd.Series([""] * len(table), dtype=str)
    )
    rows = [
        (path, uid, label)
        for path, uid, label, kept in zip(paths, uids, labels, keep, strict=True)
        if kept and (path or uid)
    ]
    _refuse_case_variants(csv_path, [label for _, _, label in rows])
    source = LabelSource(csv_path=csv_path.resolve())
    distinct = list(dict.fromkeys(rows))  # first occurrence of each exact row, in file order
    source.identical_duplicates = len(rows) - len(distinct)
    source.rows = [(path, uid) for path, uid, _ in distinct]
    source.by_path = _one_label_per_key(csv_path, "path", [(p, lab) for p, _, lab in distinct])
    source.by_sop_uid = _one_label_per_key(
        csv_path, "SOPInstanceUID", [(u, lab) for _, u, lab in distinct]
    )
    patients = _patient_rows(csv_path, table, columns, paths, source, patient_pattern)
    if patients is not None:
        source.has_patients = True
        source.patients = _one_label_per_key(
            csv_path, "path", list(dict.fromkeys(patients)), what="patients"
        )
    return source


def _patient_rows(
    csv_path: Path,
    table: pd.DataFrame,
    columns: dict[str, str],
    paths: pd.Series,
    source: LabelSource,
    patient_pattern: str | None,
) -> list[tuple[str, str]] | None:
    """``(path, patient)`` per row from the patient column or ``patient_pattern``; None when
    the table names no patient.

    Raises:
        MedtransferError: both a patient column and a pattern; a pattern that misses a path.
    """
    if "patient" in columns and patient_pattern is not None:
        raise MedtransferError(
            f"The labels CSV {csv_path} has a patient column and data.patient_from_path is set; "
            "which names the patient is unclear: set data.patient_from_path to null to use the "
            "column, or drop the column."
        )
    if "patient" in columns:
        return list(zip(paths, table[columns["patient"]].str.strip(), strict=True))
    if patient_pattern is not None:
        return patients_from_paths(csv_path, [path for path, _ in source.rows], patient_pattern)
    return None


def patients_from_paths(csv_path: Path, paths: list[str], pattern: str) -> list[tuple[str, str]]:
    """``(path, patient)`` for each labels-CSV ``path``: the one group of ``pattern`` searched
    in it (``patient(\\d+)/`` on ``train/patient00001/study1/view1.jpg`` gives ``00001``).

    Raises:
        MedtransferError: the pattern finds no patient in some paths (counted, none quoted: a
            path can carry a patient's name), or the table keys its rows by SOPInstanceUID only.
    """
    compiled = re.compile(pattern)
    found = [(path, match.group(1)) for path in paths if (match := compiled.search(path))]
    missed = len(paths) - len(found)
    if missed or not paths:
        raise MedtransferError(
            f"data.patient_from_path {pattern!r} finds no patient in {missed} of the "
            f"{len(paths)} paths of {csv_path}; fix the pattern (it is searched in each path, "
            "its one group is the patient) or give the CSV a patient column."
        )
    return found


def normalise_path(cell: str) -> str:
    """A CSV path cell as the file's key: stripped, ``/`` separators, no ``./`` ("" if empty)."""
    cell = cell.strip()
    return PurePosixPath(cell.replace("\\", "/")).as_posix() if cell else ""


def find_csv(folder: Path, labels_csv: str | Path) -> Path:
    """The CSV's path: inside ``folder`` when it is there, else as given."""
    csv_path = Path(labels_csv)
    if not csv_path.is_absolute() and (folder / csv_path).is_file():
        csv_path = folder / csv_path
    if not csv_path.is_file():
        raise MedtransferError(
            f"The labels CSV {labels_csv} does not exist. Set data.labels_csv to a CSV with "
            "columns path (or SOPInstanceUID) and label, or to null to use class sub-folders."
        )
    return csv_path


def read_table(csv_path: Path) -> pd.DataFrame:
    """Every cell of the CSV as text (empty cells as "")."""
    try:
        return pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise MedtransferError(
            f"The labels CSV {csv_path} could not be read ({type(err).__name__}: {err}). "
            "It must be a comma-separated UTF-8 file with a header row."
        ) from err


def _refuse_case_variants(csv_path: Path, labels: list[str]) -> None:
    """Refuse labels that differ only in case: they would silently become separate classes."""
    spellings: dict[str, set[str]] = defaultdict(set)
    for label in labels:
        spellings[label.casefold()].add(label)
    clashes = {key: sorted(group) for key, group in spellings.items() if len(group) > 1}
    if clashes:
        affected = sum(label.casefold() in clashes for label in labels)
        first = next(iter(clashes.values()))
        raise MedtransferError(
            f"The labels CSV {csv_path} spells {len(clashes)} label(s) in more than one case "
            f"({' / '.join(first)}{', ...' if len(clashes) > 1 else ''}; {affected} rows); "
            "they would become separate classes. Write each class one way and ingest again."
        )


def _one_label_per_key(
    csv_path: Path, column: str, pairs: list[tuple[str, str]], what: str = "labels"
) -> dict[str, str]:
    """``{key: value}`` from distinct ``(key, value)`` rows (empty keys skipped); ``what`` the
    values are (``labels``, ``patients``), for the message.

    Raises:
        MedtransferError: a key with two different values; the message counts such keys and
            their rows but names none (a file name can carry a patient's name).
    """
    labels: dict[str, str] = {}
    conflicting: dict[str, int] = defaultdict(int)
    for key, label in pairs:
        if not key:
            continue
        if key in labels and labels[key] != label:
            conflicting[key] += 1
        labels.setdefault(key, label)
    if conflicting:
        rows = sum(conflicting.values()) + len(conflicting)
        raise MedtransferError(
            f"The labels CSV {csv_path} gives {len(conflicting)} {column} value(s) conflicting "
            f"{what} ({rows} distinct rows); the right one cannot be chosen. Keep one "
            f"{what[:-1]} per file and ingest again."
        )
    return labels
