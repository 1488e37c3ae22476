"""The per-strategy table of a ``train.compare`` run: each saved strategy's student attacked
like the main one, with the measures of every gated attack at its gate's budget."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from tasks.model.student_io import STRATEGIES_SUBDIR, load_student
from tasks.robustness.result import EPS_SEPARATOR, RobustnessResult, format_eps, metric_key
from tasks.robustness.suite import registered_attacks

# (model, what to call it in progress lines) -> its result at every budget
AttackModel = Callable[[nn.Module, str], RobustnessResult]


def _columns(gates: Mapping[str, object]) -> dict[str, float]:
    """``{measure: budget}``: every measure of an attack that declares a gate, at that gate's
    budget (its default when the gate's budget is unset)."""
    columns: dict[str, float] = {}
    for attack in registered_attacks():
        for gate in attack.gates:
            eps = float(gates.get(gate.budget) or gate.default_eps)  # type: ignore[arg-type]
            columns.update({measure.name: eps for measure in attack.measures})
    return columns


def compare_strategies(
    model_dir: Path, attack: AttackModel, gates: Mapping[str, object]
) -> list[dict]:
    """Attack every strategy saved by a ``train.compare`` run; one table row each.

    Args:
        model_dir: the train stage's model folder (strategies under ``STRATEGIES_SUBDIR``).
        attack: the run's attack at every budget (``attack(model, label)``).
        gates: the gates in pixel units (their budgets choose the columns' budgets).

    Returns:
        One dict per strategy: its name, frozen parameter tensors, clean accuracy, n, each
        column's value and the 95% intervals at the columns' budgets (``ci95``).
    """
    folder = model_dir / STRATEGIES_SUBDIR
    if not folder.is_dir():
        return []
    columns = _columns(gates)
    budgets = {format_eps(eps) for eps in columns.values()}
    rows = []
    for strategy_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        model, _ = load_student(strategy_dir)
        result = attack(model, f"saved {strategy_dir.name} student")
        metrics, intervals = result.to_metrics(), result.to_intervals()
        frozen = (
            sum(1 for m in model.frozen_modules() for p in m.parameters())
            if hasattr(model, "frozen_modules")
            else 0
        )
        rows.append(
            {
                "strategy": strategy_dir.name,  # the variant, e.g. partial+pgd
                "frozen_parameter_tensors": frozen,
                "clean_acc": result.clean_acc,
                "n_examples": result.n_examples,
                **{name: metrics.get(metric_key(name, eps)) for name, eps in columns.items()},
                "ci95": {
                    key: bounds
                    for key, bounds in intervals.items()
                    if key.rpartition(EPS_SEPARATOR)[2] in budgets
                },
            }
        )
    return rows
