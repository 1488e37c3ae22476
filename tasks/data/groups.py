"""Grouping attributes of an image: where the figures are broken down (scanner, view, site).

At ingestion every image gets a few non-identifying attributes read from its DICOM header
(:data:`HEADER_ATTRIBUTES`: manufacturer, scanner model, view, body part), the site the user
names (``data.site``), and, only when ``eval.groups`` lists them, sex and a 20-year age band
(:data:`SENSITIVE`). They are stored as ``group_<name>`` columns of ``manifest.csv``: no patient
identifier, no date, no free text beyond the device's own names. An attribute a file does not
carry is :data:`UNKNOWN`, never an error; a ``.npz`` has no headers, so all are unknown.

Evaluation (:mod:`tasks.evaluation.group_metrics`) reports every figure per group of the
attributes ``eval.groups`` lists.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from pydicom.dataset import Dataset

UNKNOWN = "unknown"
COLUMN_PREFIX = "group_"
# name -> DICOM keyword; always recorded (device and acquisition, not the patient)
HEADER_ATTRIBUTES: dict[str, str] = {
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
    "view": "ViewPosition",
    "body_part": "BodyPartExamined",
}
SITE = "site"  # data.site: the user's name for where the folder comes from
# About the patient: recorded only when eval.groups lists them.
SENSITIVE: dict[str, str] = {"sex": "PatientSex", "age_band": "PatientAge"}
ATTRIBUTES = (*HEADER_ATTRIBUTES, SITE, *SENSITIVE)
AGE_BAND_YEARS = 20
MAX_VALUE_CHARS = 64
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]+")
_AGE = re.compile(r"^(\d{1,3})([DWMY])$")


def column(name: str) -> str:
    """The manifest column of attribute ``name``: ``group_<name>``."""
    return COLUMN_PREFIX + name


def recorded(groups: Iterable[str], site: str | None) -> tuple[str, ...]:
    """The attributes ingestion records: the header ones, the site when ``site`` is named,
    and the sensitive ones that ``groups`` (``eval.groups``) lists, in :data:`ATTRIBUTES`
    order."""
    wanted = set(groups)
    return tuple(
        name
        for name in ATTRIBUTES
        if name in HEADER_ATTRIBUTES
        or (name == SITE and site)
        or (name in SENSITIVE and name in wanted)
    )


def header_groups(ds: Dataset) -> dict[str, str]:
    """Every header attribute of :data:`HEADER_ATTRIBUTES` and :data:`SENSITIVE` from ``ds``
    (which to keep is decided by :func:`keep`); a missing or unreadable one is ``unknown``."""
    values = {name: _text(ds, keyword) for name, keyword in HEADER_ATTRIBUTES.items()}
    sex = _text(ds, "PatientSex")
    values["sex"] = sex.upper() if sex != UNKNOWN else UNKNOWN
    values["age_band"] = age_band(_text(ds, "PatientAge"))
    return values


def keep(values: Mapping[str, str], names: Iterable[str], site: str | None) -> dict[str, str]:
    """The manifest columns ``{group_<name>: value}`` of ``names`` (from :func:`recorded`):
    ``values`` from :func:`header_groups` (empty for a source without headers), the site's
    name, ``unknown`` for anything missing."""
    row = {}
    for name in names:
        value = site if name == SITE else values.get(name)
        row[column(name)] = value or UNKNOWN
    return row


def age_band(text: str) -> str:
    """A DICOM Age String (``045Y``, ``006M``) as a 20-year band (``40-59``); ``unknown``
    when absent or malformed. Days, weeks and months are under a year: ``0-19``."""
    match = _AGE.match(text)
    if not match:
        return UNKNOWN
    years = int(match.group(1)) if match.group(2) == "Y" else 0
    low = (years // AGE_BAND_YEARS) * AGE_BAND_YEARS
    return f"{low}-{low + AGE_BAND_YEARS - 1}"


def _text(ds: Dataset, keyword: str) -> str:
    """The value of ``keyword`` as short printable text, or ``unknown``. Never raises: a
    malformed element is as good as a missing one."""
    try:
        value = ds.get(keyword, None)
        text = "" if value is None else str(value)
    except Exception:  # a malformed value that pydicom cannot convert
        return UNKNOWN
    text = _UNPRINTABLE.sub(" ", text).strip()[:MAX_VALUE_CHARS].strip()
    return text or UNKNOWN
