"""Patient identities as salted hashes: what keeps one patient in one split without storing who.

A file's patient key (:func:`tasks.data.dicom_read.patient_key`) is only ever written as
:func:`salted_hash` of it, under a secret salt kept outside the repository (:func:`patient_salt`).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

SALT_ENV = "MEDTRANSFER_PATIENT_SALT"

SALT_FILE = Path("data/.patient_salt")


def patient_salt() -> str:
    """The secret salt for patient hashes: ``$MEDTRANSFER_PATIENT_SALT``, else a local file.

    The file (``data/.patient_salt``, never committed) is created with a random value on first
    use, so hashes are stable on one machine but cannot be reversed by whoever reads the repo.
    """
    from_env = os.environ.get(SALT_ENV)
    if from_env:
        return from_env
    if not SALT_FILE.is_file():
        SALT_FILE.parent.mkdir(parents=True, exist_ok=True)
        SALT_FILE.write_text(secrets.token_hex(16))
    return SALT_FILE.read_text().strip()


def salted_hash(salt: str, value: str) -> str:
    """The first 16 hex digits of SHA-256 over ``salt``, a NUL and ``value``."""
    return hashlib.sha256(f"{salt}\x00{value}".encode()).hexdigest()[:16]
