"""Pilot fine-tunes and inherited exposure: the second half of ``train.strategy: auto``.

The evidence step (:mod:`tasks.transfer.selection`) ranks the candidates (teacher x depth)
from frozen features alone. Here the top candidates are fine-tuned for a few epochs on the
training split and judged on the validation split, by successive halving within
``train.auto_budget_minutes``:

1. every candidate trains ``PILOT_EPOCHS`` epochs; its validation AUC carries a 95%
   patient-bootstrap interval;
2. the better half by validation AUC trains again for twice the epochs, and so on, until the
   next round would hold one candidate, the budget is spent, or every candidate has reached
   ``train.epochs``; the last round's candidates are the finalists;
3. the finalists' inherited exposure is measured: the gates' two teacher-transfer attacks
   (untargeted and mimicry, crafted on the public teacher alone) at the gate's budget on a
   seeded subset of the validation images, as success rates with 95% Wilson intervals;
4. the best finalist by validation AUC whose exposure passes the gate on its interval's upper
   bound is chosen, except that one the evidence ranked earlier wins when its AUC lies inside
   the best one's interval; when none passes, the least exposed one, with a warning.

Pilots write nothing to the project: their checkpoints go to a temporary folder.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from tasks.config import Params
from tasks.data.dataset import ProcessedDataset
from tasks.data.preprocess import uint8_to_model_pixels
from tasks.evaluation.metrics import (
    patient_weights,
    percentile_interval,
    roc_auc,
    weighted_auc,
    wilson_interval,
)
from tasks.model.predict import run_model
from tasks.model.teacher_models import teacher_feature_extractor
from tasks.robustness.attacks.teacher_transfer import teacher_transfer_attack
from tasks.training import strategies
from tasks.training.recorders import ProgressBarRecorder
from tasks.training.types import FitConfig, TrainingRecorder

logger = logging.getLogger(__name__)

# Epochs of the first round; each later round doubles them (capped at train.epochs).
PILOT_EPOCHS = 2
# Validation images attacked per candidate: enough to bound a success rate near the gate
# (at 50 clean-correct images the Wilson interval's half-width is about 0.13).
MAX_EXPOSURE_IMAGES = 64
BOOTSTRAP_RESAMPLES = 200


@dataclass(frozen=True)
class Candidate:
    """One configuration ``auto`` may choose."""

    teacher: str
    strategy: str
    unfreeze_blocks: int
    why: str  # the rule's words for why it is a candidate

    @property
    def label(self) -> str:
        depth = f"/{self.unfreeze_blocks}" if self.strategy == "partial" else ""
        return f"{self.teacher.removeprefix('efficientnet-')} {self.strategy}{depth}"


@dataclass
class Pilot:
    """A candidate's pilot: its last round's validation AUC and exposure.

    ``exposure``: the worse (by upper bound) of the untargeted and mimicry success rates at
    the gate's budget; ``exposure_low``/``exposure_high`` its 95% Wilson interval over
    ``exposure_n`` clean-correct validation images; ``passes``: its upper bound is at most the
    gate (True when the gate is off).
    """

    candidate: Candidate
    rounds: int = 0
    epochs: int = 0
    val_auc: float = math.nan
    val_auc_low: float = math.nan
    val_auc_high: float = math.nan
    transfer_success: float = math.nan
    mimicry_success: float = math.nan
    exposure: float = math.nan
    exposure_low: float = math.nan
    exposure_high: float = math.nan
    exposure_n: int = 0
    passes: bool = True
    seconds: float = 0.0

    def row(self) -> dict:
        """JSON-ready: the candidate's fields and the measurements."""
        values = {k: v for k, v in asdict(self).items() if k != "candidate"}
        return {**asdict(self.candidate), "label": self.candidate.label, **values}


@dataclass
class PilotDecision:
    """What the pilots decided: the winner, its runner-up, every pilot, and the words."""

    chosen: Pilot
    runner_up: Pilot | None
    confidence: str  # high | low
    exposure_passed: bool  # the chosen candidate passes the exposure gate
    reasons: list[str]
    pilots: list[Pilot] = field(default_factory=list)
    seconds: float = 0.0
    budget_spent: bool = False
    gate: float | None = None  # the exposure gate (max success rate); None: off

    def to_dict(self) -> dict:
        """JSON-ready: the decision and every pilot as a row."""
        return {
            "gate": self.gate,
            "chosen": self.chosen.row(),
            "runner_up": self.runner_up.row() if self.runner_up else None,
            "confidence": self.confidence,
            "exposure_passed": self.exposure_passed,
            "reasons": self.reasons,
            "pilots": [p.row() for p in self.pilots],
            "seconds": self.seconds,
            "budget_spent": self.budget_spent,
        }


