"""The embedded default data set: synthetic chest radiographs written as real DICOM files.

Each patient has a few images of a chest-like scene (body outline, two dark lung fields,
mediastinum, curved rib bands, soft texture, quantum noise). Patients labelled ``opacity``
carry one faint Gaussian opacity inside a lung field on every image; ``normal`` patients do
not. The opacity is a few percent of the local intensity, so the label is learnable but not
obvious, which is where an ImageNet teacher's texture features help.

The files exercise the decoder: CR and DX modalities, 12/14/16-bit stored values with Rescale
Slope/Intercept and a window, some MONOCHROME1, some RLE Lossless, a few multi-frame. Output is
deterministic for a given configuration: same seed, same bytes.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from scipy.ndimage import gaussian_filter

from tasks import atomic
from tasks.config import Params
from tasks.digest import file_sha256

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
LABEL_NAMES = ("normal", "opacity")
DICOM_SUBDIR = "dicom"
LABELS_FILE = "labels.csv"
FINGERPRINT_FILE = "generator.json"
# Bumped when the files' layout changes, so a set written by an older layout is regenerated.
LAYOUT_VERSION = 3  # 3: Manufacturer and ManufacturerModelName (two scanners)
# Patients alternate between these scanners (index even: A, odd: B); the second's opacity has
# synthetic.second_scanner_contrast of the lesion contrast.
SCANNERS = (("SynthScan-A", "A100"), ("SynthScan-B", "B200"))
SHORTHAND = "synthetic"


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate: the ``synthetic`` section of ``params.yaml`` plus the global seed."""

    output_dir: str
    n_patients: int
    images_per_patient_min: int
    images_per_patient_max: int
    size: int
    positive_fraction: float
    lesion_contrast: float
    rle_fraction: float
    monochrome1_fraction: float
    multiframe_fraction: float
    second_scanner_contrast: float
    seed: int
    # Not a parameter: every synthetic set mixes these Bits Stored values on purpose.
    bits_stored_choices: tuple[int, ...] = (12, 14, 16)

    @classmethod
    def from_params(cls, params: Params) -> SyntheticConfig:
        """The generator's settings from the typed configuration."""
        return cls(**asdict(params.synthetic), seed=params.seed)


@dataclass(frozen=True)
class SyntheticPatient:
    """Identity of one synthetic patient (fake, but shaped like real PHI to test stripping)."""

    index: int
    patient_id: str
    patient_name: str
    birth_date: str
    label: int


def generate(config: SyntheticConfig) -> tuple[Path, Path]:
    """Write the synthetic DICOM set and its ``labels.csv`` unless an identical one exists.

    The whole set is written into a staging folder beside ``output_dir``, its manifest
    (``generator.json``) last, and then swapped in (:mod:`tasks.atomic`): a run killed at any
    point leaves the previous set, with its own manifest, or the new one, never new files
    under an old manifest. An existing set is reused only when its manifest names this exact
    configuration and its labels and file count still match it.

    Args:
        config: what to generate.

    Returns:
        ``(dicom_dir, labels_csv)``: the folder of ``case_NNNN/img_K.dcm`` files and the CSV
        inside it (``path`` relative to that folder, ``label``), so the folder is the whole
        labelled data set, versioned as one DVC dependency. Beside the folder,
        ``generator.json`` records the configuration that produced them.
    """
    out = Path(config.output_dir)
    dicom_dir = source_folder(config)
    atomic.recover_folder(out)
    if _manifest_matches(out, config):
        return dicom_dir, dicom_dir / LABELS_FILE

    staging = atomic.new_staging_folder(out)
    try:
        files = _write_set(config, staging / DICOM_SUBDIR)
        manifest = {
            "config": _config_record(config),
            "files": files,
            "labels_sha256": file_sha256(staging / DICOM_SUBDIR / LABELS_FILE),
        }
        # Last: a folder with a manifest is a complete folder.
        (staging / FINGERPRINT_FILE).write_text(json.dumps(manifest, sort_keys=True) + "\n")
        atomic.swap_in_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dicom_dir, dicom_dir / LABELS_FILE


