"""Whether a student may be promoted: the robustness gates, decided on 95% intervals.

The gates are ``min_clean_auc`` and the ones the registered attacks declare
(:class:`~tasks.robustness.attacks._base.Gate`), each at its own budget; thresholds come from
the ``gates`` section of ``params.yaml`` (null turns a gate off). Pure logic on the logged
metrics: the registry reads the verdict from the robustness report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.errors import MedtransferError
from tasks.robustness.attacks._base import Gate
from tasks.robustness.result import (
    EPS_SEPARATOR,
    Interval,
    RobustnessResult,
    format_eps,
    metric_key,
)
from tasks.robustness.suite import all_gates, all_measures

CLEAN_AUC_GATE = "min_clean_auc"
WORST_GROUP_GATE = "min_worst_group_auc"


def known_gates(gates: tuple[Gate, ...] | None = None) -> tuple[str, ...]:
    """Every gate key: ``min_clean_auc``, ``min_worst_group_auc``, then each attack gate's
    threshold and budget."""
    declared = all_gates() if gates is None else gates
    return (
        CLEAN_AUC_GATE,
        WORST_GROUP_GATE,
        *(key for gate in declared for key in (gate.threshold, gate.budget)),
    )


@dataclass(frozen=True)
class Verdict:
    """Whether a student may be promoted.

    Attributes:
        passed: every configured gate held.
        reasons: one sentence per failed gate (empty when ``passed``); the registry tags the
            model version with them.
        checked: one sentence per gate that was evaluated, passed or not.
        gates: the same gates as numbers, one mapping each: ``name`` (``clean_auc``, or the
            gate's threshold key without ``min_``/``max_``), ``estimate``, ``ci_low``,
            ``ci_up``, ``n``, the decisive ``bound`` (lower for a minimum, upper for a
            maximum), its ``limit`` and ``passed`` (what ``dvc metrics show`` shows,
            :mod:`tasks.figures`).
    """

    passed: bool
    reasons: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)

    def to_report(self) -> dict:
        """The robustness report's ``verdict`` block: these four fields as JSON values."""
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "checked": list(self.checked),
            "gates": list(self.gates),
        }


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


def _check_known_gates(gates: Mapping[str, object], known: tuple[str, ...]) -> None:
    """Refuse an unknown gate name: a typo must not silently disable a gate."""
    unknown = sorted(set(gates) - set(known))
    if unknown:
        raise MedtransferError(f"Unknown robustness gates {unknown}; known gates: {list(known)}.")


def gate_verdict(
    result_metrics: Mapping[str, float],
    clean_auc: float,
    gates: Mapping[str, object],
    *,
    result: RobustnessResult | None = None,
    clean_auc_interval: Interval | None = None,
    n_test: int | None = None,
    worst_group: Mapping[str, object] | None = None,
) -> Verdict:
    """Decide promotion from the measured metrics, on their 95% intervals' unfavourable bounds.

    Args:
        result_metrics: metrics as produced by :meth:`RobustnessResult.to_metrics` (or read
            back from MLflow).
        clean_auc: the student's clean ROC AUC on the test split.
        gates: thresholds (pixel-unit budgets, :meth:`tasks.config.GatesParams.in_pixels`); a
            missing or null threshold turns its gate off. ``min_clean_auc``: the AUC
            interval's lower bound must be at least this; every attack gate: its measures at
            its budget, the worst of them deciding (``min_*`` on the lower bound, ``max_*`` on
            the upper bound), e.g. ``max_teacher_transfer_success`` at ``teacher_transfer_eps``
            on the stronger of the untargeted and mimicry attacks.
        result: the measurements behind ``result_metrics``: their Wilson intervals and sizes.
            Without it (or for a metric it lacks) the estimate is its own interval.
        clean_auc_interval: the AUC's bootstrap interval; n_test: the test images behind it.
        worst_group: the group ``min_worst_group_auc`` judges
            (:func:`tasks.evaluation.group_metrics.worst_group`: ``attribute``, ``group``,
            ``n_patients``, ``auc``, ``auc_ci_low``, ``auc_ci_high``), or None when no group
            could be judged (the gate then passes and says so).

    Returns:
        A :class:`Verdict`; every sentence states n, the estimate and the interval. A failed
        gate, or a NaN metric, is a normal outcome with a reason.

    Raises:
        MedtransferError: an unknown gate name (a typo must not silently disable a gate), a
            threshold without its budget, or a budget that was not measured.
    """
    _check_known_gates(gates, known_gates())
    checks = _Checks(result)
    if gates.get(CLEAN_AUC_GATE) is not None:
        interval = clean_auc_interval or (clean_auc, clean_auc)
        minimum = float(gates[CLEAN_AUC_GATE])  # type: ignore[arg-type]
        checks.at_least("clean AUC", clean_auc, interval, n_test, minimum, name="clean_auc")
    if gates.get(WORST_GROUP_GATE) is not None:
        _worst_group_gate(checks, worst_group, float(gates[WORST_GROUP_GATE]))  # type: ignore[arg-type]
    labels = {measure.name: measure.label for measure in all_measures()}
    for gate in all_gates():
        if gates.get(gate.threshold) is not None:
            _attack_gate(result_metrics, gates, checks, gate, labels)
    return Verdict(
        passed=not checks.reasons,
        reasons=checks.reasons,
        checked=checks.checked,
        gates=checks.gates,
    )


