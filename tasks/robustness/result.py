"""What the robustness check measured, and how it is named in MLflow.

Pure logic: no attack code, no MLflow import. :func:`tasks.robustness.suite.evaluate_robustness`
fills a :class:`RobustnessResult`; the stage logs ``result.to_metrics()`` and the plot, and
:func:`tasks.robustness.gates.gate_verdict` decides promotion on the logged metrics.

Metric names: ``<measure>_eps_<eps>`` with the budget written by :func:`format_eps` (four
decimals, pixel units on the [0, 1] scale), e.g. ``robust_acc_pgd_eps_0.0039`` for 1/255.
MLflow rejects ``@`` (and ``=``) in metric names, so the budget is joined with ``_eps_``; every
key uses only the characters MLflow accepts on every platform. Which measures exist is decided
by the registered attacks (:mod:`tasks.robustness.attacks`), not here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from tasks.errors import MedtransferError

CLEAN_ACC = "clean_acc"
EPS_SEPARATOR = "_eps_"
EPS_DECIMALS = 4
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
class Rate:
    """A measured fraction and the number of images it is a fraction of (its denominator):
    all evaluated images for an accuracy or a fooling rate, the clean-correct ones for a
    success rate. ``value`` is NaN when the rate was not measured or ``n`` is 0."""

    value: float
    n: int

    @classmethod
    def of(cls, hits: int, n: int) -> Rate:
        """``hits`` out of ``n`` (NaN when ``n`` is 0)."""
        return cls(hits / n if n else math.nan, int(n))

    @property
    def interval(self) -> Interval:
        """The 95% Wilson interval of the rate (its count is the rate times ``n``)."""
        # Deferred: tasks.evaluation.metrics imports scikit-learn, which reading a result
        # (the registry, the model card) does not otherwise need.
        from tasks.evaluation.metrics import wilson_interval

        if self.n == 0 or math.isnan(self.value):  # not measured (e.g. no clean-correct image)
            return (math.nan, math.nan)
        return wilson_interval(round(self.value * self.n), self.n)


NOT_MEASURED = Rate(math.nan, 0)


@dataclass(frozen=True)
class EpsilonRow:
    """Every measure at one L-inf budget: ``{measure name: Rate}``, in the attacks' order.

    The names and their meaning are the attacks' (:attr:`Attack.measures`): for example
    ``robust_acc_pgd`` is the share of images PGD left correct at every budget up to ``eps``,
    ``teacher_transfer_success`` the share of the clean-correct images the teacher-crafted
    perturbation flips. NaN: not measured.
    """

    eps: float
    rates: Mapping[str, Rate]

    def __getitem__(self, measure: str) -> float:
        return self.rates[measure].value

    def measures(self) -> dict[str, float]:
        """``{measure name: value}`` in the attacks' order."""
        return {name: rate.value for name, rate in self.rates.items()}


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

    def sizes(self) -> dict[str, int]:
        """``{metric key: n}``: how many images each measured rate is a fraction of."""
        sizes = {CLEAN_ACC: self.n_examples}
        for row in self.rows:
            for measure, rate in row.rates.items():
                sizes[metric_key(measure, row.eps)] = rate.n
        return sizes

    def to_intervals(self) -> dict[str, Interval]:
        """95% Wilson intervals ``{metric key: (low, high)}`` of ``clean_acc`` and every
        measured per-budget rate."""
        intervals = {CLEAN_ACC: Rate(self.clean_acc, self.n_examples).interval}
        for row in self.rows:
            for measure, rate in row.rates.items():
                if math.isfinite(rate.value):
                    intervals[metric_key(measure, row.eps)] = rate.interval
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
