"""What the robustness check measured, how it is named in MLflow, and whether it passes the gates.

Pure logic: no attack code, no MLflow import.
``tasks.robustness.attacks.evaluate_robustness`` fills a :class:`RobustnessResult`; the stage
wrapper logs ``result.to_metrics()`` and the plot, and the registry step calls
:func:`gate_verdict` on the logged metrics.

Metric names: ``<measure>_eps_<eps>`` with the budget written by :func:`format_eps` (four
decimals, pixel units on the [0, 1] scale), e.g. ``robust_acc_pgd_eps_0.0039`` for 1/255.
MLflow rejects ``@`` (and ``=``) in metric names, so the budget is joined with ``_eps_``; every
key uses only the characters MLflow accepts on every platform.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tasks.errors import MedtransferError

CLEAN_ACC = "clean_acc"
# Per-budget measures, in the order of the table and the plot.
PER_EPS_MEASURES = (
    "robust_acc_fgsm",
    "robust_acc_pgd",
    "robust_acc_apgd",
    "teacher_transfer_acc",
    "teacher_transfer_success",
    "teacher_mimicry_acc",
    "teacher_mimicry_success",
    "noise_acc",
    "universal_fooling",
)
# Rates whose denominator is the images the model got right on clean input; every other
# measure is a fraction of all evaluated images.
SUCCESS_MEASURES = ("teacher_transfer_success", "teacher_mimicry_success")
EPS_SEPARATOR = "_eps_"
EPS_DECIMALS = 4

KNOWN_GATES = (
    "min_clean_auc",
    "min_robust_acc",
    "robust_acc_eps",
    "max_teacher_transfer_success",
    "teacher_transfer_eps",
    "max_universal_fooling",
    "universal_eps",
)
Interval = tuple[float, float]


def format_eps(eps: float) -> str:
    """The budget as written in metric names: four decimals, ``1/255 -> "0.0039"``.

    Four decimals keep the usual budgets (multiples of 1/255 up to 16/255, and 0.5/255) apart;
    budgets that collide are refused by :func:`check_distinct_epsilons`. A gate's budget is
    matched through the same formatting, so ``1/255`` and ``0.0039`` name the same metric.
    """
    return f"{float(eps):.{EPS_DECIMALS}f}"


def metric_key(measure: str, eps: float) -> str:
    """``metric_key("robust_acc_pgd", 1/255) == "robust_acc_pgd_eps_0.0039"``."""
    return f"{measure}{EPS_SEPARATOR}{format_eps(eps)}"


def check_distinct_epsilons(epsilons: list[float] | tuple[float, ...]) -> None:
    """Refuse budgets that would share a metric name (equal to four decimals)."""
    seen: dict[str, float] = {}
    for eps in epsilons:
        text = format_eps(eps)
        if text in seen:
            raise MedtransferError(
                f"Budgets {seen[text]!r} and {eps!r} are both written {text} in metric names; "
                f"use budgets that differ in the first {EPS_DECIMALS} decimals."
            )
        seen[text] = eps


@dataclass(frozen=True)
class EpsilonRow:
    """Accuracies (fractions of the evaluated examples) and success rates at one L-inf budget.

    ``*_success`` is the fraction of the examples the student classified correctly on clean
    input that it misclassifies under the perturbation; NaN when it got none right.
    ``fgsm_acc`` and ``pgd_acc``: the share of images that attack left correct at every budget
    up to ``eps`` (a perturbation allowed at a smaller budget is allowed at this one), so
    neither rises with the budget. ``apgd_acc`` is the reported white-box robust accuracy: an
    image counts as robust at ``eps`` only if APGD-CE, PGD and FGSM at every budget up to
    ``eps`` all failed on it. ``universal_fooling``: the share of images whose prediction the universal
    perturbation (crafted on the teacher from natural images) changes. NaN: not measured.
    """

    eps: float
    fgsm_acc: float
    pgd_acc: float
    teacher_transfer_acc: float
    teacher_transfer_success: float
    teacher_mimicry_acc: float
    teacher_mimicry_success: float
    noise_acc: float
    apgd_acc: float = math.nan
    universal_fooling: float = math.nan

    def measures(self) -> dict[str, float]:
        """``{measure name: value}`` in :data:`PER_EPS_MEASURES` order."""
        return {
            "robust_acc_fgsm": self.fgsm_acc,
            "robust_acc_pgd": self.pgd_acc,
            "robust_acc_apgd": self.apgd_acc,
            "teacher_transfer_acc": self.teacher_transfer_acc,
            "teacher_transfer_success": self.teacher_transfer_success,
            "teacher_mimicry_acc": self.teacher_mimicry_acc,
            "teacher_mimicry_success": self.teacher_mimicry_success,
            "noise_acc": self.noise_acc,
            "universal_fooling": self.universal_fooling,
        }


@dataclass(frozen=True)
class RobustnessResult:
    """Everything the robustness check measured on one evaluation set.

    Attributes:
        clean_acc: the student's accuracy on the unperturbed images.
        n_examples: how many images were evaluated.
        rows: one :class:`EpsilonRow` per budget, budgets ascending.
        pgd_steps: iterations of PGD and of the teacher-transfer attacks.
        pgd_step_size: their step as a fraction of each budget.
        seed: the seed every random start and target choice derived from.
    """

    clean_acc: float
    n_examples: int
    rows: tuple[EpsilonRow, ...]
    pgd_steps: int
    pgd_step_size: float
    seed: int

    @property
    def epsilons(self) -> tuple[float, ...]:
        return tuple(row.eps for row in self.rows)

    def row(self, eps: float) -> EpsilonRow:
        """The row whose budget formats like ``eps``; :class:`MedtransferError` if none does."""
        for candidate in self.rows:
            if format_eps(candidate.eps) == format_eps(eps):
                return candidate
        raise MedtransferError(
            f"Budget {format_eps(eps)} was not measured; measured budgets: "
            f"{', '.join(format_eps(e) for e in self.epsilons)}."
        )

    def to_metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``clean_acc`` and ``<measure>_eps_<eps>`` for every budget."""
        metrics = {CLEAN_ACC: float(self.clean_acc)}
        for row in self.rows:
            for measure, value in row.measures().items():
                metrics[metric_key(measure, row.eps)] = float(value)
        return metrics

    @property
    def clean_correct(self) -> int:
        """How many evaluated images the model classified correctly on clean input."""
        return round(self.clean_acc * self.n_examples)

    def denominator(self, measure: str) -> int:
        """The number of images a measure is a fraction of."""
        return self.clean_correct if measure in SUCCESS_MEASURES else self.n_examples

    def to_intervals(self) -> dict[str, Interval]:
        """95% Wilson intervals ``{metric key: (low, high)}`` of ``clean_acc`` and every
        measured per-budget rate (the counts are the rate times its denominator)."""
        from tasks.evaluation.metrics import wilson_interval

        intervals = {CLEAN_ACC: wilson_interval(self.clean_correct, self.n_examples)}
        for row in self.rows:
            for measure, value in row.measures().items():
                if math.isfinite(value):
                    n = self.denominator(measure)
                    intervals[metric_key(measure, row.eps)] = wilson_interval(round(value * n), n)
        return intervals

    def to_table(self) -> list[dict[str, float]]:
        """One dict per budget (``eps``, ``eps_255`` = eps x 255, ``clean_acc``, the measures)."""
        return [
            {
                "eps": row.eps,
                "eps_255": row.eps * 255.0,
                CLEAN_ACC: self.clean_acc,
                **row.measures(),
            }
            for row in self.rows
        ]


