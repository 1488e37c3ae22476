"""The frozen-feature evidence for people: the ranked table ``medtransfer advise`` prints and
the plot of k-NN AUC (with its interval) and LogME against depth that a training run logs to
MLflow. The evidence itself is :mod:`tasks.transfer.selection`'s."""

from __future__ import annotations

from tasks.transfer.selection import TransferChoice


def evidence_table(decision: TransferChoice) -> list[str]:
    """The ranked table as text lines (``medtransfer advise`` prints it)."""
    lines = [
        f"{'teacher':<20} {'tap':<7} {'block':>5} {'k-NN AUC [95% CI]':>24} {'LogME':>7} "
        f"{'KL(ImageNet)':>12}"
    ]
    for r in decision.evidence:
        interval = f"{r.knn_auc:.3f} [{r.knn_auc_low:.3f}, {r.knn_auc_high:.3f}]"
        lines.append(
            f"{r.teacher:<20} {r.tap:<7} {r.block + 1:>5} {interval:>24} {r.logme:>7.3f} "
            f"{r.domain_distance:>12.2f}"
        )
    return lines


def plot_evidence(decision: TransferChoice, path) -> None:
    """k-NN AUC (with its interval) and LogME against depth, one line per teacher, to ``path``."""
    import matplotlib  # deferred: matplotlib only for this plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (knn_axis, logme_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name in dict.fromkeys(r.teacher for r in decision.evidence):
        rows = [r for r in decision.evidence if r.teacher == name]
        depth = [r.depth for r in rows]
        knn_axis.plot(depth, [r.knn_auc for r in rows], marker="o", label=name)
        knn_axis.fill_between(
            depth, [r.knn_auc_low for r in rows], [r.knn_auc_high for r in rows], alpha=0.15
        )
        logme_axis.plot(depth, [r.logme for r in rows], marker="o", label=name)
    knn_axis.set(xlabel="depth (share of blocks)", ylabel="k-NN AUC (leave-one-out)")
    logme_axis.set(xlabel="depth (share of blocks)", ylabel="LogME")
    knn_axis.legend(fontsize=8)
    figure.suptitle(
        f"chosen: {decision.teacher}, {decision.strategy} "
        f"(unfreeze {decision.unfreeze_blocks}), confidence {decision.confidence}"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