# ------------------------------------------------------------------------------ measures --


def val_auc_interval(
    probabilities: np.ndarray, labels: np.ndarray, patients: np.ndarray, seed: int
) -> tuple[float, float, float]:
    """Validation AUC of ``(N, C)`` probabilities with its 95% patient-bootstrap interval."""
    weights = patient_weights(patients, BOOTSTRAP_RESAMPLES, seed)
    low, high = percentile_interval(weighted_auc(labels, probabilities, weights))
    return roc_auc(labels, probabilities), low, high


class ExposureProbe:
    """The gates' teacher-transfer attacks on a fixed seeded subset of ``split`` (at most
    ``limit`` images; the pilots use validation); perturbations are crafted once per teacher
    and reused for every student of that teacher."""

    def __init__(
        self,
        params: Params,
        dataset: ProcessedDataset,
        split: str = "val",
        limit: int = MAX_EXPOSURE_IMAGES,
    ) -> None:
        gates = params.gates.in_pixels()
        self.threshold = gates["max_teacher_transfer_success"]
        self.eps = gates["teacher_transfer_eps"]
        settings = params.robustness
        self.steps = settings.pgd_steps
        fraction = settings.pgd_step_fraction or 2.5 / settings.pgd_steps
        self.step_size = None if self.eps is None else fraction * self.eps
        self.batch_size = settings.batch_size
        self.seed = params.seed
        indices = dataset.indices(split)
        if len(indices) > limit:
            rng = np.random.default_rng(params.seed)
            indices = np.sort(rng.choice(indices, limit, replace=False))
        self.images = uint8_to_model_pixels(dataset.images[indices])
        self.labels = dataset.labels[indices]
        self._teachers: dict[str, tuple[torch.nn.Module, dict]] = {}

    @property
    def enabled(self) -> bool:
        return self.threshold is not None and self.eps is not None

    def measure(self, student: torch.nn.Module, teacher: str, pilot: Pilot) -> None:
        """Both attacks on ``student``; writes the worse success rate into ``pilot``."""
        if not self.enabled:
            return
        if teacher not in self._teachers:
            self._teachers[teacher] = (teacher_feature_extractor(teacher), {})
        features, crafted = self._teachers[teacher]
        worst = None
        for mode in ("untargeted", "mimicry"):
            outcome = teacher_transfer_attack(
                student, features, self.images, self.labels, self.eps, mode=mode,
                steps=self.steps, step_size=self.step_size, batch_size=self.batch_size,
                seed=self.seed, crafted=crafted,
            )  # fmt: skip
            n = outcome.clean_correct
            rate = outcome.success_rate
            low, high = wilson_interval(round(rate * n), n) if n else (math.nan, math.nan)
            setattr(pilot, f"{'transfer' if mode == 'untargeted' else mode}_success", rate)
            if worst is None or not high <= worst[2]:
                worst = (rate, low, high, n)
        pilot.exposure, pilot.exposure_low, pilot.exposure_high, pilot.exposure_n = worst
        pilot.passes = bool(pilot.exposure_high <= self.threshold)


# ---------------------------------------------------------------------------- the pilots --


def pilot_fit(
    params: Params,
    dataset: ProcessedDataset,
    candidate: Candidate,
    epochs: int,
    recorders: list[TrainingRecorder],
) -> torch.nn.Module:
    """Fine-tune ``candidate`` for ``epochs`` on the training split (checkpoints in a
    temporary folder); returns the student with its best validation epoch's weights, on the
    CPU in eval mode."""
    config = replace(
        params.train,
        teacher=candidate.teacher,
        strategy=candidate.strategy,
        unfreeze_blocks=candidate.unfreeze_blocks,
        epochs=epochs,
        # a pilot of a few epochs warms up for at most a quarter of them
        warmup_epochs=min(params.train.warmup_epochs, epochs / 4),
    )
    torch.manual_seed(params.seed)
    model = strategies.build_model(config, candidate.strategy, len(dataset.classes))
    with tempfile.TemporaryDirectory(prefix="medtransfer-pilot-") as folder:
        fit_config = FitConfig.from_train(config, params.seed, folder, False)
        strategies.fit_student(
            model, dataset, config, fit_config, recorders,
            strategy=candidate.strategy, train_idx=dataset.indices("train"),
        )  # fmt: skip
    return model.to("cpu").eval()