@dataclass(frozen=True)
class Verdict:
    """Whether a student may be promoted.

    Attributes:
        passed: every configured gate held.
        reasons: one sentence per failed gate (empty when ``passed``); the registry tags the
            model version with them.
        checked: one sentence per gate that was evaluated, passed or not.
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def measured_epsilons(metrics: Mapping[str, float], measure: str) -> list[str]:
    """The formatted budgets for which ``metrics`` holds ``measure``."""
    prefix = measure + EPS_SEPARATOR
    return sorted(key[len(prefix) :] for key in metrics if key.startswith(prefix))


def _lookup(metrics: Mapping[str, float], measure: str, eps: float, gate_name: str) -> float:
    key = metric_key(measure, eps)
    if key not in metrics:
        measured = measured_epsilons(metrics, measure)
        raise MedtransferError(
            f"Gate {gate_name}={eps!r} asks for {key}, but the robustness check measured "
            f"{measure} only at budgets {measured or 'none'}. Add the budget to the robustness "
            "epsilons in params.yaml or change the gate."
        )
    return float(metrics[key])


def _gate_eps(gates: Mapping[str, object], name: str, needed_by: str) -> float:
    value = gates.get(name)
    if value is None:
        raise MedtransferError(
            f"Gate {needed_by} is set but {name} (the budget it applies to) is not."
        )
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MedtransferError(
            f"Gate {name} must be a number (a budget in pixel units), not {value!r}."
        )
    return float(value)


def _check_known_gates(gates: Mapping[str, object]) -> None:
    """Refuse an unknown gate name: a typo must not silently disable a gate."""
    unknown = sorted(set(gates) - set(KNOWN_GATES))
    if unknown:
        raise MedtransferError(
            f"Unknown robustness gates {unknown}; known gates: {list(KNOWN_GATES)}."
        )


def gate_verdict(
    result_metrics: Mapping[str, float],
    clean_auc: float,
    gates: Mapping[str, object],
    *,
    result: RobustnessResult | None = None,
    clean_auc_interval: Interval | None = None,
    n_test: int | None = None,
) -> Verdict:
    """Decide promotion from the measured metrics, on their 95% intervals' unfavourable bounds.

    Args:
        result_metrics: metrics as produced by :meth:`RobustnessResult.to_metrics` (or read
            back from MLflow).
        clean_auc: the student's clean ROC AUC on the test split.
        gates: thresholds from ``params.yaml``; a missing or null threshold turns its gate off:

            - ``min_clean_auc``: the AUC interval's lower bound must be at least this;
            - ``min_robust_acc`` at ``robust_acc_eps``: the lower bound of the white-box
              robust accuracy (``robust_acc_apgd``) at least this;
            - ``max_teacher_transfer_success`` at ``teacher_transfer_eps``: the upper bound of
              the stronger teacher-transfer attack's success rate (untargeted or mimicry) at
              most this;
            - ``max_universal_fooling`` at ``universal_eps``: the upper bound of the universal
              perturbation's fooling rate at most this.
        result: the measurements behind ``result_metrics``: their Wilson intervals and sizes.
            Without it (or for a metric it lacks) the estimate is its own interval.
        clean_auc_interval: the AUC's bootstrap interval; n_test: the test images behind it.

    Returns:
        A :class:`Verdict`; every sentence states n, the estimate and the interval. A failed
        gate, or a NaN metric, is a normal outcome with a reason.

    Raises:
        MedtransferError: an unknown gate name (a typo must not silently disable a gate), a
            threshold without its budget, or a budget that was not measured.
    """
    _check_known_gates(gates)
    checks = _Checks(result)
    if gates.get("min_clean_auc") is not None:
        interval = clean_auc_interval or (clean_auc, clean_auc)
        minimum = float(gates["min_clean_auc"])  # type: ignore[arg-type]
        checks.at_least("clean AUC", clean_auc, interval, n_test, minimum)
    if gates.get("min_robust_acc") is not None:
        _budget_gate(
            result_metrics, gates, checks, "min_robust_acc", "robust_acc_apgd",
            "white-box (APGD-CE) robust accuracy",
        )  # fmt: skip
    if gates.get("max_teacher_transfer_success") is not None:
        _transfer_gate(result_metrics, gates, checks)
    if gates.get("max_universal_fooling") is not None:
        _budget_gate(
            result_metrics, gates, checks, "max_universal_fooling", "universal_fooling",
            "universal-perturbation (natural images, teacher) fooling rate",
        )  # fmt: skip
    return Verdict(passed=not checks.reasons, reasons=checks.reasons, checked=checks.checked)


def _budget_gate(
    result_metrics: Mapping[str, float],
    gates: Mapping[str, object],
    checks: _Checks,
    gate: str,
    measure: str,
    label: str,
) -> None:
    """One gate on one measure at its budget: ``min_*`` gates on the interval's lower bound,
    ``max_*`` on its upper bound, at the budget its own key names (``robust_acc_eps``,
    ``universal_eps``)."""
    eps_gate = {
        "min_robust_acc": "robust_acc_eps",
        "max_universal_fooling": "universal_eps",
    }[gate]
    eps = _gate_eps(gates, eps_gate, gate)
    key = metric_key(measure, eps)
    value = _lookup(result_metrics, measure, eps, eps_gate)
    decide = checks.at_least if gate.startswith("min_") else checks.at_most
    decide(
        f"{label} at eps {_budget(eps)}",
        value,
        checks.interval(key, value),
        checks.n(key),
        float(gates[gate]),  # type: ignore[arg-type]
    )


def _transfer_gate(
    result_metrics: Mapping[str, float], gates: Mapping[str, object], checks: _Checks
) -> None:
    """The stronger teacher-transfer attack's success rate (by its upper bound) at most the gate."""
    bound = float(gates["max_teacher_transfer_success"])  # type: ignore[arg-type]
    eps = _gate_eps(gates, "teacher_transfer_eps", "max_teacher_transfer_success")
    keys = {
        "untargeted": metric_key("teacher_transfer_success", eps),
        "mimicry": metric_key("teacher_mimicry_success", eps),
    }
    values = {
        "untargeted": _lookup(
            result_metrics, "teacher_transfer_success", eps, "teacher_transfer_eps"
        )
    }
    if keys["mimicry"] in result_metrics:
        values["mimicry"] = float(result_metrics[keys["mimicry"]])
    if any(math.isnan(v) for v in values.values()):
        checks.check(
            False,
            f"teacher-transfer success rate at eps {format_eps(eps)} is undefined (NaN): the "
            "student classified no evaluation example correctly",
        )
        return
    kind = max(values, key=lambda k: checks.interval(keys[k], values[k])[1])
    checks.at_most(
        f"teacher-transfer ({kind}) attack success rate at eps {_budget(eps)}",
        values[kind],
        checks.interval(keys[kind], values[kind]),
        checks.n(keys[kind]),
        bound,
    )