def _write_set(config: SyntheticConfig, dicom_dir: Path) -> int:
    """Write every patient's DICOM files and ``labels.csv`` into ``dicom_dir``; returns the
    number of DICOM files."""
    rows: list[tuple[str, str]] = []
    for patient in make_patients(config):
        rng = np.random.default_rng([config.seed, patient.index])
        n_images = int(
            rng.integers(config.images_per_patient_min, config.images_per_patient_max + 1)
        )
        for image_index in range(n_images):
            ds = make_dataset(config, patient, image_index)
            relative = f"case_{patient.index:04d}/img_{image_index}.dcm"
            (dicom_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(dicom_dir / relative, enforce_file_format=True)
            rows.append((relative, LABEL_NAMES[patient.label]))

    with open(dicom_dir / LABELS_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


def _config_record(config: SyntheticConfig) -> dict:
    """The configuration as the manifest records it (JSON types, with the layout version)."""
    return json.loads(json.dumps({**asdict(config), "layout": LAYOUT_VERSION}))


def _manifest_matches(out: Path, config: SyntheticConfig) -> bool:
    """Whether ``out`` holds a complete set generated with exactly ``config``: its manifest
    names ``config``, its ``labels.csv`` has the recorded hash and the DICOM file count is
    the recorded one. A set from an older layout, edited or half-deleted fails the check."""
    try:
        manifest = json.loads((out / FINGERPRINT_FILE).read_text())
        labels_csv = out / DICOM_SUBDIR / LABELS_FILE
        return (
            isinstance(manifest, dict)
            and manifest.get("config") == _config_record(config)
            and manifest.get("labels_sha256") == file_sha256(labels_csv)
            and manifest.get("files") == sum(1 for _ in (out / DICOM_SUBDIR).rglob("*.dcm"))
        )
    except (OSError, ValueError):
        return False


def source_folder(config: SyntheticConfig) -> Path:
    """The folder ``generate`` writes the DICOM files and ``labels.csv`` to:
    ``<output_dir>/dicom`` (the shipped ``data.source``)."""
    return Path(config.output_dir) / DICOM_SUBDIR


def is_synthetic_source(source: str, config: SyntheticConfig) -> bool:
    """Whether ``data.source`` names the synthetic set: the shorthand ``synthetic`` or the
    generator's own folder (:func:`source_folder`), however the path is spelled."""
    if source == SHORTHAND:
        return True
    return Path(source).resolve() == source_folder(config).resolve()


def make_patients(config: SyntheticConfig) -> list[SyntheticPatient]:
    """The patient list: exactly ``round(n * positive_fraction)`` positives, seeded order."""
    rng = np.random.default_rng([config.seed, 10_000_019])
    n_positive = round(config.n_patients * config.positive_fraction)
    labels = np.zeros(config.n_patients, dtype=int)
    labels[rng.permutation(config.n_patients)[:n_positive]] = 1
    patients = []
    for index in range(config.n_patients):
        year, day = int(rng.integers(1930, 2005)), int(rng.integers(1, 28))
        patients.append(
            SyntheticPatient(
                index=index,
                patient_id=f"MT{int(rng.integers(10**7, 10**8))}",
                patient_name=f"DOE^JANE{index:04d}",
                birth_date=f"{year}0{int(rng.integers(1, 10))}{day:02d}",
                label=int(labels[index]),
            )
        )
    return patients


def chest_scene(size: int, rng: np.random.Generator, lesion_contrast: float | None) -> np.ndarray:
    """One chest-like display image, float32 in [0, 1] (bright = dense).

    Args:
        size: side in pixels.
        rng: randomness for anatomy jitter, texture, lesion placement.
        lesion_contrast: peak opacity relative to local brightness; None for a normal image.
    """
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    jitter = rng.uniform(0.93, 1.07, size=6).astype(np.float32)
    body = _soft_ellipse(x, y, 0, 0.05, 0.92 * jitter[0], 0.97, 0.04)
    lungs = np.maximum(
        _soft_ellipse(x, y, -0.42 * jitter[1], -0.05, 0.27 * jitter[2], 0.58, 0.08),
        _soft_ellipse(x, y, 0.42 * jitter[3], -0.05, 0.27 * jitter[4], 0.58, 0.08),
    )
    mediastinum = _soft_ellipse(x, y, 0, 0.15, 0.14 * jitter[5], 0.75, 0.1)
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (4.5 * y + 0.9 * x**2) + phase)
    scene = 0.08 + 0.5 * body - 0.27 * lungs + 0.2 * mediastinum + 0.07 * ribs * lungs
    texture = gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 40)
    scene += 0.25 * texture * body

    if lesion_contrast is not None:
        side = rng.choice([-1.0, 1.0])
        cx, cy = side * rng.uniform(0.3, 0.52), rng.uniform(-0.45, 0.35)
        sigma = rng.uniform(0.06, 0.12)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        scene += lesion_contrast * blob * np.maximum(scene, 0.2)

    scene += 0.01 * rng.standard_normal((size, size)).astype(np.float32)
    return np.clip(scene, 0.0, 1.0).astype(np.float32)


