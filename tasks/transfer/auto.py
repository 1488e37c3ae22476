"""``train.strategy: auto`` / ``train.teacher: auto``: evidence, candidates, pilots, decision.

The rule, in the order it runs:

1. **Evidence** (:mod:`tasks.transfer.selection`): every candidate teacher's frozen features on
   the training split rank the teachers and give each its depth.
2. **Candidates** (:mod:`tasks.transfer.candidates`): the best teacher at its evidence depth,
   ``full`` and ``lp_ft`` (or, with few training images, ``linear_probe``), and the runner-up
   teacher when the evidence cannot separate it; the source's native resolution is read.
3. **Pilots** (:mod:`tasks.transfer.pilots`): short fine-tunes by successive halving on the
   validation split within ``train.auto_budget_minutes``, each with its validation AUC
   (patient-bootstrap interval), and the finalists' inherited exposure (the gates'
   teacher-transfer attacks at the gate's budget, Wilson interval); the best validation AUC
   whose exposure passes the gate is chosen, else the least exposed with a warning.

The choice goes into the parameters (everything after sees, logs and checkpoints concrete
values) and the :class:`~tasks.transfer.selection.TransferChoice` records why.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

from tasks.config import Params
from tasks.data.dataset import load_processed
from tasks.errors import MedtransferError
from tasks.training.strategies import check_device
from tasks.transfer.candidates import native_resolution, rank_candidates, smaller_size
from tasks.transfer.pilots import PilotDecision, successive_halving
from tasks.transfer.selection import TransferChoice, advise

logger = logging.getLogger(__name__)


def check_compare(params: Params) -> None:
    """``strategy: auto`` trains one chosen student: refuse it together with ``train.compare``
    (``teacher: auto`` with a compare list chooses the teacher, then compares the strategies)."""
    config = params.train
    if config.compare and config.strategy == "auto":
        raise MedtransferError(
            "train.strategy=auto chooses one strategy (its pilots compare the candidates: see "
            "the decision table), so it cannot be combined with train.compare; set "
            "train.strategy to one of the compared strategies, or drop train.compare."
        )


def check_single_label(dataset) -> None:
    """Refuse a multi-label dataset in one line: the evidence (k-NN AUC, LogME) and the
    pilots score one class per image."""
    if dataset.multilabel:
        raise MedtransferError(
            "The evidence step (medtransfer advise, train.teacher or train.strategy auto) is not "
            "yet supported for multi-label datasets; name train.teacher and train.strategy."
        )


def apply_auto(params: Params, progress: bool = True) -> tuple[Params, TransferChoice | None]:
    """Run the rule when anything is ``auto``; returns the parameters with the choice put in
    and the choice, or ``params`` and ``None`` when nothing is auto.

    Raises:
        MedtransferError: ``strategy: auto`` with ``train.compare``; a CUDA device the host
            lacks.
    """
    config = params.train
    if "auto" not in (config.teacher, config.strategy):
        return params, None
    check_compare(params)
    check_device(config.device)  # before the pilots train on it
    dataset = load_processed(params.data.processed_dir)
    check_single_label(dataset)
    choice = advise(params, progress)
    evidence: dict[str, list] = {}
    for row in choice.evidence:
        evidence.setdefault(row.teacher, []).append(row)
    n_train = len(dataset.indices("train"))
    candidates = rank_candidates(
        evidence, list(evidence), n_train, config.strategy, config.unfreeze_blocks
    )
    _record_evidence_choice(choice, params, n_train)
    if len(candidates) > 1:
        decision = successive_halving(params, dataset, candidates, progress)
        _take_pilot_decision(choice, decision)
    elif config.strategy != "auto":
        choice.strategy, choice.unfreeze_blocks = config.strategy, config.unfreeze_blocks
    chosen = {"teacher": choice.teacher}
    if config.strategy == "auto":
        chosen |= {"strategy": choice.strategy, "unfreeze_blocks": choice.unfreeze_blocks}
    logger.info(
        "auto decision (confidence %s, runner-up %s): %s; %s",
        choice.confidence,
        choice.runner_up or "none",
        ", ".join(f"train.{key}={value}" for key, value in chosen.items()),
        "; ".join(choice.reasons),
    )
    return replace(params, train=replace(config, **chosen)), choice


def _record_evidence_choice(choice: TransferChoice, params: Params, n_train: int) -> None:
    """Keep what the evidence alone chose, and the data facts the rule read."""
    choice.evidence_choice = {
        "teacher": choice.teacher,
        "strategy": choice.strategy,
        "unfreeze_blocks": choice.unfreeze_blocks,
        "confidence": choice.confidence,
    }
    size = params.data.image_size
    native = native_resolution(Path(params.data.source))
    suggested = smaller_size(native, size)
    choice.data_facts = {
        "n_train": n_train,
        "image_size": size,
        "native_size": native,
        "suggested_image_size": suggested,
    }
    if suggested is not None:
        choice.reasons.append(
            f"the source is stored at {native} px but trained at {size} px: its images were "
            f"upsampled; ingest at data.image_size={suggested} to train about "
            f"{(size / suggested) ** 2:.0f}x faster on the same information"
        )


def _take_pilot_decision(choice: TransferChoice, decision: PilotDecision) -> None:
    """The pilots' winner replaces the evidence's choice; the table and the words follow."""
    winner = decision.chosen.candidate
    choice.teacher, choice.strategy = winner.teacher, winner.strategy
    choice.unfreeze_blocks = winner.unfreeze_blocks
    choice.confidence = decision.confidence
    choice.runner_up = decision.runner_up.candidate.label if decision.runner_up else None
    choice.pilots = decision.to_dict()
    choice.reasons = [*decision.reasons, *(f"evidence: {r}" for r in choice.reasons)]
    choice.seconds += decision.seconds


def decision_rows(choice: TransferChoice) -> list[dict]:
    """The decision table's rows (one per piloted candidate), for reports and MLflow."""
    if not choice.pilots:
        return []
    chosen = choice.pilots["chosen"]["label"]
    return [{**row, "chosen": row["label"] == chosen} for row in choice.pilots["pilots"]]


