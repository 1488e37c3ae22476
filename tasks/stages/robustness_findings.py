"""The robustness stage for a multi-label student: flip rates per finding and "any finding
flipped" (:mod:`tasks.robustness.findings_robustness`), and the verdict.

:func:`tasks.stages.robustness.run_robustness` hands a multi-label student here. The verdict:
``min_clean_auc`` on the test macro AUC's lower bound; the attack gates on "any finding
flipped" at their budgets, on the Wilson interval's unfavourable bound:
``max_teacher_transfer_success`` (teacher-transfer), ``max_universal_fooling`` (universal),
``min_robust_acc`` (the share of images with no finding flipped by white-box PGD).
``max_square_success`` (query-only Square) and ``min_worst_group_auc`` (per-group AUC) are
not measured for multi-label models: a set Square gate fails the verdict saying so; the group
gate passes saying no group could be judged (as for a dataset without groups).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tasks import reports
from tasks.config import Params
from tasks.data.dataset import ProcessedDataset
from tasks.errors import MedtransferError
from tasks.evaluation import plot_data
from tasks.evaluation.evaluation import evaluate_configured
from tasks.figures import verdict_figures, write_figures
from tasks.model.label_kind import MULTI_LABEL
from tasks.model.student_io import StudentSpec
from tasks.model.teacher_models import teacher_feature_extractor
from tasks.robustness.attacks.universal import natural_crops
from tasks.robustness.findings_robustness import ATTACKS, FindingFlips, measure_findings
from tasks.robustness.gates import Verdict, gate_verdict
from tasks.robustness.result import Rate, format_eps
from tasks.robustness.suite import all_gates, attack_subset
from tasks.tracking.robustness_run import log_robustness

logger = logging.getLogger(__name__)

# gate threshold -> (attack, its budget's key, whether the rate is "no finding flipped")
MAPPED_GATES = {
    "max_teacher_transfer_success": ("teacher_transfer", "teacher_transfer_eps", False),
    "max_universal_fooling": ("universal", "universal_eps", False),
    "min_robust_acc": ("white_box", "robust_acc_eps", True),
}


def run_robustness_findings(
    params: Params, dataset: ProcessedDataset, student: nn.Module, spec: StudentSpec
) -> dict:
    """Attack the multi-label ``student``; write and return the robustness report
    (``verdict``, ``metrics``, ``table`` of flip rates with intervals, the clean macro AUC)."""
    config, seed = params.robustness, params.seed
    clean = evaluate_configured(student, dataset, params.eval, seed)
    temperatures = torch.as_tensor(clean.temperature, dtype=torch.float32)

    def decide(logits: np.ndarray) -> np.ndarray:
        probabilities = MULTI_LABEL.probabilities(torch.from_numpy(logits), temperatures)
        return MULTI_LABEL.decide(probabilities.numpy(), clean.threshold)

    images, labels = attack_subset(dataset, config.max_samples, seed)
    logger.info("robustness: attacking the multi-label %s student", spec.strategy)
    flips = measure_findings(
        student,
        teacher_feature_extractor(spec.teacher, channels=spec.channels),
        images,
        labels,
        decide,
        config,
        dataset.classes,
        natural_crops(config.universal_images, dataset.image_size, seed, dataset.channels),
        seed,
    )
    verdict = findings_verdict(flips, clean, params.gates.in_pixels())
    report = {
        "label_kind": MULTI_LABEL.name,
        "verdict": verdict.to_report(),
        "clean_test_auc": clean.test.auc,
        "clean_test_auc_ci95": list(clean.intervals.get("auc", (None, None))),
        "n_examples": flips.n_examples,
        "strategy": spec.strategy,
        "metrics": flips.to_metrics(),
        "table": flips.to_table(),
        "reference_probe": None,
        "strategies": [],
        "config": {"epsilons": list(config.epsilons), "attacks": list(ATTACKS)},
    }
    from tasks.stages.robustness import judged_run_id

    report["run_id"] = judged_run_id(params)
    plot = plot_any_flip(flips, reports.plot_path(params.reports_dir, "robustness.png"))
    plot_data.write_rows(params.reports_dir, plot_data.ROBUSTNESS, curve_rows(flips))
    reports.ROBUSTNESS.write(params.reports_dir, report)
    write_figures(params.reports_dir, "robustness", verdict_figures(report["verdict"]))
    log_robustness(params, report, plot)
    logger.info("robustness verdict: %s", "PASS" if verdict.passed else "FAIL")
    return report


def findings_verdict(flips: FindingFlips, clean, gates: dict) -> Verdict:
    """The verdict (see the module docstring): the clean macro AUC gate through
    :func:`tasks.robustness.gates.gate_verdict`, then each mapped attack gate on "any
    finding flipped"."""
    attack_keys = {gate.threshold for gate in all_gates()}
    base = gate_verdict(
        {},
        clean.test.auc,
        {k: (None if k in attack_keys else v) for k, v in gates.items()},
        clean_auc_interval=clean.intervals.get("auc"),
        n_test=len(clean.labels["test"]),
        worst_group=None,
    )
    reasons, checked, rows = list(base.reasons), list(base.checked), list(base.gates)
    for threshold in sorted(attack_keys):
        limit = gates.get(threshold)
        if limit is None:
            continue
        if threshold not in MAPPED_GATES:
            sentence = f"{threshold} is not measured for multi-label models; set it to null"
            reasons.append(sentence)
            checked.append("FAIL: " + sentence)
            continue
        row = _mapped_gate(flips, threshold, float(limit), gates)
        rows.append(row)
        checked.append(("PASS: " if row["passed"] else "FAIL: ") + row["sentence"])
        if not row["passed"]:
            reasons.append(row["sentence"])
    return Verdict(passed=not reasons, reasons=reasons, checked=checked, gates=rows)


