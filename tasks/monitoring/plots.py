"""The drift report's figure: each statistic's PSI against the limit."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_drift(report: dict, path: Path) -> Path:
    """A bar per statistic of ``report`` (:func:`tasks.monitoring.drift.compare`'s), red where
    it drifted, and the ``psi_max`` line; saved as a PNG at ``path``, which it returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(report["psi"])
    values = [report["psi"][n] if np.isfinite(report["psi"][n]) else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names)), 3))  # 14 bars for colour
    ax.bar(names, values, color=["C3" if n in report["drifted"] else "C0" for n in names])
    ax.axhline(report["psi_max"], color="k", linestyle="--", label="psi_max")
    ax.tick_params(axis="x", labelrotation=45)
    ax.set_ylabel("PSI vs training")
    ax.set_title(f"{report['n']} recent requests, abstained {report['abstention_share']:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
