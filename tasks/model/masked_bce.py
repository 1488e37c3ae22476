"""Binary cross-entropy over the known cells of a findings matrix: what a multi-label student
trains on when some findings of some images are unknown.

Labels ``(N, K)`` hold 1 (present), 0 (absent) or NaN (unknown: a CheXpert uncertain cell under
``data.uncertain: ignore``). An unknown cell is left out of the loss, not counted as absent: it
adds nothing to the sum, nor to the count the mean divides by, so each finding is learnt from
the images where it is known. Without an unknown cell this is
:class:`torch.nn.BCEWithLogitsLoss` (``pos_weight`` per finding included).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class MaskedBCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """:class:`torch.nn.BCEWithLogitsLoss` whose NaN targets are left out.

    ``reduction``: ``mean`` divides the known cells' sum by their count (0 when none is known),
    ``sum`` adds them, ``none`` returns ``(N, K)`` with 0 at each unknown cell. No value
    depends on a device-to-host copy, so a training step does not wait on one.
    """

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(target)
        cells = functional.binary_cross_entropy_with_logits(
            logits,
            torch.where(known, target, torch.zeros_like(target)),
            self.weight,
            pos_weight=self.pos_weight,
            reduction="none",
        )
        cells = torch.where(known, cells, torch.zeros_like(cells))
        if self.reduction == "none":
            return cells
        if self.reduction == "sum":
            return cells.sum()
        return cells.sum() / known.sum().clamp_min(1)