def _worst_group_gate(checks: _Checks, worst: Mapping | None, minimum: float) -> None:
    """``min_worst_group_auc`` on the weakest group's AUC lower bound (n in patients)."""
    if worst is None:
        checks.check(
            True,
            "the worst group's AUC is not judged: no group of eval.groups (nor their pool) has "
            "eval.min_group_size test patients with both classes",
        )
        return
    interval = (float(worst["auc_ci_low"]), float(worst["auc_ci_high"]))  # type: ignore[arg-type]
    checks.at_least(
        f"the worst group's AUC ({worst['attribute']} = {worst['group']}, in patients)",
        float(worst["auc"]),  # type: ignore[arg-type]
        interval,
        int(worst["n_patients"]),  # type: ignore[call-overload]
        minimum,
        name="worst_group_auc",
    )


def _attack_gate(
    result_metrics: Mapping[str, float],
    gates: Mapping[str, object],
    checks: _Checks,
    gate: Gate,
    labels: Mapping[str, str],
) -> None:
    """One attack gate at its budget: the worst of its measures (by the bound that decides)
    against the threshold; the first measure must have been measured, the others may not."""
    eps = _gate_eps(gates, gate.budget, gate.threshold)
    first, *others = gate.measures
    values = {first: _lookup(result_metrics, first, eps, gate.budget)}
    for measure in others:
        if metric_key(measure, eps) in result_metrics:
            values[measure] = float(result_metrics[metric_key(measure, eps)])
    if any(math.isnan(value) for value in values.values()):
        checks.check(
            False,
            f"{labels[first]} at eps {format_eps(eps)} is undefined (NaN): there was nothing to "
            "measure it on (for a success rate: the student classified no evaluation example "
            "correctly)",
        )
        return
    minimum = gate.threshold.startswith("min_")

    def decisive_bound(measure: str) -> float:
        low, high = checks.interval(metric_key(measure, eps), values[measure])
        return low if minimum else high

    worst = (min if minimum else max)(values, key=decisive_bound)
    key = metric_key(worst, eps)
    decide = checks.at_least if minimum else checks.at_most
    decide(
        f"{labels[worst]} at eps {_budget(eps)}",
        values[worst],
        checks.interval(key, values[worst]),
        checks.n(key),
        float(gates[gate.threshold]),  # type: ignore[arg-type]
        name=gate.threshold.removeprefix("min_").removeprefix("max_"),
    )


def _budget(eps: float) -> str:
    return f"{format_eps(eps)} ({eps * 255:.2g}/255)"


class _Checks:
    """Collects gate sentences: ``PASS:``/``FAIL:`` lines and the failures' reasons."""

    def __init__(self, result: RobustnessResult | None) -> None:
        self.intervals = result.to_intervals() if result is not None else {}
        self.sizes = result.sizes() if result is not None else {}
        self.reasons: list[str] = []
        self.checked: list[str] = []
        self.gates: list[dict] = []

    def interval(self, key: str, value: float) -> Interval:
        return self.intervals.get(key, (value, value))

    def n(self, key: str) -> int | None:
        return self.sizes.get(key)

    def check(self, ok: bool, sentence: str) -> None:
        self.checked.append(("PASS: " if ok else "FAIL: ") + sentence)
        if not ok:
            self.reasons.append(sentence)

    def record(
        self,
        name: str,
        value: float,
        interval: Interval,
        n: int | None,
        limit: float,
        decisive: float,
        ok: bool,
    ) -> None:
        """The gate as numbers (:attr:`Verdict.gates`): ``decisive`` is the interval's lower
        end for a minimum, the upper for a maximum."""
        self.gates.append(
            {
                "name": name,
                "estimate": value,
                "ci_low": interval[0],
                "ci_up": interval[1],
                "n": n,
                "bound": decisive,
                "limit": limit,
                "passed": ok,
            }
        )

    def at_least(
        self,
        what: str,
        value: float,
        interval: Interval,
        n: int | None,
        bound: float,
        name: str = "",
    ) -> None:
        """Passes when the interval's lower end reaches ``bound``."""
        self._bounded(what, value, interval, n, bound, name, minimum=True)

    def at_most(
        self,
        what: str,
        value: float,
        interval: Interval,
        n: int | None,
        bound: float,
        name: str = "",
    ) -> None:
        """Passes when the interval's upper end stays within ``bound``."""
        self._bounded(what, value, interval, n, bound, name, minimum=False)

    def _bounded(
        self,
        what: str,
        value: float,
        interval: Interval,
        n: int | None,
        bound: float,
        name: str,
        *,
        minimum: bool,
    ) -> None:
        decisive = interval[0] if minimum else interval[1]
        # NaN compares false both ways, so the test is written as "bound satisfied".
        ok = decisive >= bound if minimum else decisive <= bound
        if name:
            self.record(name, value, interval, n, bound, decisive, ok)
        side, verb = ("lower", ">=") if minimum else ("upper", "<=")
        failed = "is below the required" if minimum else "is above the allowed"
        self.check(
            ok,
            f"{what} is {_estimate(value, interval, n)}: its {side} bound "
            f"{verb if ok else failed} {bound:.3f}",
        )


def _estimate(value: float, interval: Interval, n: int | None) -> str:
    """``0.600 (95% CI 0.313-0.832, n=10)``."""
    size = f", n={n}" if n is not None else ""
    return f"{value:.3f} (95% CI {interval[0]:.3f}-{interval[1]:.3f}{size})"