def _mapped_gate(flips: FindingFlips, threshold: str, limit: float, gates: dict) -> dict:
    """One attack gate on the "any finding flipped" rate at its budget, as a gate row."""
    attack, budget_key, unflipped = MAPPED_GATES[threshold]
    eps = gates.get(budget_key)
    measured = {format_eps(e): rates for e, rates in flips.rates[attack].items()}
    if eps is None or format_eps(float(eps)) not in measured:
        raise MedtransferError(
            f"Gate {threshold} asks for {attack} at {budget_key}={eps!r}, but the robustness "
            f"check measured budgets {sorted(measured) or 'none'}. Add the budget to the "
            "robustness epsilons in params.yaml or change the gate."
        )
    rate: Rate = measured[format_eps(float(eps))][1]
    low, high = rate.interval
    if unflipped:  # the share with no finding flipped, whose lower bound must reach the limit
        value, low, high = 1 - rate.value, 1 - high, 1 - low
        ok, bound, word = low >= limit, low, "no finding flipped"
    else:
        value, ok, bound, word = rate.value, high <= limit, high, "any finding flipped"
    sentence = (
        f"{word} by {attack} at eps {eps * 255:.2g}/255 is {value:.3f} [{low:.3f}, "
        f"{high:.3f}] n={rate.n}: its {'lower' if unflipped else 'upper'} bound "
        f"{'meets' if ok else 'misses'} {limit:.3f}"
    )
    name = threshold.removeprefix("min_").removeprefix("max_")
    return {
        "name": name,
        "estimate": value,
        "ci_low": low,
        "ci_up": high,
        "n": rate.n,
        "bound": bound,
        "limit": limit,
        "passed": bool(ok),
        "sentence": sentence,
    }


def curve_rows(flips: FindingFlips) -> list[dict]:
    """The DVC plot data (``robustness_curves.json``): one row per attack, finding (or
    ``any``) and budget, ``attack`` naming both (``white_box any``), with its interval."""
    return [
        {
            "model": "student",
            "attack": f"{row['attack']} {row['finding']}",
            "eps_255": row["eps_255"],
            "value": row["flip_rate"],
            "ci_low": row["ci_low"],
            "ci_high": row["ci_high"],
            "n": row["n"],
        }
        for row in flips.to_table()
    ]


def plot_any_flip(flips: FindingFlips, path: Path) -> Path:
    """ "Any finding flipped" against the budget, one line per attack with its Wilson band."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    for attack, budgets in flips.rates.items():
        eps = sorted(budgets)
        rates = [budgets[e][1] for e in eps]
        x = [e * 255 for e in eps]
        ax.plot(x, [r.value for r in rates], marker="o", label=attack)
        bands = np.array([r.interval for r in rates], dtype=float)
        ax.fill_between(x, bands[:, 0], bands[:, 1], alpha=0.15)
    ax.set(xlabel="L-inf budget (1/255)", ylabel="any finding flipped", ylim=(0, 1.02))
    ax.set_title(f"multi-label student under attack (n={flips.n_examples})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
