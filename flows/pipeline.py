"""The medtransfer Prefect flow: it reads like the table of contents of the work.

Each stage is the function in ``tasks/`` wrapped as a Prefect task; nothing is re-implemented
here. Run it with ``medtransfer run`` or ``python -m flows.pipeline``.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.config import load_params
from tasks.evaluate import run_evaluate
from tasks.ingest import run_ingest
from tasks.robustness import run_robustness
from tasks.train import run_train


@task(name="ingest", retries=1, retry_delay_seconds=2)
def ingest(params: dict) -> dict:
    """Decode the configured source into the processed dataset; returns the ingest report."""
    return run_ingest(params).to_report()


@task(name="train")
def train(params: dict, resume: bool = False) -> dict:
    """Fine-tune the teacher into a student, logged to MLflow; returns the train report."""
    return run_train(params, resume=resume)


@task(name="evaluate")
def evaluate(params: dict) -> dict:
    """Val/test metrics, plots and Grad-CAM of the saved student; returns the metrics report."""
    return run_evaluate(params)


@task(name="robustness")
def robustness(params: dict) -> dict:
    """Attacks on the student and its frozen teacher; returns the report with the verdict."""
    return run_robustness(params)


@flow(name="medtransfer", log_prints=True)
def medtransfer_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None
) -> dict:
    """Run every stage on the configuration in ``params_file`` with ``overrides`` applied.

    Returns:
        A summary dictionary with one entry per stage.
    """
    params = load_params(params_file, overrides or [])
    summary = {"ingest": ingest(params)}
    summary["train"] = train(params)
    summary["evaluate"] = evaluate(params)
    summary["robustness"] = robustness(params)
    create_markdown_artifact(
        key="medtransfer-summary",
        markdown=_summary_markdown(summary),
        description="What this medtransfer run produced",
    )
    return summary


def _summary_markdown(summary: dict) -> str:
    report = summary["ingest"]
    reasons = {k: v for k, v in report["quarantined_by_reason"].items() if v}
    lines = [
        "# medtransfer run",
        "",
        "## Data",
        f"- source: {report['source_kind']}",
        f"- files seen {report['files_seen']}, ingested {report['ingested']}, "
        f"quarantined {report['quarantined']}",
        f"- quarantined by reason: {reasons or 'none'}",
        f"- images per split: { {s: v['images'] for s, v in report['splits'].items()} }",
    ]
    if "train" in summary:
        trained, metrics = summary["train"], summary["evaluate"]
        lines += [
            "",
            "## Student",
            f"- dataset version: `{trained['dataset_version']}`",
            f"- strategy {trained['strategy']}, best epoch {trained['best_epoch']} of {trained['epochs_run']}",
            f"- test AUC {metrics['test']['auc']:.3f}, accuracy {metrics['test']['accuracy']:.3f}, "
            f"sensitivity {metrics['test']['sensitivity']:.3f}, specificity {metrics['test']['specificity']:.3f} "
            f"at threshold {metrics['threshold']:.3f} ({metrics['threshold_rule']})",
            f"- MLflow run: `{trained['run_id']}`",
        ]
    if "robustness" in summary:
        verdict = summary["robustness"]["verdict"]
        lines += ["", "## Robustness", f"- verdict: **{'pass' if verdict['passed'] else 'fail'}**"]
        lines += [f"- {line}" for line in verdict["checked"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    medtransfer_pipeline()