def _budget(eps: float) -> str:
    return f"{format_eps(eps)} ({eps * 255:.2g}/255)"


class _Checks:
    """Collects gate sentences: ``PASS:``/``FAIL:`` lines and the failures' reasons."""

    def __init__(self, result: RobustnessResult | None) -> None:
        self.intervals = result.to_intervals() if result is not None else {}
        self.result = result
        self.reasons: list[str] = []
        self.checked: list[str] = []

    def interval(self, key: str, value: float) -> Interval:
        return self.intervals.get(key, (value, value))

    def n(self, key: str) -> int | None:
        if self.result is None:
            return None
        return self.result.denominator(key.rpartition(EPS_SEPARATOR)[0])

    def check(self, ok: bool, sentence: str) -> None:
        self.checked.append(("PASS: " if ok else "FAIL: ") + sentence)
        if not ok:
            self.reasons.append(sentence)

    def at_least(
        self, what: str, value: float, interval: Interval, n: int | None, bound: float
    ) -> None:
        # NaN compares false both ways, so the test is written as "bound satisfied".
        ok = interval[0] >= bound
        self.check(
            ok,
            f"{what} is {_estimate(value, interval, n)}: its lower bound "
            f"{'>=' if ok else 'is below the required'} {bound:.3f}",
        )

    def at_most(
        self, what: str, value: float, interval: Interval, n: int | None, bound: float
    ) -> None:
        ok = interval[1] <= bound
        self.check(
            ok,
            f"{what} is {_estimate(value, interval, n)}: its upper bound "
            f"{'<=' if ok else 'is above the allowed'} {bound:.3f}",
        )


