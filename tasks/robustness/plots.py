"""The robustness curves: accuracy against the L-inf budget for every attack's accuracy measure,
with an optional reference curve (the frozen-teacher probe), as a PNG."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from tasks.robustness.result import NOT_MEASURED, RobustnessResult
from tasks.robustness.suite import all_measures

_STYLES = ("D-", "o-", "s-", "^-", "v-", "x:", "P-", "*-", "h-")


@dataclass(frozen=True)
class ReferenceCurve:
    """A comparison curve for the plot, e.g. the frozen-teacher linear probe's accuracy."""

    label: str
    accuracy_by_eps: Mapping[float, float]

    @classmethod
    def from_result(
        cls, result: RobustnessResult, label: str, measure: str = "robust_acc_pgd"
    ) -> ReferenceCurve:
        """One measure (``robust_acc_pgd``, ``teacher_transfer_acc``...) of a result."""
        return cls(label, {row.eps: float(row[measure]) for row in result.rows})


def plot_robustness_curves(
    result: RobustnessResult,
    path: str | Path,
    *,
    reference: ReferenceCurve | None = None,
    title: str = "Student accuracy under attack",
) -> Path:
    """Accuracy vs L-inf budget for every registered accuracy measure (and an optional
    reference curve), as a PNG.

    Args:
        result: the measurements.
        path: where to write the PNG; parent folders are created.
        reference: a dashed comparison curve (e.g. the frozen-teacher linear probe).
        title: the figure title.

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = robustness_figure(result, reference=reference, title=title)
    fig.savefig(path, format="png")
    return path


def robustness_figure(
    result: RobustnessResult, *, reference: ReferenceCurve | None = None, title: str = ""
):
    """The figure :func:`plot_robustness_curves` saves (a matplotlib ``Figure``): a line and
    a 95% interval band per accuracy measure, the reference, the clean accuracy, and the
    legend beside the axes."""
    # Deferred: matplotlib is a heavy import. A bare Figure renders through Agg without
    # touching pyplot's global backend or figure list, so this is safe in worker processes
    # and never leaks figures.
    from matplotlib.figure import Figure

    x = [row.eps * 255.0 for row in result.rows]
    fig = Figure(figsize=(9.0, 4.2), dpi=120)
    ax = fig.add_subplot()
    accuracies = [m for m in all_measures() if m.kind == "accuracy"]
    for measure, style in zip(accuracies, itertools.cycle(_STYLES), strict=False):
        # An attack that is off (e.g. square_max_samples 0) has rows of NOT_MEASURED: no curve,
        # no legend entry for it.
        if any(row.rates.get(measure.name, NOT_MEASURED).n for row in result.rows):
            (line,) = ax.plot(
                x, [row[measure.name] for row in result.rows], style, label=measure.label
            )
            # The 95% Wilson interval of each point, as a band in the curve's colour.
            bounds = [row.rates[measure.name].interval for row in result.rows]
            ax.fill_between(
                x,
                [low for low, _ in bounds],
                [high for _, high in bounds],
                color=line.get_color(),
                alpha=0.15,
                linewidth=0,
            )
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
    ax.set_title(f"{title} (n={result.n_examples}, bands: 95% intervals)", fontsize="medium")
    ax.grid(alpha=0.3)
    # Beside the axes, not on them: a legend inside hid a curve (the noise line at the top).
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig
