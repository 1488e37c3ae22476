"""The Prefect flow runs the same ingestion stage the CLI and DVC run."""

from __future__ import annotations

import json
from pathlib import Path

from flows.pipeline import medtransfer_pipeline


def test_flow_ingests_and_summarises(prefect_harness, params: dict, params_file: Path) -> None:
    summary = medtransfer_pipeline(params_file=str(params_file), overrides=["data.image_size=24"])
    report = json.loads((Path(params["reports_dir"]) / "ingest.json").read_text())
    assert summary["ingest"] == report
    assert report["files_seen"] == report["ingested"] > 0
    assert (
        json.loads((Path(params["data"]["processed_dir"]) / "dataset.json").read_text())[
            "image_size"
        ]
        == 24
    )
