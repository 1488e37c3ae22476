"""Advise stage: the evidence step of ``train.strategy: auto`` alone, without training.

``medtransfer advise`` calls :func:`run_advise`: every bundled teacher (or, with
``train.weights_path``, the configured teacher with that file) is probed on the processed
dataset's training split, and the ranked table, the recommended teacher, strategy and depth,
and the reasons come back. Nothing is written.
"""

from __future__ import annotations

from dataclasses import asdict, replace

from tasks.config import Params


def run_advise(params: Params, progress: bool = True) -> dict:
    """The evidence and the recommendation; returns ``{"recommendation", "evidence", "lines"}``
    (``lines``: the table and the reasons as text, what the command prints). ``progress``: a
    bar over the teachers (a log line per teacher comes either way)."""
    # deferred: selection imports torch and the teachers, which `medtransfer --help` need not
    from tasks.data.dataset import load_processed
    from tasks.transfer.auto import check_single_label
    from tasks.transfer.evidence_report import evidence_table
    from tasks.transfer.selection import advise

    check_single_label(load_processed(params.data.processed_dir))

    if params.train.weights_path is None:
        params = replace(params, train=replace(params.train, teacher="auto"))
    decision = advise(params, progress)
    recommendation = {key: value for key, value in decision.to_dict().items() if key != "evidence"}
    command = (
        f"medtransfer train -S train.teacher={decision.teacher} "
        f"-S train.strategy={decision.strategy} -S train.unfreeze_blocks={decision.unfreeze_blocks}"
    )
    lines = [
        *evidence_table(decision),
        "",
        f"recommended: teacher {decision.teacher}, strategy {decision.strategy}, unfreeze_blocks "
        f"{decision.unfreeze_blocks} (confidence {decision.confidence}; {decision.n_images} "
        f"training images, {decision.seconds:.0f} s)",
        *(f"  - {reason}" for reason in decision.reasons),
        f"train it: {command}   (or with the default train.strategy=auto, whose pilot "
        "fine-tunes also weigh full and lp_ft and the inherited exposure)",
    ]
    return {
        "recommendation": recommendation,
        "evidence": [asdict(row) for row in decision.evidence],
        "lines": lines,
    }
