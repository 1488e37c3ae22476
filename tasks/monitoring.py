"""``medtransfer monitor``: the served requests against the training profile.

Reads the latest ``monitor.window`` rows of the service's request store
(``serving.monitor_store``, :mod:`tasks.model.request_store`) and the profile packaging recorded
(``<reports_dir>/serving_profile/profile.json``), and compares, per statistic, the recent
distribution with the training one by the population stability index over the training deciles
(ten bins of 10% each): three image statistics, the OOD score and the positive-class probability.
Also the share of requests that abstained or were refused out of scope, with its 95% interval.
A PSI above ``monitor.psi_max`` or an abstention share above ``monitor.abstention_max`` is
drift. Writes ``<reports_dir>/monitor.json`` and ``plots/monitor.png`` and logs both to MLflow
(run ``monitor`` in the experiment).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from tasks import reports
from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.model.profile import PROFILE_FILE, DataProfile
from tasks.model.request_store import read_recent

logger = logging.getLogger(__name__)
MONITOR = reports.Report("monitor.json", "monitor")
PROFILE_DIR = "serving_profile"  # tasks.stages.package.SERVING_PROFILE_DIR
# A bin's share is floored here in the PSI: an empty bin would make it infinite.
PSI_FLOOR = 1e-4


def population_stability(values: np.ndarray, edges: list[float]) -> float:
    """PSI of ``values`` against the reference deciles ``edges`` (nine edges, ten bins of 10%).

    ``sum((a - e) * ln(a / e))`` over the bins, ``a`` the recent share, ``e`` = 0.1.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan")
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    actual = np.maximum(counts / len(values), PSI_FLOOR)
    expected = np.full(len(actual), 1.0 / len(actual))
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``successes / n``."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def run_monitor(params: Params) -> dict:
    """Compare the recent requests with the training profile; write and log the report.

    Raises:
        MedtransferError: no recorded profile (run ``medtransfer package``) or no request store.
    """
    folder = Path(params.reports_dir) / PROFILE_DIR
    profile = DataProfile.load(folder)
    if profile is None:
        raise MedtransferError(
            f"{folder / PROFILE_FILE} is missing: run `medtransfer package` first (it records "
            "the training data's profile the monitor compares with)."
        )
    store = Path(params.serving.monitor_store)
    if not store.is_file():
        raise MedtransferError(
            f"{store} does not exist: the service writes it (serving.monitor_store, relative to "
            "where `bentoml serve` runs); point -S serving.monitor_store=... at it."
        )
    rows = read_recent(store, params.monitor.window)
    report = compare(rows, profile, params)
    MONITOR.write(params.reports_dir, report)
    plot = _plot(report, reports.plot_path(params.reports_dir, "monitor.png"))
    _log_to_mlflow(params, report, plot)
    logger.info(
        "monitor: %d requests, drift: %s", report["n"], ", ".join(report["drifted"]) or "none"
    )
    return report


def compare(rows: list[dict], profile: DataProfile, params: Params) -> dict:
    """The monitor report of request ``rows`` against ``profile`` (see the module docstring)."""
    classified = [r for r in rows if not r["refused"]]
    psi: dict[str, float] = {}
    for name, edges in profile.statistics.items():
        psi[name] = population_stability(np.array([_num(r[name]) for r in classified]), edges)
    scores = np.array([_num(r["ood_score"]) for r in classified])
    psi["ood_score"] = population_stability(scores, profile.ood["score_deciles"])
    positive = [json.loads(r["probabilities"])[-1] for r in classified if r["probabilities"]]
    psi["probability"] = population_stability(np.array(positive), profile.probability_deciles)
    n = len(rows)
    held = sum(1 for r in rows if r["abstained"] or r["refused"])
    share = held / n if n else float("nan")
    config = params.monitor
    drifted = [name for name, value in psi.items() if value > config.psi_max]
    if n and share > config.abstention_max:
        drifted.append("abstention_share")
    return {
        "n": n,
        "window": config.window,
        "psi": psi,
        "psi_max": config.psi_max,
        "abstention_share": share,
        "abstention_interval": list(wilson_interval(held, n)),
        "abstention_expected": profile.ood["false_rejection"],
        "abstention_max": config.abstention_max,
        "drifted": drifted,
        "drift": bool(drifted),
    }


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def _plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(report["psi"])
    values = [report["psi"][n] if np.isfinite(report["psi"][n]) else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(names, values, color=["C3" if n in report["drifted"] else "C0" for n in names])
    ax.axhline(report["psi_max"], color="k", linestyle="--", label="psi_max")
    ax.set_ylabel("PSI vs training")
    ax.set_title(f"{report['n']} recent requests, abstained {report['abstention_share']:.1%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _log_to_mlflow(params: Params, report: dict, plot: Path) -> None:
    import mlflow

    from tasks.tracking.configure import configure_mlflow

    configure_mlflow(params)
    metrics = {f"psi_{k}": v for k, v in report["psi"].items() if np.isfinite(v)}
    metrics["abstention_share"] = report["abstention_share"] if report["n"] else 0.0
    metrics["requests"] = report["n"]
    with mlflow.start_run(run_name="monitor", tags={"stage": "monitor"}):
        mlflow.log_metrics(metrics)
        mlflow.set_tag("drift", str(report["drift"]).lower())
        mlflow.log_artifact(str(plot))
