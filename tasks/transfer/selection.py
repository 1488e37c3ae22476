"""Teacher-and-depth selection: the evidence step of ``train.strategy: auto`` / ``train.teacher: auto`` and ``medtransfer advise``.

Before any fine-tuning, each candidate teacher's frozen features are measured on the target
training split at every feature tap (``TeacherSpec.stage_ends``, then the top):

- k-NN (leave-one-out, cosine, k = 10) AUC with a bootstrap 95% interval: the strongest simple
  predictor of fine-tuned performance on medical images among 23 metrics (Sorkhei, Matsoukas
  et al. 2025, arXiv 2503.18528);
- LogME (You et al., ICML 2021), the evidence of a Bayesian linear model on the features, per
  sample (higher: more linearly usable);
- the domain distance of the target images from ImageNet at that stage: the mean over channels
  of KL(target || ImageNet) between per-channel Gaussians, the ImageNet side read from the
  running statistics of the stage's last BatchNorm (no ImageNet image needed).

:func:`choose_transfer` turns them into a teacher, a strategy and an unfreeze depth (the deepest tap
whose features are still about as good as the best: features that stay good deep into the
network → freeze more, features that degrade early → unfreeze more) with its reasons and a
confidence flag. Features are computed once per teacher, without augmentation, in eval mode.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from tasks.config import Params
from tasks.data.dataset import load_processed
from tasks.data.preprocess import image_channels, uint8_to_model_pixels
from tasks.errors import MedtransferError
from tasks.evaluation.metrics import (
    percentile_interval,
    roc_auc,
    stratified_weights,
    weighted_auc,
)
from tasks.model.label_kind import SINGLE_LABEL
from tasks.model.student import check_image_size
from tasks.model.teacher_models import teacher_feature_extractor
from tasks.model.teachers import get_teacher, known_teachers, resolve_weights

logger = logging.getLogger(__name__)

KNN_K = 10
BOOTSTRAP_RESAMPLES = 200
# Evidence on more images costs O(n^2) for k-NN and barely moves the ranking; a stratified
# sample of this many training images is measured.
MAX_EVIDENCE_IMAGES = 1000
# Taps whose k-NN AUC is within this of the teacher's best count as "as good" (about the
# half-width of the interval at a few hundred images).
DEPTH_TOLERANCE = 0.01
# Frozen features this good at the top already separate the classes: train the head only.
LINEAR_PROBE_AUC = 0.95
# Past this share of blocks after the best tap, the whole network is fine-tuned (LP-FT).
FULL_FINE_TUNE_SHARE = 0.5


@dataclass(frozen=True)
class TapEvidence:
    """One teacher's evidence at one tap; ``block`` is the block index whose output it is
    (``num_blocks - 1`` plus the top for the last tap, marked ``tap == "top"``)."""

    teacher: str
    tap: str
    block: int
    depth: float  # (block + 1) / num_blocks
    channels: int
    knn_auc: float
    knn_auc_low: float
    knn_auc_high: float
    knn_accuracy: float
    logme: float
    domain_distance: float


@dataclass
class TransferChoice:
    """What the evidence chose, and why."""

    teacher: str
    strategy: str
    unfreeze_blocks: int
    confidence: str  # high | low
    reasons: list[str]
    n_images: int
    seconds: float
    evidence: list[TapEvidence] = field(default_factory=list)
    # Set by the pilots (tasks.transfer.auto): what the evidence alone recommended, the
    # pilots' decision table, the runner-up, and the facts of the data the rule read.
    evidence_choice: dict | None = None
    pilots: dict | None = None
    runner_up: str | None = None
    data_facts: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready: the decision and every tap's evidence as rows."""
        return {**asdict(self), "evidence": [asdict(row) for row in self.evidence]}


# ------------------------------------------------------------------------------- measures --


def knn_scores(features: np.ndarray, labels: np.ndarray, n_classes: int, k: int = KNN_K):
    """Leave-one-out k-NN class shares: ``(N, D)`` features → ``(N, n_classes)`` probabilities.

    Cosine similarity on centred, L2-normalised features; each image's own entry is excluded.
    """
    centred = features - features.mean(0, keepdims=True)
    unit = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    k = min(k, len(labels) - 1)
    neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    votes = np.zeros((len(labels), n_classes))
    for c in range(n_classes):
        votes[:, c] = (labels[neighbours] == c).mean(1)
    return votes


