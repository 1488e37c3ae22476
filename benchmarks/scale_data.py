"""A large synthetic DICOM folder for the scale benchmark: ``n`` small files, mixed transfer syntaxes.

Writing 100,000 files one by one through pydicom costs minutes of CPU on a shared machine, so
the generator encodes a small pool of template files once (``TEMPLATES_PER_SYNTAX`` images for
each transfer syntax in :data:`SYNTAXES`) and then writes each file as a copy of a template
whose fixed-width placeholders (SOP Instance UID, Patient ID) are replaced byte for byte: every
file is a valid, distinct DICOM instance (unique UID, so none is quarantined as a duplicate) of
``size`` x ``size`` 16-bit pixels, one patient per :data:`FILES_PER_PATIENT` files.

Layout: ``<out>/dicom/<label>/<NNN>/<NNNNNNN>.dcm`` with the label (``normal``, ``opacity``) as the
first-level folder (``data.labels_csv: null``), 1,000 files per second-level folder.
A finished set has ``<out>/generator.json`` (written last, outside the DICOM folder); a
matching one is reused.

Usage: ``python -m benchmarks.scale_data OUT --n 100000``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    RLELossless,
    JPEGLSLossless,
    JPEG2000Lossless,
)
TEMPLATES_PER_SYNTAX = 8
FILES_PER_PATIENT = 4
FILES_PER_FOLDER = 1000
LABELS = ("normal", "opacity")
UID_ROOT = "1.2.826.0.1.3680043.8.498.77."  # pydicom's root, then a fixed-width counter
PATIENT_DIGITS = 10
UID_DIGITS = 12
PATIENT_PREFIX = "SYN"
MANIFEST = "generator.json"


def _placeholder_uid(template: int) -> str:
    return f"{UID_ROOT}{'9' * (UID_DIGITS - 3)}{template:03d}"


def _placeholder_patient(template: int) -> str:
    return f"{PATIENT_PREFIX}{'9' * (PATIENT_DIGITS - 3)}{template:03d}"


def _template(syntax: str, index: int, size: int, rng: np.random.Generator) -> bytes:
    """One encoded file whose UID and Patient ID are placeholders unique to ``index``."""
    yy, xx = np.mgrid[0:size, 0:size]
    scene = 2000 + 800 * np.sin(xx / (3 + index % 5)) * np.cos(yy / (4 + index % 7))
    pixels = np.clip(scene + rng.normal(0, 60, (size, size)), 0, 4095).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    uid = _placeholder_uid(index)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = uid
    ds.PatientID = _placeholder_patient(index)
    ds.Modality = "CR"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, generate_instance_uid=False)
    from io import BytesIO

    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def templates(size: int, seed: int = 0) -> list[tuple[bytes, bytes, bytes]]:
    """``(file bytes, UID placeholder, Patient ID placeholder)`` per template. Deflated files
    compress the dataset itself, so their placeholders are not in the bytes: they are encoded
    once per file instead (see :func:`_file_bytes`)."""
    rng = np.random.default_rng(seed)
    out = []
    for s, syntax in enumerate(SYNTAXES):
        for t in range(TEMPLATES_PER_SYNTAX):
            index = s * TEMPLATES_PER_SYNTAX + t
            data = _template(syntax, index, size, rng)
            out.append(
                (data, _placeholder_uid(index).encode(), _placeholder_patient(index).encode())
            )
    return out


def _file_bytes(template: tuple[bytes, bytes, bytes], number: int) -> bytes:
    """Template bytes with this file's UID and patient (same widths as the placeholders)."""
    data, uid, patient = template
    if patient not in data:  # deflated: re-encode this file's dataset through pydicom
        from io import BytesIO

        from pydicom import dcmread

        ds = dcmread(BytesIO(data))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(number)
        ds.PatientID = _patient(number)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return buffer.getvalue()
    return data.replace(uid, _uid(number).encode()).replace(patient, _patient(number).encode())


def _uid(number: int) -> str:
    return f"{UID_ROOT}1{number:0{UID_DIGITS - 1}d}"  # no leading zero in a UID component


def _patient(number: int) -> str:
    return f"{PATIENT_PREFIX}{number // FILES_PER_PATIENT:0{PATIENT_DIGITS}d}"


def generate(out: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` files under ``out/dicom`` (reused when the manifest matches); returns that
    folder (``data.source``)."""
    record = {"n": n, "size": size, "seed": seed, "syntaxes": list(SYNTAXES)}
    manifest = out / MANIFEST
    folder = out / "dicom"
    if manifest.is_file() and json.loads(manifest.read_text()) == record:
        return folder
    shutil.rmtree(out, ignore_errors=True)
    pool = templates(size, seed)
    for number in range(n):
        label = LABELS[(number // FILES_PER_PATIENT) % 2]
        path = folder / label / f"{number // FILES_PER_FOLDER:03d}" / f"{number:07d}.dcm"
        if number % FILES_PER_FOLDER == 0 or not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_file_bytes(pool[number % len(pool)], number))
    manifest.write_text(json.dumps(record))  # last: a folder with it is complete
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    started = time.monotonic()
    folder = generate(args.out, args.n, args.size)
    print(f"{args.n} files in {time.monotonic() - started:.1f} s -> {folder}")


if __name__ == "__main__":
    main()
