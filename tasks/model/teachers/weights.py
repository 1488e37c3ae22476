"""Teacher weights: find the file, check its pinned SHA-256, read it safely, load it strictly.

A bundled file must carry the SHA-256 medtransfer pins; a user's own file has its hash recorded,
not checked. Files are read with ``torch.load(weights_only=True)`` (no arbitrary unpickling),
and every failure is one line saying what was wrong and what to do.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from tasks.digest import file_sha256
from tasks.errors import MedtransferError
from tasks.model.teachers._contract import TeacherSpec, WeightsFile
from tasks.model.teachers._registry import get_teacher


def resolve_weights(
    teacher: str | TeacherSpec, weights_path: str | Path | None = None
) -> WeightsFile:
    """Choose the weights file for a teacher and hash it.

    A ``weights_path`` wins and is accepted with whatever hash it has (recorded, not checked).
    Otherwise the teacher's bundled file is located and must match its pinned SHA-256.

    Raises:
        MedtransferError: missing file, bundled package not installed, pinned hash mismatch,
            or a teacher without bundled weights and no ``weights_path``.
    """
    spec = get_teacher(teacher)
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise MedtransferError(
                f"No weights file at {path} for teacher {spec.name!r}. Check the path, or leave "
                "it unset to use the bundled weights."
            )
        return WeightsFile(path=path, sha256=file_sha256(path), pinned=False)
    pinned = spec.bundled_weights
    if pinned is None:
        raise MedtransferError(
            f"Teacher {spec.name!r} ships no weights; pass a weights file (weights_path)."
        )
    try:
        path = Path(pinned.locate())
    except ImportError as err:
        raise MedtransferError(
            f"The weights of teacher {spec.name!r} are not installed ({err}). "
            f"Install them with `{pinned.install_hint}`."
        ) from err
    if not path.is_file():
        raise MedtransferError(
            f"The bundled weights of teacher {spec.name!r} are missing at {path}. "
            f"Reinstall them with `{pinned.install_hint}`."
        )
    actual = file_sha256(path)
    if actual != pinned.sha256:
        raise MedtransferError(
            f"The weights file {path} of teacher {spec.name!r} has SHA-256 {actual}, but "
            f"medtransfer pins {pinned.sha256}: the file is damaged or a different release. "
            f"Reinstall it with `{pinned.install_hint}`, or pass your own file as weights_path "
            "(its hash is then recorded, not checked)."
        )
    return WeightsFile(path=path, sha256=actual, pinned=True)


def weights_sha256(teacher: str | TeacherSpec, weights_path: str | Path | None = None) -> str:
    """SHA-256 of the weights file :func:`build_teacher` would load (log it with every run)."""
    return resolve_weights(teacher, weights_path).sha256


def _first_line(err: Exception, limit: int = 120) -> str:
    """The error's type and the first line of its text, at most ``limit`` characters: torch's
    unpickling errors run over many lines of advice that do not fit a one-line answer."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_state_dict(weights: WeightsFile) -> dict[str, torch.Tensor]:
    """Read a weights file with ``torch.load(weights_only=True)`` (no arbitrary unpickling).

    The bytes are read once, hashed again and loaded from memory, so what is loaded is exactly
    what carries ``weights.sha256``. A checkpoint ``{"state_dict": {...}}`` is unwrapped.

    Raises:
        MedtransferError: when the file changed since it was hashed, or is not a plain tensor
            state dict.
    """
    payload = weights.path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != weights.sha256:
        raise MedtransferError(
            f"{weights.path} changed after its SHA-256 was checked; is something writing to it?"
        )
    try:
        loaded = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        raise MedtransferError(
            f"Cannot read {weights.path} as PyTorch weights with weights_only=True "
            f"({_first_line(err)}). Save the network's state_dict "
            "(torch.save(model.state_dict(), path)), not the pickled model."
        ) from err
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise MedtransferError(
            f"{weights.path} does not hold a state dict (a mapping of names to tensors)."
        )
    return dict(loaded)


def load_weights(
    spec: TeacherSpec, network: nn.Module, state_dict: Mapping[str, torch.Tensor]
) -> None:
    """Load ``state_dict`` into ``network`` strictly, after the teacher's key conversion.

    Raises:
        MedtransferError: when keys or shapes do not match the architecture, naming a few.
    """
    converted = spec.convert_state_dict(network, state_dict)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    mismatched = sorted(
        key for key in set(expected) & set(converted) if expected[key].shape != converted[key].shape
    )
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            )
            if keys
        )
        raise MedtransferError(
            f"The weights do not fit teacher {spec.name!r} ({details}). Use weights saved from "
            f"the same architecture."
        )
    network.load_state_dict(converted, strict=True)
