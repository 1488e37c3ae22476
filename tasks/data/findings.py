"""Several findings per image, read from a labels table: the two public layouts.

- **One column per finding** (CheXpert's ``train.csv``): each finding's cell is ``1``
  (present), ``0`` (absent), ``-1`` (uncertain) or blank (not mentioned by the report
  labeller, so absent, as the CheXpert authors count it). Uncertain cells follow a declared
  policy, the three of the CheXpert paper: ``ignore`` (unknown, left out of that finding's loss
  and figures), ``zeros`` (absent) or ``ones`` (present).
- **One findings column** (ChestX-ray14's ``Data_Entry_2017.csv``, ``Finding Labels``):
  finding names joined by ``|``, or ``No Finding`` alone; the findings are every name seen.

Both give labels ``(N, K)`` float32 (1, 0, NaN unknown) and the ``K`` finding names. A table
that says something else is refused with one line naming the column and what to fix, never
quoting a cell (a misaligned row can carry a patient's name into a finding column).

:func:`read_findings_source` reads a folder's labels CSV in the layout ``data.findings`` /
``data.findings_column`` name into the same :class:`~tasks.data.labels.LabelSource` a
single-label CSV gives (its rows keyed by file, its optional patient column), each file's label
being its findings written as one string (:func:`findings_label`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.config import UNCERTAIN_POLICIES, DataParams
from tasks.data.labels import LabelSource, find_csv, read_table, source_from_table
from tasks.errors import MedtransferError

NO_FINDING = "No Finding"
SEPARATOR = "|"
# What an uncertain cell becomes under each policy (NaN: unknown).
_UNCERTAIN_VALUE = {"ignore": np.nan, "zeros": 0.0, "ones": 1.0}
# The file and patient columns by their plain names or the public layouts' own (CheXpert's
# ``Path``, ChestX-ray14's ``Image Index`` and ``Patient ID``), in the order tried.
FILE_COLUMNS = ("path", "Path", "Image Index")
PATIENT_COLUMNS = ("patient", "Patient ID")


@dataclass(frozen=True)
class Findings:
    """The findings of a table's rows: ``labels`` ``(N, K)`` float32 (1 present, 0 absent,
    NaN unknown) in the order of ``names``, and how many cells the uncertain policy decided."""

    names: tuple[str, ...]
    labels: np.ndarray
    uncertain_cells: int = 0


def from_finding_columns(
    table: pd.DataFrame, columns: Sequence[str], policy: str, where: str
) -> Findings:
    """CheXpert's layout: one 0/1/-1/blank column per finding.

    Args:
        table: the labels table; columns: its finding columns, in output order.
        policy: what an uncertain (-1) cell becomes: one of :data:`UNCERTAIN_POLICIES`.
        where: the table's name for messages (e.g. the CSV path).

    Raises:
        MedtransferError: an unknown policy, a missing column, or a cell that is not
            1, 0, -1 or blank (the message counts them by column and names the first row).
    """
    if policy not in UNCERTAIN_POLICIES:
        raise MedtransferError(
            f"data.uncertain must be one of {UNCERTAIN_POLICIES}, not {policy!r}."
        )
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise MedtransferError(
            f"{where} lacks the finding column(s) {missing}; name columns it has."
        )
    _refuse_case_variants(where, list(columns))
    labels = np.empty((len(table), len(columns)), dtype=np.float32)
    uncertain = 0
    for k, column in enumerate(columns):
        values = _finding_values(table[column], column, where)
        uncertain += int((values == -1).sum())
        values = np.where(np.isnan(values), 0.0, values)  # blank: not mentioned, absent
        labels[:, k] = np.where(values == -1, _UNCERTAIN_VALUE[policy], values)
    return Findings(tuple(str(c) for c in columns), labels, uncertain)


def from_findings_list(table: pd.DataFrame, column: str, where: str) -> Findings:
    """ChestX-ray14's layout: one column of ``|``-joined finding names or ``No Finding``.

    The findings are every name the column uses (``No Finding`` excepted), sorted; a row
    holds 1 for its names and 0 for the others.

    Raises:
        MedtransferError: a missing column, an empty cell, ``No Finding`` beside a finding,
            or a finding spelled in two cases.
    """
    if column not in table.columns:
        raise MedtransferError(f"{where} has no column {column!r} of findings.")
    cells = table[column]
    empty = cells.isna() | (cells.astype(str).str.strip() == "")
    if empty.any():
        raise MedtransferError(
            f"{where}: {int(empty.sum())} row(s) have an empty {column!r} (first: line "
            f"{int(np.flatnonzero(empty)[0]) + 2}); write {NO_FINDING!r} for an image "
            "without findings."
        )
    rows = [[name.strip() for name in str(cell).split(SEPARATOR) if name.strip()] for cell in cells]
    contradictory = [i for i, names in enumerate(rows) if NO_FINDING in names and len(names) > 1]
    if contradictory:
        raise MedtransferError(
            f"{where}: {len(contradictory)} row(s) list {NO_FINDING!r} beside a finding (first: "
            f"line {contradictory[0] + 2}); a row is either {NO_FINDING!r} or its findings."
        )
    names = sorted({name for row in rows for name in row} - {NO_FINDING})
    _refuse_case_variants(where, names)
    if not names:
        raise MedtransferError(f"{where}: every row is {NO_FINDING!r}; there is nothing to learn.")
    index = {name: k for k, name in enumerate(names)}
    labels = np.zeros((len(rows), len(names)), dtype=np.float32)
    for i, row in enumerate(rows):
        for name in row:
            if name != NO_FINDING:
                labels[i, index[name]] = 1.0
    return Findings(tuple(names), labels)


def _finding_values(cells: pd.Series, column: str, where: str) -> np.ndarray:
    """A finding column as float64 ``(N,)``: 1, 0, -1, NaN for blank.

    Raises:
        MedtransferError: a cell that is none of these (counted, first row named, not quoted).
    """
    text = cells.astype(str).str.strip()
    blank = cells.isna() | (text == "")
    numbers = pd.to_numeric(text.where(~blank), errors="coerce")
    bad = ~blank & ~numbers.isin([1, 0, -1])
    if bad.any():
        raise MedtransferError(
            f"{where}: finding column {column!r} has {int(bad.sum())} cell(s) that are not 1, "
            f"0, -1 or blank (first: line {int(np.flatnonzero(bad)[0]) + 2}); write 1 for "
            "present, 0 for absent, -1 for uncertain and leave unmentioned findings blank."
        )
    return numbers.to_numpy(dtype=np.float64)


def _refuse_case_variants(where: str, names: list[str]) -> None:
    """Refuse finding names that differ only in case: two columns of one finding."""
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(str(name).casefold(), str(name))
        if other != name:
            raise MedtransferError(
                f"{where} names the finding {other!r} also as {name!r}; spell each finding one way."
            )


def findings_label(vector: np.ndarray, names: Sequence[str]) -> str:
    """One image's findings as one string (its manifest ``label``, part of the dataset's
    content digest): the present findings joined by ``|``, then each unknown one with a ``?``
    (``Edema|Mass?``); empty for none. Two policies that label an image differently thus give
    two datasets."""
    present = [str(n) for n, v in zip(names, vector, strict=True) if v == 1]
    unknown = [f"{n}?" for n, v in zip(names, vector, strict=True) if np.isnan(v)]
    return SEPARATOR.join(present + unknown)


def read_findings_source(folder: Path, data: DataParams) -> LabelSource:
    """The labels of ``folder``'s files from ``data.labels_csv`` in the multi-label layout
    ``data.findings`` (one column per finding, uncertain cells by ``data.uncertain``) or
    ``data.findings_column`` names.

    The file column is ``path`` (or ``Path``, ``Image Index``), relative to ``folder``, or
    ``SOPInstanceUID``; the optional patient column ``patient`` (or ``Patient ID``).

    Raises:
        MedtransferError: the CSV is missing or unreadable, has no file column or two, or a
            finding cell is refused (:func:`from_finding_columns`, :func:`from_findings_list`).
    """
    csv_path = find_csv(folder, data.labels_csv)
    table = read_table(csv_path)
    table.columns = [str(name).strip() for name in table.columns]
    columns = {
        **_one_of(table, FILE_COLUMNS, "path", csv_path),
        **_one_of(table, PATIENT_COLUMNS, "patient", csv_path),
        **({"SOPInstanceUID": "SOPInstanceUID"} if "SOPInstanceUID" in table.columns else {}),
    }
    if not ({"path", "SOPInstanceUID"} & set(columns)):
        raise MedtransferError(
            f"The labels CSV {csv_path} has no file column; it needs one of "
            f"{[*FILE_COLUMNS, 'SOPInstanceUID']} naming each image."
        )
    where = str(csv_path)
    found = (
        from_finding_columns(table, data.findings, data.uncertain, where)
        if data.findings is not None
        else from_findings_list(table, str(data.findings_column), where)
    )
    labels = [findings_label(row, found.names) for row in found.labels]
    source = source_from_table(
        csv_path, table, columns, pd.Series(labels, dtype=str), pd.Series([True] * len(labels)),
        patient_pattern=data.patient_from_path,
    )  # fmt: skip
    source.findings = found.names
    source.vectors = dict(zip(labels, found.labels, strict=True))
    return source


def _one_of(table: pd.DataFrame, names: Sequence[str], role: str, csv_path: Path) -> dict:
    """``{role: column}`` for the one column of ``names`` the table has; {} for none.

    Raises:
        MedtransferError: the table has two of them (which one is meant is unknown).
    """
    present = [name for name in names if name in table.columns]
    if len(present) > 1:
        raise MedtransferError(
            f"The labels CSV {csv_path} has the columns {present}, each of which can be the "
            f"{role} column; keep one of them."
        )
    return {role: present[0]} if present else {}
