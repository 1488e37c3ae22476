"""The model card's sections for a multi-label student (:mod:`tasks.registry.model_card` calls
these when the metrics report's ``label_kind`` is ``multi-label``): the decision rule, the
per-finding table with its 95% intervals, macro and micro AUC, and the flip rates under attack.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MULTI_LABEL = "multi-label"


def is_multilabel(metrics: Mapping[str, Any]) -> bool:
    """Whether the metrics report is a multi-label student's."""
    return metrics.get("label_kind") == MULTI_LABEL


def decision_row(metrics: Mapping[str, Any]) -> str:
    """The decision rule's row of the card's header table."""
    return (
        "| decision | each finding on its own: present when its probability (its own "
        f"temperature) reaches its own threshold ({metrics.get('threshold_rule', '')} on "
        "validation) |"
    )


def findings_section(metrics: Mapping[str, Any]) -> list[str]:
    """Macro and micro AUC, then one row per finding: threshold, positives, AUC, sensitivity
    and specificity on test, brackets the 95% patient-bootstrap intervals."""
    test = metrics.get("test") or {}
    lines = [
        f"Test: macro AUC {_num(test.get('macro_auc'))}{_interval(test.get('macro_auc_ci95'))}, "
        f"micro AUC {_num(test.get('micro_auc'))}{_interval(test.get('micro_auc_ci95'))} "
        f"({test.get('n_images')} images of {test.get('n_patients')} patients; validation "
        f"macro AUC {_num((metrics.get('val') or {}).get('macro_auc'))}). The gates and the "
        "champion comparison read the macro AUC's lower bound.",
        "",
        "| finding | threshold | positives / known | AUC | sensitivity | specificity |",
        "| --- | ---: | ---: | --- | --- | --- |",
    ]
    for row in test.get("findings") or []:
        cells = (
            _num(row.get(k)) + _interval(row.get(f"{k}_ci95"))
            for k in ("auc", "sensitivity", "specificity")
        )
        lines.append(
            f"| {row.get('finding')} | {_num(row.get('threshold'))} | "
            f"{row.get('n_positive')} / {row.get('n_known')} | " + " | ".join(cells) + " |"
        )
    return lines


def robustness_section(robustness: Mapping[str, Any]) -> list[str]:
    """The verdict and "any finding flipped" per attack and budget (95% Wilson intervals)."""
    verdict = robustness.get("verdict") or {}
    lines = [f"Verdict: **{'passed' if verdict.get('passed') else 'failed'}**."]
    lines += [f"- {reason}" for reason in verdict.get("reasons") or []]
    rows = [row for row in robustness.get("table") or [] if row.get("finding") == "any"]
    if rows:
        lines += [
            "",
            f"Share of the {robustness.get('n_examples')} attacked test images with any "
            "finding's decision flipped (per-finding rates: the robustness report):",
            "",
            "| attack | L-inf budget (1/255) | any finding flipped |",
            "| --- | ---: | --- |",
        ]
        for row in rows:
            bounds = {"low": row.get("ci_low"), "high": row.get("ci_high")}
            lines.append(
                f"| {row['attack']} | {row['eps_255']:g} | "
                f"{_num(row.get('flip_rate'))}{_interval(bounds)} |"
            )
    return lines


def _num(value: Any, digits: int = 3) -> str:
    try:
        return f"{float(value):.{digits}f}"
    except (TypeError, ValueError):
        return "n/a"


def _interval(bounds: Any) -> str:
    if not isinstance(bounds, Mapping) or bounds.get("low") is None:
        return ""
    return f" [{_num(bounds.get('low'))}, {_num(bounds.get('high'))}]"
