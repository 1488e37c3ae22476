"""A multi-label student's served answer: every finding's probability and decision.

Each finding is decided on its own: present when its calibrated probability (its own
temperature, applied in the forward pass) reaches its own threshold, chosen on validation by
the evaluate stage and recorded on the registry version. numpy only: the service's API
process (which never imports torch) builds replies with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.errors import MedtransferError

# The reply's label when no finding is present (ChestX-ray14's spelling).
NO_FINDING = "No Finding"


def check_findings(
    trained: Sequence[str], served: Sequence[str], thresholds: Sequence[float] | None
) -> None:
    """Refuse to serve findings other than those trained: ``served`` (the Bento's) must be
    ``trained`` (the student's) in the same order, with one threshold each.

    Raises:
        MedtransferError: one line saying how many findings each side has.
    """
    count = None if thresholds is None else len(thresholds)
    if list(trained) != list(served) or count != len(trained):
        raise MedtransferError(
            f"The student was trained on {len(trained)} findings but is served with "
            f"{len(served)} finding names and {count} thresholds; re-package the registry "
            "version (`medtransfer package`) so that serving has the training's K findings."
        )


def findings_decision(
    probabilities: np.ndarray, findings: Sequence[str], thresholds: Sequence[float]
) -> dict:
    """One image's answer from its probabilities ``(K,)``: ``label`` (the present findings
    joined by ``|``, or :data:`NO_FINDING`), ``probabilities`` ``{finding: p}`` and
    ``findings``, one ``{"finding", "probability", "threshold", "present"}`` per finding."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    rows = [
        {
            "finding": str(name),
            "probability": float(p),
            "threshold": float(t),
            "present": bool(p >= t),
        }
        for name, p, t in zip(findings, probabilities, thresholds, strict=True)
    ]
    present = [row["finding"] for row in rows if row["present"]]
    return {
        "label": "|".join(present) or NO_FINDING,
        "probabilities": {row["finding"]: row["probability"] for row in rows},
        "findings": rows,
    }
