"""The medtransfer Prefect flow: it reads like the table of contents of the work.

Each stage is the function in ``tasks/`` wrapped as a Prefect task; nothing is re-implemented
here. Run it with ``medtransfer run`` or ``python -m flows.pipeline``.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.config import load_params
from tasks.ingest import run_ingest


@task(name="ingest", retries=1, retry_delay_seconds=2)
def ingest(params: dict) -> dict:
    """Decode the configured source into the processed dataset; returns the ingest report."""
    return run_ingest(params).to_report()


@flow(name="medtransfer", log_prints=True)
def medtransfer_pipeline(
    params_file: str = "params.yaml", overrides: list[str] | None = None
) -> dict:
    """Run every stage on the configuration in ``params_file`` with ``overrides`` applied.

    Returns:
        A summary dictionary with one entry per stage.
    """
    params = load_params(params_file, overrides or [])
    ingest_report = ingest(params)
    summary = {"ingest": ingest_report}
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
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    medtransfer_pipeline()