def decision_table(choice: TransferChoice) -> list[str]:
    """The decision table as markdown lines (the model card and the train report carry it)."""
    lines = [
        "| candidate | why a candidate | epochs | val AUC [95% CI] | teacher-transfer | "
        "mimicry | exposure [95% CI] (n) | gate | chosen |",
        "| --- | --- | ---: | --- | ---: | ---: | --- | --- | --- |",
    ]
    for row in decision_rows(choice):
        lines.append(
            f"| {row['label']} | {row['why']} | {row['epochs']} | {row['val_auc']:.3f} "
            f"[{row['val_auc_low']:.3f}, {row['val_auc_high']:.3f}] | {_exposure_cells(row)} | "
            f"{'**yes**' if row['chosen'] else ''} |"
        )
    return lines


def _exposure_cells(row: dict) -> str:
    """The table's teacher-transfer, mimicry, exposure and gate cells of one pilot: measured
    on the finalists only (a pilot cut in an earlier round has none)."""
    if not math.isfinite(row["exposure"]):
        return "- | - | not measured (not a finalist) | -"
    return (
        f"{row['transfer_success']:.2f} | {row['mimicry_success']:.2f} | "
        f"{row['exposure']:.2f} [{row['exposure_low']:.2f}, {row['exposure_high']:.2f}] "
        f"({row['exposure_n']}) | {'pass' if row['passes'] else 'FAIL'}"
    )


def plot_decision(choice: TransferChoice, path) -> bool:
    """Validation AUC against inherited exposure, one point per piloted candidate with both
    95% intervals, the gate as a vertical line; written to ``path``. False when no pilots ran."""
    rows = [row for row in decision_rows(choice) if math.isfinite(row["exposure"])]
    if not rows:
        return False
    import matplotlib  # deferred: matplotlib only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        x, y = row["exposure"], row["val_auc"]
        axis.errorbar(
            x, y,
            xerr=[[x - row["exposure_low"]], [row["exposure_high"] - x]],
            yerr=[[y - row["val_auc_low"]], [row["val_auc_high"] - y]],
            fmt="*" if row["chosen"] else "o", markersize=14 if row["chosen"] else 7,
            capsize=3, label=f"{row['label']}{' (chosen)' if row['chosen'] else ''}",
        )  # fmt: skip
    gate = choice.pilots.get("gate")
    if gate is not None:
        axis.axvline(gate, color="red", linestyle="--", label=f"gate (upper bound <= {gate})")
    axis.set(
        xlabel="inherited exposure: teacher-transfer success (worse mode, 95% Wilson)",
        ylabel="validation AUC (95% patient bootstrap)",
        title="auto: accuracy against inherited exposure",
    )
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
