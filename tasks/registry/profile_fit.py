"""Fitting the training data's profile at packaging (:class:`tasks.model.profile.DataProfile`).

From the processed dataset the model was trained on: the DICOM header values of its training
files (the scope gate), its multi-frame rule, deciles of image statistics, the OOD detector fit
on the training split's features and its threshold set on the validation split at
``serving.ood_false_rejection``. The test split is left alone: it is the held-back
in-distribution set the OOD evaluation (``benchmarks.ood``) measures acceptance on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tasks.config import Params
from tasks.data import synthetic
from tasks.errors import MedtransferError
from tasks.model.profile import (
    DataProfile,
    OodDetector,
    deciles,
    features_and_probabilities,
    header_values,
    image_statistics,
    statistic_names,
)

logger = logging.getLogger(__name__)
BATCH = 64


def fit_profile(model, spec, params: Params) -> DataProfile:
    """The profile of the processed dataset in ``data.processed_dir`` for ``model``.

    Raises:
        MedtransferError: no processed dataset, or one of another image size than the model's.
    """
    dataset = _matching_dataset(spec, params)
    train_images, train_labels = dataset.subset("train")
    val_images, _ = dataset.subset("val")
    if len(val_images) == 0:  # a tiny set: the threshold comes from the training split
        val_images = train_images
    _, train_features = forward(model, train_images, spec.temperature, spec.kind)
    val_probs, val_features = forward(model, val_images, spec.temperature, spec.kind)
    findings = train_labels.ndim == 2
    if findings:  # no one class per image; one centre for Mahalanobis
        train_labels = np.zeros(len(train_labels), dtype=np.int64)
    serving = params.serving
    head = (model.head.weight.detach().numpy(), model.head.bias.detach().numpy())
    detector = OodDetector.fit(serving.ood_method, train_features, train_labels, head)
    val_scores = detector.score(val_features)
    detector.calibrate(val_scores, serving.ood_false_rejection)
    stats = image_statistics(train_images)
    probability_deciles, class_probability_deciles = _probability_deciles(val_probs, findings)
    return DataProfile(
        scope=_scope(dataset, source_folder(params)),
        multiframe=dataset.source.multiframe,
        source_kind=dataset.source.kind,
        n_train=len(train_images),
        n_val=len(val_images),
        statistics={
            name: deciles(stats[:, i]) for i, name in enumerate(statistic_names(spec.channels))
        },
        ood={
            "method": serving.ood_method,
            "threshold": detector.threshold,
            "false_rejection": serving.ood_false_rejection,
            "val_rejected": float(np.mean(val_scores >= detector.threshold)),
            "score_deciles": deciles(val_scores),
        },
        probability_deciles=probability_deciles,
        class_probability_deciles=class_probability_deciles,
        detector=detector,
    )


def _matching_dataset(spec, params: Params):
    """The processed dataset in ``data.processed_dir``, checked to be of the model's image size
    and channels.

    Raises:
        MedtransferError: no processed dataset, or one of another image size than the model's.
    """
    from tasks.data.dataset import load_processed

    try:
        dataset = load_processed(params.data.processed_dir)
    except (FileNotFoundError, MedtransferError) as err:
        raise MedtransferError(
            f"No processed dataset in {params.data.processed_dir}: packaging records the "
            "training data's profile with the model; run `medtransfer ingest` first."
        ) from err
    if (dataset.image_size, dataset.channels) != (spec.image_size, spec.channels):
        raise MedtransferError(
            f"The processed dataset in {params.data.processed_dir} has {dataset.image_size} px "
            f"images of {dataset.channels} channel(s) and the model takes {spec.image_size} px "
            f"of {spec.channels}: package with the dataset the model was trained on."
        )
    return dataset


def _probability_deciles(
    val_probs: np.ndarray, findings: bool
) -> tuple[list[float], list[list[float]]]:
    """(``probability_deciles``, ``class_probability_deciles``) of the validation
    probabilities ``(N, C)``: two classes give the positive class's deciles alone; more
    classes, or findings, one decile list per column (a shift in any class's share is drift;
    watching the last column alone missed a shift between the others)."""
    if not findings and val_probs.shape[1] == 2:
        return deciles(val_probs[:, -1]), []
    return [], [deciles(column) for column in val_probs.T]


def forward(
    model, images: np.ndarray, temperature: float | tuple[float, ...], kind=None
) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated probabilities and features of uint8 ``(N, S, S)`` images, in batches
    (``kind``: the student's label kind, None single-label)."""
    probs, features = [], []
    for start in range(0, len(images), BATCH):
        p, f = features_and_probabilities(model, images[start : start + BATCH], temperature, kind)
        probs.append(p)
        features.append(f)
    return np.concatenate(probs), np.concatenate(features)


def source_folder(params: Params) -> Path:
    """The DICOM folder ``data.source`` names (the synthetic set's folder for its shorthand).
    The dataset does not record it (names are data: a path can carry a patient's name), so the
    configuration, which the user wrote, says where it is."""
    recipe = synthetic.SyntheticConfig.from_params(params)
    if synthetic.is_synthetic_source(params.data.source, recipe):
        return synthetic.source_folder(recipe)
    return Path(params.data.source)


def _scope(dataset, folder: Path) -> dict[str, list[str]] | None:
    """Header values of the dataset's source files in ``folder`` (every split: validation and
    test images are the same population as training); None for a source without DICOM
    headers (a ``.npz``, an image folder) or when the source folder is not readable here."""
    import pydicom

    if dataset.source.kind in ("npz", "image_folder"):  # no DICOM headers to scope by
        return None
    if not folder.is_dir():
        # the path itself is not logged: a source folder can be named after a patient
        logger.warning(
            "package: data.source is not a readable folder here: no scope gate on metadata"
        )
        return None
    seen: dict[str, set[str]] = {}
    for name in sorted(set(dataset.manifest["source_file"])):
        try:
            ds = pydicom.dcmread(folder / name, stop_before_pixels=True)
        except Exception:  # ingested once, unreadable now: leave it out
            continue
        for keyword, value in header_values(ds).items():
            seen.setdefault(keyword, set()).add(value)
    if not seen:
        return None
    return {keyword: sorted(values) for keyword, values in seen.items()}