def _score(pilot: Pilot) -> tuple[bool, float]:
    """Order of merit: passing the exposure gate first, then validation AUC."""
    return pilot.passes, pilot.val_auc if math.isfinite(pilot.val_auc) else -1.0


def _auc(pilot: Pilot) -> float:
    """The halving's order between rounds: validation AUC alone."""
    return pilot.val_auc if math.isfinite(pilot.val_auc) else -1.0


def _run_round(
    params: Params,
    dataset: ProcessedDataset,
    pilots: list[Pilot],
    epochs: int,
    progress: bool,
) -> list[torch.nn.Module]:
    """Train every pilot of this round for ``epochs`` and measure its validation AUC (a log
    line each); returns the trained students, in ``pilots``' order."""
    val_images, val_labels = dataset.subset("val")
    patients = dataset.manifest["patient_hash"].to_numpy()[dataset.indices("val")]
    models = []
    for pilot in pilots:
        start = time.perf_counter()
        label = f"pilot {pilot.candidate.label} ({epochs} ep)"
        recorders: list[TrainingRecorder] = [ProgressBarRecorder(progress, label)]
        model = pilot_fit(params, dataset, pilot.candidate, epochs, recorders)
        pixels = torch.from_numpy(uint8_to_model_pixels(val_images))
        probabilities = run_model(model, pixels, batch_size=64)
        pilot.val_auc, pilot.val_auc_low, pilot.val_auc_high = val_auc_interval(
            probabilities, val_labels, patients, params.seed
        )
        pilot.rounds += 1
        pilot.epochs = epochs
        pilot.seconds += time.perf_counter() - start
        models.append(model)
        logger.info(
            "auto pilot %s, %d epochs: val AUC %.3f [%.3f, %.3f]; %.0f s",
            pilot.candidate.label, epochs, pilot.val_auc, pilot.val_auc_low,
            pilot.val_auc_high, time.perf_counter() - start,
        )  # fmt: skip
    return models


def _measure_finalists(
    finalists: list[Pilot], models: list[torch.nn.Module], probe: ExposureProbe
) -> None:
    """The inherited exposure of the last round's pilots (a log line each)."""
    for pilot, model in zip(finalists, models, strict=True):
        start = time.perf_counter()
        probe.measure(model, pilot.candidate.teacher, pilot)
        pilot.seconds += time.perf_counter() - start
        logger.info(
            "auto finalist %s after %d epochs: exposure %.2f [%.2f, %.2f] (n=%d) %s",
            pilot.candidate.label, pilot.epochs, pilot.exposure, pilot.exposure_low,
            pilot.exposure_high, pilot.exposure_n,
            "passes" if pilot.passes else "FAILS the gate",
        )  # fmt: skip