# The classes of :func:`write_three_class_npz`, by label value.
THREE_CLASS_NAMES = ("normal", "opacity-left", "opacity-right")


def write_three_class_npz(
    path: Path, split_sizes: dict[str, int], size: int, seed: int, contrast: float = 0.8
) -> Path:
    """A MedMNIST-layout ``.npz`` of three classes of chest scenes (the many-classes check):
    label 0 without an opacity, 1 with one in the left half of the image, 2 in the right half
    (a scene whose opacity fell on the other side is mirrored). Classes cycle 0, 1, 2 within
    each split; ``{split}_images`` uint8 ``(n, size, size)``, ``{split}_labels`` ``(n, 1)``.
    Same arguments, same bytes."""
    rng = np.random.default_rng([seed, 3])
    arrays = {}
    for split, n in split_sizes.items():
        labels = np.arange(n) % 3
        images = []
        for label in labels:
            scene = chest_scene(size, rng, None if label == 0 else contrast)
            left_heavier = scene[:, : size // 2].sum() > scene[:, size // 2 :].sum()
            if label and left_heavier != (label == 1):
                scene = scene[:, ::-1]
            images.append(np.rint(scene * 255).astype(np.uint8))
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = labels[:, None].astype(np.uint8)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


# The findings of :func:`write_multi_finding_npz`, in label-column order.
FINDING_NAMES = ("opacity-left", "opacity-right", "basal-band")


def write_multi_finding_npz(
    path: Path,
    split_sizes: dict[str, int],
    size: int,
    seed: int,
    n_findings: int = 3,
    contrast: float = 0.8,
    prevalence: float = 0.4,
) -> Path:
    """A ChestMNIST-layout ``.npz`` of chest scenes with several independent findings (the
    multi-label check): the first ``n_findings`` (2 or 3) of :data:`FINDING_NAMES`, each
    present with probability ``prevalence`` on its own: an opacity in the image's left half,
    one in its right half, a bright band across the lung bases. ``{split}_images`` uint8
    ``(n, size, size)``, ``{split}_labels`` uint8 ``(n, n_findings)``, ``findings`` their
    names. Same arguments, same bytes."""
    if n_findings not in (2, 3):
        raise ValueError(f"n_findings must be 2 or 3, not {n_findings}")
    rng = np.random.default_rng([seed, 5])
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j].astype(np.float32)
    arrays: dict[str, np.ndarray] = {"findings": np.array(FINDING_NAMES[:n_findings])}
    for split, n in split_sizes.items():
        labels = (rng.random((n, n_findings)) < prevalence).astype(np.uint8)
        images = []
        for row in labels:
            scene = chest_scene(size, rng, None)
            base = np.maximum(scene, 0.2)
            for side, present in zip((-1.0, 1.0), row[:2], strict=True):
                if present:
                    cx, cy = side * rng.uniform(0.3, 0.5), rng.uniform(-0.4, 0.2)
                    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * 0.09**2))
                    scene = scene + contrast * blob * base
            if n_findings == 3 and row[2]:
                band = np.exp(-((y - 0.5) ** 2) / (2 * 0.06**2)) * (np.abs(x) < 0.7)
                scene = scene + 0.6 * contrast * band * base
            images.append(np.rint(np.clip(scene, 0, 1) * 255).astype(np.uint8))
        arrays[f"{split}_images"] = np.stack(images)
        arrays[f"{split}_labels"] = labels
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def make_dataset(config: SyntheticConfig, patient: SyntheticPatient, image_index: int) -> Dataset:
    """Build one DICOM dataset (header plus pixel data) for a patient's ``image_index``-th image."""
    rng = np.random.default_rng([config.seed, patient.index, image_index])
    multiframe = rng.random() < config.multiframe_fraction
    monochrome1 = rng.random() < config.monochrome1_fraction
    rle = rng.random() < config.rle_fraction
    bits = int(rng.choice(config.bits_stored_choices))
    slope = float(rng.choice([0.5, 1.0, 2.0]))
    intercept = float(rng.choice([0.0, -1024.0]))
    contrast = scanner_contrast(config, patient) if patient.label == 1 else None
    stored = _stored_frames(config.size, rng, contrast, 3 if multiframe else 1, bits, monochrome1)
    if not multiframe:
        stored = stored[0]
    modality = "CR" if rng.random() < 0.5 else "DX"  # drawn after the pixels: same files as ever
    ds = _header(config, patient, image_index, modality)
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    center, width = _window(bits, monochrome1, slope, intercept)
    ds.WindowCenter = f"{center:.2f}"
    ds.WindowWidth = f"{width:.2f}"
    ds.set_pixel_data(
        stored,
        photometric_interpretation="MONOCHROME1" if monochrome1 else "MONOCHROME2",
        bits_stored=bits,
        generate_instance_uid=False,
    )
    if multiframe:
        ds.NumberOfFrames = stored.shape[0]
    if rle:
        ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def scanner_contrast(config: SyntheticConfig, patient: SyntheticPatient) -> float:
    """The opacity's contrast on ``patient``'s scanner (:data:`SCANNERS`): ``lesion_contrast``,
    times ``second_scanner_contrast`` on the second. Drawn from no random stream, so a set at
    the default 1.0 has the same pixels as before the scanners existed."""
    factor = config.second_scanner_contrast if patient.index % 2 else 1.0
    return config.lesion_contrast * factor


