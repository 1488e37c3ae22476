"""How the sweep reports itself: progress per finished budget, and the curves as DVC plot data."""

from __future__ import annotations

import logging

from tqdm import tqdm

from tasks.robustness.result import EpsilonRow, RobustnessResult, metric_key
from tasks.robustness.suite import all_measures

# The stage's logger: progress lines belong to ``medtransfer robustness``'s log.
logger = logging.getLogger("tasks.stages.robustness")


def curve_rows(result: RobustnessResult, reference: RobustnessResult | None) -> list[dict]:
    """The robustness curves as DVC plot data: one row per model, measure and budget, with
    its 95% interval."""
    rows = []
    for model, measured in (("student", result), ("frozen-teacher probe", reference)):
        if measured is None:
            continue
        intervals, sizes = measured.to_intervals(), measured.sizes()
        for row in measured.to_table():
            for measure in (m.name for m in all_measures()):
                key = metric_key(measure, row["eps"])
                if key in intervals:
                    low, high = intervals[key]
                    rows.append(
                        {
                            "model": model,
                            "attack": measure,
                            "eps_255": row["eps_255"],
                            "value": row[measure],
                            "ci_low": low,
                            "ci_high": high,
                            "n": sizes[key],
                        }
                    )
    return rows


class BudgetProgress:
    """Attack progress for one model: a log line per finished budget and, when ``enabled``,
    a terminal bar over the budgets (a context manager that closes the bar)."""

    def __init__(self, model_name: str, budgets: int, n_images: int, enabled: bool) -> None:
        self.model_name, self.n_images = model_name, n_images
        self.bar = tqdm(total=budgets, desc="attacks", unit="budget", disable=not enabled)

    def __enter__(self) -> BudgetProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()

    def __call__(self, row: EpsilonRow) -> None:
        if row.eps == 0.0:
            return
        self.bar.update(1)
        logger.info(
            "robustness: %s at %.2f/255 on %d images: %s",
            self.model_name,
            row.eps * 255,
            self.n_images,
            ", ".join(f"{name} {value:.3f}" for name, value in row.measures().items()),
        )