def bootstrap_auc(labels: np.ndarray, scores: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the AUC of ``(N, C)`` scores over images
    (resampled within each class)."""
    weights = stratified_weights(labels, BOOTSTRAP_RESAMPLES, seed)
    return percentile_interval(weighted_auc(labels, scores, weights))


def _spectrum(f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Non-zero squared singular values ``(r,)`` of ``(N, D)`` ``f`` and its left singular
    vectors ``(N, r)``, from the eigen-decomposition of the smaller Gram matrix (faster than
    an SVD of ``f``)."""
    if f.shape[0] <= f.shape[1]:
        sigma, u = np.linalg.eigh(f @ f.T)
    else:
        sigma, v = np.linalg.eigh(f.T @ f)
        u = f @ v / np.sqrt(np.maximum(sigma, 1e-300))
    keep = sigma > sigma.max() * 1e-10
    return sigma[keep], u[:, keep]


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """LogME (You et al. 2021): the maximised log evidence per image of a Bayesian linear
    regression from ``(N, D)`` features to each one-hot class target, averaged over classes."""
    f = features.astype(np.float64)
    n, d = f.shape
    sigma, u = _spectrum(f)
    evidences = []
    for c in np.unique(labels):
        y = (labels == c).astype(np.float64)
        x2 = (u.T @ y) ** 2
        residual_outside = float(y @ y - x2.sum())
        alpha, beta = 1.0, 1.0
        for _ in range(30):
            t = alpha / beta
            gamma = float((sigma / (sigma + t)).sum())
            m2 = float((sigma * x2 / (t + sigma) ** 2).sum())
            res2 = float((x2 / (1 + sigma / t) ** 2).sum()) + residual_outside
            alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
            if abs(alpha / beta - t) / t < 0.01:
                break
        log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * math.log(alpha)
        evidence = (
            d / 2 * math.log(alpha)
            + n / 2 * math.log(beta)
            - 0.5 * log_det
            - beta / 2 * res2
            - alpha / 2 * m2
            - n / 2 * math.log(2 * math.pi)
        )
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def gaussian_kl(
    mean: np.ndarray, var: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray
) -> float:
    """Mean over channels of KL(N(mean, var) || N(ref_mean, ref_var)), all ``(C,)``."""
    var, ref_var = np.maximum(var, 1e-8), np.maximum(ref_var, 1e-8)
    kl = 0.5 * ((var + (mean - ref_mean) ** 2) / ref_var - 1 + np.log(ref_var / var))
    return float(kl.mean())


# ---------------------------------------------------------------------------- extraction --


class _BatchNormInputStats:
    """Per-channel sums of a BatchNorm layer's input over the batches seen (a forward hook)."""

    def __init__(self, layer: nn.BatchNorm2d) -> None:
        self.layer = layer
        self.total = self.squares = None
        self.count = 0
        self.handle = layer.register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().double()
        total, squares = x.sum((0, 2, 3)), (x * x).sum((0, 2, 3))
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def distance(self) -> float:
        """KL of the recorded statistics from the layer's running (ImageNet) ones."""
        self.handle.remove()
        mean = (self.total / self.count).numpy()
        var = (self.squares / self.count).numpy() - mean**2
        ref_mean = self.layer.running_mean.double().numpy()
        return gaussian_kl(mean, var, ref_mean, self.layer.running_var.double().numpy())


def _last_batchnorm(modules: list[nn.Module]) -> nn.BatchNorm2d | None:
    found = [m for part in modules for m in part.modules() if isinstance(m, nn.BatchNorm2d)]
    return found[-1] if found else None


@torch.no_grad()
def tap_features(
    teacher: str, images: np.ndarray, weights_path: str | None = None, batch_size: int = 64
) -> tuple[list[np.ndarray], list[float]]:
    """Pooled features at every tap and the domain distance there.

    Args:
        teacher: a registered teacher name.
        images: ``(N, H, W)`` uint8 grayscale or ``(N, 3, H, W)`` colour images (a colour set
            is probed through the teacher's own three-channel stem).
        weights_path: the teacher's weights file, or None for the bundled one.

    Returns:
        ``([(N, C_i) per tap], [distance per tap])``, taps as :meth:`Backbone.taps` orders them.
    """
    spec = get_teacher(teacher)
    extractor = teacher_feature_extractor(teacher, weights_path, image_channels(images))
    backbone = extractor.backbone
    ends = spec.stage_ends
    segments, start = [], 0
    for end in (*ends, len(backbone.blocks) - 1):
        segments.append(list(backbone.blocks[start : end + 1]))
        start = end + 1
    segments[0] = [backbone.stem, *segments[0]]
    segments[-1] = [*segments[-1], backbone.top]
    hooks = []
    for segment in segments:
        layer = _last_batchnorm(segment)
        hooks.append(_BatchNormInputStats(layer) if layer is not None else None)
    chunks: list[list[np.ndarray]] = [[] for _ in segments]
    for first in range(0, len(images), batch_size):
        x = torch.from_numpy(uint8_to_model_pixels(images[first : first + batch_size]))
        for i, tapped in enumerate(backbone.taps(extractor.input_layer(x), ends)):
            chunks[i].append(tapped.numpy())
    distances = [hook.distance() if hook else math.nan for hook in hooks]
    return [np.concatenate(c) for c in chunks], distances


def teacher_evidence(
    teacher: str, images: np.ndarray, labels: np.ndarray, weights_path: str | None = None
) -> list[TapEvidence]:
    """Every tap's evidence for one teacher on ``(N, H, W)`` uint8 images with labels ``(N,)``."""
    spec = get_teacher(teacher)
    features, distances = tap_features(teacher, images, weights_path)
    n_classes = int(labels.max()) + 1
    blocks = [*spec.stage_ends, spec.num_blocks - 1]
    rows = []
    for i, (tapped, distance) in enumerate(zip(features, distances, strict=True)):
        votes = knn_scores(tapped, labels, n_classes)
        low, high = bootstrap_auc(labels, votes)
        rows.append(
            TapEvidence(
                teacher=teacher,
                tap="top" if i == len(features) - 1 else f"stage{i + 1}",
                block=blocks[i],
                depth=(blocks[i] + 1) / spec.num_blocks,
                channels=tapped.shape[1],
                knn_auc=roc_auc(labels, votes),
                knn_auc_low=low,
                knn_auc_high=high,
                knn_accuracy=float((SINGLE_LABEL.top_class(votes) == labels).mean()),
                logme=logme(tapped, labels),
                domain_distance=distance,
            )
        )
    return rows


def evidence_sample(labels: np.ndarray, seed: int, limit: int = MAX_EVIDENCE_IMAGES):
    """Indices of a seeded, label-stratified sample of at most ``limit`` images, sorted."""
    if len(labels) <= limit:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = max(2, round(limit * len(members) / len(labels)))
        chosen.append(rng.permutation(members)[:count])
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------- the rule --


def _best_tap(rows: list[TapEvidence]) -> TapEvidence:
    """The deepest tap whose k-NN AUC is within :data:`DEPTH_TOLERANCE` of the best."""
    best = max(r.knn_auc for r in rows)
    return [r for r in rows if r.knn_auc >= best - DEPTH_TOLERANCE][-1]


def choose_depth(teacher: str, rows: list[TapEvidence]) -> tuple[str, int, list[str]]:
    """Strategy and ``unfreeze_blocks`` from one teacher's taps, with the reasons in words."""
    spec = get_teacher(teacher)
    tap = _best_tap(rows)
    top = rows[-1]
    after = spec.num_blocks - 1 - tap.block
    share = after / spec.num_blocks
    peak = max(rows, key=lambda r: r.knn_auc)
    held = (
        ""
        if tap is peak
        else f"; the deepest tap within {DEPTH_TOLERANCE} of it is {tap.tap} (block "
        f"{tap.block + 1}/{spec.num_blocks}, {tap.knn_auc:.3f})"
    )
    reasons = [
        f"{teacher}: k-NN AUC peaks at {peak.tap} (block {peak.block + 1}/{spec.num_blocks}, "
        f"{peak.knn_auc:.3f}){held}; at the top {top.knn_auc:.3f}"
    ]
    if tap.tap == "top" and top.knn_auc >= LINEAR_PROBE_AUC:
        reasons.append(f"frozen features separate the classes (>= {LINEAR_PROBE_AUC}): head only")
        return "linear_probe", 0, reasons
    if share > FULL_FINE_TUNE_SHARE:
        reasons.append(
            f"features degrade after {share:.0%} of the blocks remain: fine-tune all (LP-FT)"
        )
        return "lp_ft", spec.num_blocks, reasons
    if after == 0:
        # Good to the end but not separable as they are: adapt the last stage at least.
        last_stage = [e for e in spec.stage_ends if e < spec.num_blocks - 1]
        after = spec.num_blocks - 1 - (last_stage[-1] if last_stage else 0)
    reasons.append(f"features hold to {tap.tap}: fine-tune the last {after} block(s)")
    return "partial", after, reasons


def choose_transfer(
    evidence: dict[str, list[TapEvidence]], n_images: int, seconds: float
) -> TransferChoice:
    """Teacher by its best k-NN AUC over taps (LogME breaks near-ties), then its depth.

    Confidence is ``high`` when the winner's interval lies above the runner-up's point
    estimate (or there is one candidate).
    """

    def score(name: str) -> tuple[float, float]:
        tap = max(evidence[name], key=lambda r: r.knn_auc)
        return round(tap.knn_auc / DEPTH_TOLERANCE), tap.logme

    ranked = sorted(evidence, key=score, reverse=True)
    winner = ranked[0]
    strategy, unfreeze, reasons = choose_depth(winner, evidence[winner])
    best = max(evidence[winner], key=lambda r: r.knn_auc)
    confident = True
    if len(ranked) > 1:
        runner = max(evidence[ranked[1]], key=lambda r: r.knn_auc)
        confident = best.knn_auc_low > runner.knn_auc
        tie = (
            f": within {DEPTH_TOLERANCE} of each other, a tie that LogME breaks "
            f"({best.logme:.3f} vs {runner.logme:.3f} at their best taps)"
            if runner.knn_auc > best.knn_auc
            else ""
        )
        reasons.insert(
            0,
            f"teacher {winner}: best k-NN AUC {best.knn_auc:.3f} "
            f"[{best.knn_auc_low:.3f}, {best.knn_auc_high:.3f}] vs {ranked[1]} "
            f"{runner.knn_auc:.3f}{tie}",
        )
    rows = [row for name in ranked for row in evidence[name]]
    return TransferChoice(
        teacher=winner,
        strategy=strategy,
        unfreeze_blocks=unfreeze,
        confidence="high" if confident else "low",
        reasons=reasons,
        n_images=n_images,
        seconds=seconds,
        evidence=rows,
    )


def gather_evidence(
    teachers: list[str],
    images: np.ndarray,
    labels: np.ndarray,
    weights_path: str | None,
    seed: int,
    progress: bool = True,
) -> TransferChoice:
    """Measure every candidate on a stratified sample of ``(N, H, W)`` uint8 training images
    and choose_transfer. ``weights_path`` applies to a single candidate only (the caller checks).
    ``progress``: a bar over the teachers on stderr (a log line per teacher comes either way)."""
    start = time.perf_counter()
    sample = evidence_sample(labels, seed)
    evidence = {}
    for name in tqdm(teachers, desc="evidence", unit="teacher", disable=not progress):
        began = time.perf_counter()
        evidence[name] = teacher_evidence(name, images[sample], labels[sample], weights_path)
        best = max(evidence[name], key=lambda r: r.knn_auc)
        logger.info(
            "evidence %s: best k-NN AUC %.3f [%.3f, %.3f] at %s on %d images, %.0f s",
            name, best.knn_auc, best.knn_auc_low, best.knn_auc_high, best.tap, len(sample),
            time.perf_counter() - began,
        )  # fmt: skip
    return choose_transfer(evidence, len(sample), time.perf_counter() - start)


# ------------------------------------------------------------------- on the processed data --


def candidate_teachers(teacher: str, weights_path: str | None) -> list[str]:
    """The teachers ``auto`` weighs: the configured one, or (``auto``) every teacher whose
    weights ship with medtransfer and are installed.

    Raises:
        MedtransferError: ``teacher: auto`` with a ``weights_path`` (a file fits one
            architecture: name it), or no bundled teacher installed.
    """
    if teacher != "auto":
        return [teacher]
    if weights_path is not None:
        raise MedtransferError(
            "train.teacher=auto weighs the bundled teachers; a weights_path fits one "
            "architecture: set train.teacher to it (its strategy can still be auto)."
        )
    names = []
    for name in known_teachers():
        if get_teacher(name).bundled_weights is None:
            continue
        try:
            resolve_weights(name)
        except MedtransferError:
            continue  # not installed: not a candidate
        names.append(name)
    if not names:
        raise MedtransferError("train.teacher=auto found no installed bundled teacher.")
    return names


def advise(params: Params, progress: bool = True) -> TransferChoice:
    """The evidence step on the processed dataset's training split; nothing is trained or
    written. ``progress``: a bar over the teachers."""
    config = params.train
    dataset = load_processed(params.data.processed_dir)
    teachers = candidate_teachers(config.teacher, config.weights_path)
    for name in teachers:
        check_image_size(name, dataset.image_size)
    indices = dataset.indices("train")
    labels = dataset.labels[indices]
    sample = evidence_sample(labels, params.seed)
    images = np.asarray(dataset.images[indices[sample]])
    return gather_evidence(
        teachers, images, labels[sample], config.weights_path, params.seed, progress
    )
