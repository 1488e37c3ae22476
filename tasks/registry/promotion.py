"""Whether a newly trained student earns the registry alias, and how its version is tagged.

Pure logic over the stage reports: :class:`Candidate` (the student about to be registered),
:class:`Champion` (the version holding the alias), :func:`promotion_decision` and
:func:`version_tags`. The registry stage (:mod:`tasks.stages.register`) applies the decision.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tasks.digest import shown_version

MAX_TAG_VALUE = 5000  # the SQL registry's tag value column
WEIGHTS_TAG = "weights_sha256"  # a version's tag: the digest of its student's weights


@dataclass(frozen=True)
class Candidate:
    """The trained student about to be registered, with its reports."""

    run_id: str
    dataset_version: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    robustness: dict[str, Any] | None
    ingest: dict[str, Any]
    selection: dict[str, Any] | None = None  # the train report's ``auto`` decision, if any
    weights_sha256: str = ""  # the saved student's weights (tasks.registry.mlflow_registry)
    groups: list[dict[str, Any]] = field(default_factory=list)  # test figures per group

    @property
    def multilabel(self) -> bool:
        return self.metrics.get("label_kind") == "multi-label"

    @property
    def test_auc(self) -> float:
        """The figure the champion comparison reads: the test AUC; for a multi-label student
        the test macro AUC's 95% lower bound (an estimate over K findings compared on what it
        surely reaches, as the gates judge it)."""
        test = self.metrics.get("test") or {}
        if self.multilabel:
            return as_float(((test.get("ci95") or {}).get("auc") or {}).get("low"))
        return as_float(test.get("auc"))

    @property
    def auc_name(self) -> str:
        """How reasons name :attr:`test_auc`."""
        return "test macro AUC lower bound" if self.multilabel else "test AUC"

    @property
    def robustness_passed(self) -> bool:
        return bool(self.robustness and (self.robustness.get("verdict") or {}).get("passed"))

    @property
    def robustness_reasons(self) -> list[str]:
        if self.robustness is None:
            return ["no robustness report (run the robustness check before registering)"]
        reasons = (self.robustness.get("verdict") or {}).get("reasons") or []
        return [str(r) for r in reasons]


@dataclass(frozen=True)
class Champion:
    """The version that holds the alias now."""

    version: str
    dataset_version: str
    test_auc: float


@dataclass
class RegisterResult:
    """The content of ``reports/register.json``."""

    model_name: str
    version: str
    alias: str
    alias_moved: bool
    champion_version: str | None
    previous_champion: str | None
    reasons: list[str]
    dataset_version: str
    test_auc: float
    robustness_passed: bool
    run_id: str
    model_card: str
    tags: dict[str, str] = field(default_factory=dict)
    already_registered: bool = False  # the registry held this student: its version, no new one


def promotion_decision(candidate: Candidate, champion: Champion | None) -> tuple[bool, list[str]]:
    """Whether the alias moves to ``candidate``, and why (one sentence per reason).

    Rules, in order:

    1. A candidate that failed the robustness gates (or has no robustness report) never takes
       the alias; the gate reasons are returned.
    2. A candidate without a finite test AUC never takes it.
    3. With no champion, a passing candidate takes the alias.
    4. A champion evaluated on a *different* dataset version is not comparable by AUC (another
       test set); the passing candidate takes over, because registering a student trained on
       new data says the data moved on. Roll back by pointing the alias at the old version.
    5. On the same dataset version the candidate must have a strictly higher test AUC.
    """
    if not candidate.robustness_passed:
        return False, [f"robustness gates failed: {r}" for r in candidate.robustness_reasons] or [
            "robustness gates failed"
        ]
    auc, name = candidate.test_auc, candidate.auc_name
    if not math.isfinite(auc):
        return False, [f"the {name} is undefined (the test split has a single class?)"]
    if champion is None:
        return True, ["passed the robustness gates; no version held the alias"]
    if champion.dataset_version != candidate.dataset_version:
        return True, [
            f"passed the robustness gates; the previous holder (version {champion.version}) was "
            f"evaluated on dataset {shown_version(champion.dataset_version) or 'unknown'}, not "
            f"{shown_version(candidate.dataset_version)}: a passing version on the new data takes over"
        ]
    if not math.isfinite(champion.test_auc):
        return True, [
            f"passed the robustness gates; version {champion.version} has no recorded test AUC"
        ]
    if auc > champion.test_auc:
        return True, [
            f"passed the robustness gates; {name} {auc:.4f} beats version "
            f"{champion.version}'s {champion.test_auc:.4f} on the same dataset"
        ]
    return False, [
        f"{name} {auc:.4f} does not beat version {champion.version}'s "
        f"{champion.test_auc:.4f} on the same dataset"
    ]


def version_tags(candidate: Candidate, promoted: bool, reasons: list[str]) -> dict[str, str]:
    """The few tags of the new version: those a user filters the versions table on (dataset
    version, teacher, strategy, robustness verdict, promotion outcome), plus three that later
    stages read. The figures, reasons and data source live on the logged model's page and in
    the model card (the version's description), not in tags the table cannot show.

    ``reasons`` is unused here (the card holds them); kept for the callers' one signature.
    """
    spec = candidate.spec
    tags = {
        "dataset_version": candidate.dataset_version,
        "teacher": str(spec["teacher"]),
        "strategy": str(spec["strategy"]),
        "robustness_passed": "true" if candidate.robustness_passed else "false",
        "promotion": "promoted" if promoted else "not_promoted",
        # Read back by later stages. test_auc: the next registration's champion gate compares
        # with the figure this version was registered with (an MLflow version has no metrics
        # of its own). threshold and student_spec:
        # the package stage rebuilds and configures the served student from them.
        "test_auc": _text(candidate.test_auc),  # multi-label: the macro AUC's lower bound
        "threshold": _text(candidate.metrics.get("threshold")),
        # multi-label: each finding's threshold, in the order of student_spec's classes
        **(
            {"thresholds": json.dumps(list((candidate.metrics.get("thresholds") or {}).values()))}
            if candidate.multilabel
            else {}
        ),
        "student_spec": json.dumps(spec, sort_keys=True),
        # the next registration of the same weights returns this version (one per model)
        WEIGHTS_TAG: candidate.weights_sha256,
    }
    return {k: v[:MAX_TAG_VALUE] for k, v in tags.items()}


def as_float(value: Any) -> float:
    """``value`` as a float, or NaN when it is missing or not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _text(value: Any) -> str:
    number = as_float(value)
    return "nan" if math.isnan(number) else repr(number)