def successive_halving(
    params: Params,
    dataset: ProcessedDataset,
    candidates: list[Candidate],
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> PilotDecision:
    """Pilot ``candidates`` (best evidence first) by successive halving on the validation
    split within ``train.auto_budget_minutes``; returns the decision.

    Rounds are cut by validation AUC alone; the inherited exposure is measured on the last
    round's pilots (the finalists), after their longest fine-tune: two epochs overstate a
    deep candidate's exposure (on the synthetic default at 128 px lite1 ``full`` measured
    0.46 [0.30, 0.62] on validation after 2 epochs; 12-epoch ``full`` students 0.22 [0.13,
    0.36] on test: benchmarks/results/auto-strategy-demo.md)."""
    start = clock()
    budget = params.train.auto_budget_minutes * 60
    probe = ExposureProbe(params, dataset)
    pilots = [Pilot(c) for c in candidates]
    survivors, epochs, spent = pilots, min(PILOT_EPOCHS, params.train.epochs), False
    while True:
        began = clock()
        models = _run_round(params, dataset, survivors, epochs, progress)
        # the next round: half the pilots, twice the epochs, at this round's cost per epoch
        keep, next_epochs = math.ceil(len(survivors) / 2), min(epochs * 2, params.train.epochs)
        per_epoch = (clock() - began) / (len(survivors) * epochs)
        spent = clock() - start + keep * next_epochs * per_epoch > budget
        # a round of one would decide nothing: this round's pilots are the finalists
        if keep <= 1 or epochs >= params.train.epochs or spent:
            break
        ranked = sorted(range(len(survivors)), key=lambda i: _auc(survivors[i]), reverse=True)
        survivors, epochs = [survivors[i] for i in sorted(ranked[:keep])], next_epochs
    _measure_finalists(survivors, models, probe)
    return decide(survivors, pilots, probe, clock() - start, spent)


def _passed_over(final_round: list[Pilot], chosen: Pilot, best: Pilot | None) -> list[str]:
    """Why each finalist that scored higher than ``chosen`` was not chosen: its exposure fails
    the gate, or (it passes) it lies inside ``best``'s interval, where the evidence's order
    decides (``best`` itself has its own sentence)."""
    reasons = []
    for pilot in final_round:
        if pilot is chosen or pilot is best or pilot.val_auc <= chosen.val_auc:
            continue
        if not pilot.passes:
            reasons.append(
                f"{pilot.candidate.label} scored higher ({pilot.val_auc:.3f}) but its "
                f"exposure's upper bound {pilot.exposure_high:.2f} fails the gate"
            )
        elif best is not None:
            reasons.append(
                f"{pilot.candidate.label} scored higher ({pilot.val_auc:.3f}) and passes the "
                f"gate, but inside {best.candidate.label}'s interval: the evidence ranked it lower"
            )
    return reasons


def decide(
    final_round: list[Pilot], pilots: list[Pilot], probe: ExposureProbe, seconds: float, spent: bool
) -> PilotDecision:
    """The rule's last step over the last round's pilots: among those whose exposure passes,
    the best validation AUC, where a candidate ranked earlier by the evidence (``pilots``'
    order) wins when its AUC lies inside the best one's interval; when none passes, the least
    exposed; the runner-up is the next by :func:`_score`."""
    passing = [p for p in final_round if p.passes]
    reasons: list[str] = []
    tie: list[str] = []
    if passing:
        best = max(passing, key=lambda p: p.val_auc)
        # pilots confirm the evidence: they overturn its ranking only where they resolve a
        # difference; within the best pilot's interval the evidence's order decides
        low = best.val_auc_low if math.isfinite(best.val_auc_low) else best.val_auc
        tied = [p for p in passing if p.val_auc >= low]
        chosen = min(tied, key=pilots.index)
        if chosen is not best:
            tie.append(
                f"the pilots cannot separate {chosen.candidate.label} ({chosen.val_auc:.3f}) "
                f"from {best.candidate.label} ({best.val_auc:.3f} [{best.val_auc_low:.3f}, "
                f"{best.val_auc_high:.3f}]): the evidence's ranking decides"
            )
        if probe.enabled:
            reasons.append(
                f"{chosen.candidate.label}: validation AUC {chosen.val_auc:.3f} "
                f"[{chosen.val_auc_low:.3f}, {chosen.val_auc_high:.3f}], the best (or tied with "
                f"it) among the "
                f"finalists whose inherited exposure passes the gate (upper bound "
                f"{chosen.exposure_high:.2f} <= {probe.threshold:.2f}, n={chosen.exposure_n})"
            )
        else:
            reasons.append(f"{chosen.candidate.label}: best validation AUC (exposure gate off)")
        reasons += tie
    else:
        best = None
        chosen = min(final_round, key=lambda p: p.exposure_high)
        reasons.append(
            f"no finalist's inherited exposure passes the gate (upper bound <= "
            f"{probe.threshold:.2f}): chose the least exposed, {chosen.candidate.label} "
            f"({chosen.exposure:.2f} [{chosen.exposure_low:.2f}, {chosen.exposure_high:.2f}]); "
            "expect the promotion gate to refuse it"
        )
        logger.warning("auto: %s", reasons[-1])
    others = sorted((p for p in final_round if p is not chosen), key=_score, reverse=True)
    runner = others[0] if others else None
    confident = runner is None or chosen.val_auc_low > runner.val_auc
    reasons += _passed_over(final_round, chosen, best)
    return PilotDecision(
        chosen=chosen, runner_up=runner, confidence="high" if confident else "low",
        exposure_passed=chosen.passes, reasons=reasons, pilots=pilots, seconds=seconds,
        budget_spent=spent, gate=probe.threshold if probe.enabled else None,
    )  # fmt: skip