def _stored_frames(
    size: int,
    rng: np.random.Generator,
    contrast: float | None,
    n_frames: int,
    bits: int,
    monochrome1: bool,
) -> np.ndarray:
    """uint16 stored values ``(n_frames, size, size)`` of one acquisition: frames share the
    anatomy and the opacity, but not the noise; values use ~90% of the bit depth, and
    MONOCHROME1 stores the inverted scene."""
    scene = chest_scene(size, rng, contrast)
    noise = 0.004 * rng.standard_normal((n_frames, *scene.shape)).astype(np.float32)
    display = np.clip(scene[np.newaxis] + noise, 0.0, 1.0)
    max_stored = 2**bits - 1
    stored_float = display * 0.9 * max_stored + 0.05 * max_stored
    if monochrome1:
        stored_float = max_stored - stored_float
    return np.rint(stored_float).astype(np.uint16)


def _window(bits: int, monochrome1: bool, slope: float, intercept: float) -> tuple[float, float]:
    """(center, width) of the window that shows the display range [0.02, 0.98], in modality
    units."""
    max_stored = 2**bits - 1
    lo = (0.02 * 0.9 + 0.05) * max_stored
    hi = (0.98 * 0.9 + 0.05) * max_stored
    if monochrome1:
        lo, hi = max_stored - hi, max_stored - lo
    return (lo + hi) / 2 * slope + intercept, (hi - lo) * slope


def _header(
    config: SyntheticConfig, patient: SyntheticPatient, image_index: int, modality: str
) -> Dataset:
    """The file meta and header of one image: UIDs derived from the seed, the fake patient's
    identity (what ingestion must strip), a chest PA view."""

    def uid(kind: str) -> str:
        return generate_uid(
            entropy_srcs=[str(config.seed), str(patient.index), str(image_index), kind]
        )

    sop_class = CR_IMAGE_STORAGE if modality == "CR" else DX_IMAGE_STORAGE
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid("sop")
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(config.seed), str(patient.index), "study"])
    ds.SeriesInstanceUID = uid("series")
    ds.Modality = modality
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "F"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "SMITH^JOHN"
    ds.AccessionNumber = f"A{patient.index:05d}{image_index}"
    ds.StudyDate = "20260101"
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer, ds.ManufacturerModelName = SCANNERS[patient.index % 2]
    ds.ViewPosition = "PA"
    ds.PixelSpacing = [0.7, 0.7]
    return ds


def _soft_ellipse(
    x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float
) -> np.ndarray:
    """1 inside the ellipse, 0 outside, with a smooth edge of relative width ``edge``."""
    radius = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1 + edge - radius) / (2 * edge), 0.0, 1.0)
