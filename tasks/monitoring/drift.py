"""Drift: the served requests against the training profile.

Compares, per statistic, the recent distribution of request rows (:mod:`tasks.model.request_store`)
with the training one recorded in the :class:`~tasks.model.profile.DataProfile`, by the
population stability index over the training deciles (ten bins of 10% each): three image
statistics (for a colour model also per channel), the OOD score and the positive-class
probability (for more than two classes, or findings, each class's or finding's probability). Also the share of requests that abstained or were refused out of scope, with its 95% Wilson interval (undefined, null in the
report, for an empty window). With at least ``monitor.min_requests`` requests in the window, a
PSI above ``monitor.psi_max`` or an abstention share whose interval lies wholly above
``monitor.abstention_max`` is drift; with fewer, nothing is flagged and the report says so.
"""

from __future__ import annotations

import json

import numpy as np

from tasks.config import Params
from tasks.evaluation.metrics import wilson_interval
from tasks.model.profile import DataProfile

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


def compare(rows: list[dict], profile: DataProfile, params: Params) -> dict:
    """The monitor report of request ``rows`` against ``profile`` (see the module docstring)."""
    classified = [r for r in rows if not r["refused"]]
    psi: dict[str, float] = {}
    for name, edges in profile.statistics.items():
        # .get: a store written before per-channel columns existed has none (NaN: left out)
        psi[name] = population_stability(np.array([_num(r.get(name)) for r in classified]), edges)
    scores = np.array([_num(r["ood_score"]) for r in classified])
    psi["ood_score"] = population_stability(scores, profile.ood["score_deciles"])
    psi.update(_probability_psi(classified, profile))
    n = len(rows)
    held = sum(1 for r in rows if r["abstained"] or r["refused"])
    share = held / n if n else float("nan")
    config = params.monitor
    interval = wilson_interval(held, n)
    enough = n >= config.min_requests
    drifted = [name for name, value in psi.items() if value > config.psi_max] if enough else []
    # Decided on the interval, as the gates are: drift only when even its lower bound is above.
    if enough and interval[0] > config.abstention_max:
        drifted.append("abstention_share")
    return {
        "n": n,
        "window": config.window,
        "min_requests": config.min_requests,
        "enough_requests": enough,
        "psi": psi,
        "psi_max": config.psi_max,
        "abstention_share": share,
        "abstention_interval": list(interval),
        "abstention_expected": profile.ood["false_rejection"],
        "abstention_max": config.abstention_max,
        "drifted": drifted,
        "drift": bool(drifted),
    }


def _probability_psi(classified: list[dict], profile: DataProfile) -> dict[str, float]:
    """PSI of the served probabilities: ``probability`` (the positive class's) for two classes,
    ``probability_<k>`` for each class or finding column ``k`` otherwise."""
    served = [json.loads(r["probabilities"]) for r in classified if r["probabilities"]]
    if not profile.class_probability_deciles:
        positive = np.array([p[-1] for p in served])
        return {"probability": population_stability(positive, profile.probability_deciles)}
    columns = np.array(served, dtype=np.float64).reshape(len(served), -1)
    return {
        f"probability_{k}": population_stability(
            columns[:, k] if k < columns.shape[1] else np.zeros(0), edges
        )
        for k, edges in enumerate(profile.class_probability_deciles)
    }


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def summary_lines(report: dict) -> list[str]:
    """What ``medtransfer monitor`` prints: requests compared, the abstention share with its
    interval, each drifted statistic, and the verdict (or how many more requests it needs)."""
    n, needed = report["n"], report["min_requests"]
    low, high = report["abstention_interval"]
    share = report["abstention_share"]
    lines = [f"monitor: {n} recent requests compared with the training profile"]
    if n:
        lines.append(
            f"  abstained or refused: {share:.3f} (95% CI {low:.3f}-{high:.3f}, n={n}); "
            f"expected {report['abstention_expected']:.3f}, drift above "
            f"{report['abstention_max']:.3f}"
        )
    psi = ", ".join(f"{name} {value:.2f}" for name, value in report["psi"].items())
    lines.append(f"  PSI (drift above {report['psi_max']:.2f}): {psi}")
    if not report["enough_requests"]:
        return [
            *lines,
            f"drift: not judged, {n} of the {needed} requests needed "
            "(monitor.min_requests); run it again after more requests",
        ]
    if report["drift"]:
        return [
            *lines,
            f"drift: FOUND in {', '.join(report['drifted'])}",
            "next: compare recent inputs with the training data; retrain on data that covers "
            "them (`medtransfer run` on the new source) before trusting the service's answers",
        ]
    return [*lines, "drift: none found"]