def _estimate(value: float, interval: Interval, n: int | None) -> str:
    """``0.600 (95% CI 0.313-0.832, n=10)``."""
    size = f", n={n}" if n is not None else ""
    return f"{value:.3f} (95% CI {interval[0]:.3f}-{interval[1]:.3f}{size})"


@dataclass(frozen=True)
class ReferenceCurve:
    """A comparison curve for the plot, e.g. the frozen-teacher linear probe's accuracy."""

    label: str
    accuracy_by_eps: Mapping[float, float]

    @classmethod
    def from_result(
        cls, result: RobustnessResult, label: str, measure: str = "pgd_acc"
    ) -> ReferenceCurve:
        """One :class:`EpsilonRow` field (``pgd_acc``, ``teacher_transfer_acc``...) of a result."""
        return cls(label, {row.eps: float(getattr(row, measure)) for row in result.rows})


def plot_robustness_curves(
    result: RobustnessResult,
    path: str | Path,
    *,
    reference: ReferenceCurve | None = None,
    title: str = "Student accuracy under attack",
) -> Path:
    """Accuracy vs L-inf budget for every attack (and an optional reference curve), as a PNG.

    Args:
        result: the measurements.
        path: where to write the PNG; parent folders are created.
        reference: a dashed comparison curve (e.g. the frozen-teacher linear probe).
        title: the figure title.

    Returns:
        ``path`` as a :class:`Path`.
    """
    # A bare Figure renders through Agg without touching pyplot's global backend or figure list,
    # so this is safe in worker processes and never leaks figures.
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [row.eps * 255.0 for row in result.rows]
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.add_subplot()
    curves = (
        ("white-box APGD-CE, worst case (reported)", "apgd_acc", "D-"),
        ("white-box PGD", "pgd_acc", "o-"),
        ("white-box FGSM", "fgsm_acc", "s-"),
        ("teacher transfer (untargeted)", "teacher_transfer_acc", "^-"),
        ("teacher transfer (mimicry)", "teacher_mimicry_acc", "v-"),
        ("uniform noise", "noise_acc", "x:"),
    )
    for label, attr, style in curves:
        ax.plot(x, [getattr(row, attr) for row in result.rows], style, label=label)
    if reference is not None:
        ref_eps = sorted(reference.accuracy_by_eps)
        ax.plot(
            [e * 255.0 for e in ref_eps],
            [reference.accuracy_by_eps[e] for e in ref_eps],
            "k--",
            label=reference.label,
        )
    ax.axhline(
        result.clean_acc, color="grey", linewidth=0.8, label=f"clean ({result.clean_acc:.2f})"
    )
    ax.set_xlabel("L-inf budget (x 1/255 of the pixel range)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title} (n={result.n_examples})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
