"""Names are data: a marker in the source's folder and file names reaches no output, report,
checkpoint, model card or MLflow row; the dataset is named by ``data.name`` and its hash."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tasks.config import Params
from tasks.data.dataset import read_source
from tests.conftest import make_mono_dataset, write_dataset

MARKER = "Qzxmarker"  # as a patient's name would sit in a hospital export's folder names
# Where source file names are kept on purpose (README, "Processed dataset"): relative paths
# inside the processed folder, to trace an image back to its file.
KEPT_IN = {"manifest.csv", "quarantine.csv"}


def _marked_source(root: Path, patients: int = 12) -> Path:
    """Study folders and files named with the marker, two classes, labels.csv inside."""
    rng = np.random.default_rng(0)
    folder = root / f"export_{MARKER}_DOE^JANE"
    rows = []
    for i in range(patients):
        relative = f"{MARKER}_{i}/study_{MARKER}/img_{MARKER}_{i}.dcm"
        pixels = rng.integers(0, 4096, (40, 40), dtype=np.uint16)
        write_dataset(make_mono_dataset(pixels, patient_id=f"P{i}"), folder / relative)
        rows.append((relative, "effusion" if i % 2 else "clear"))
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / "labels.csv", index=False)
    return folder


def _files_holding(root: Path, skip: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` (outside ``skip``, the source) whose bytes hold ``needle``,
    or whose own path below ``root`` does."""
    found = []
    for path in sorted(p for p in root.rglob("*") if not p.is_relative_to(skip)):
        if needle.decode().lower() in path.relative_to(root).as_posix().lower():
            found.append(f"name: {path.relative_to(root)}")
        elif path.is_file() and needle.lower() in path.read_bytes().lower():
            found.append(str(path.relative_to(root)))
    return found


@pytest.mark.slow
def test_a_marker_in_source_names_reaches_no_output_report_checkpoint_or_mlflow_row(
    params: Params, tmp_path: Path, fresh_mlflow_store: str
) -> None:
    from tasks.stages.evaluate import run_evaluate
    from tasks.stages.ingest import run_ingest
    from tasks.stages.register import run_register
    from tasks.stages.train import run_train

    source = _marked_source(tmp_path)
    marked = params.with_overrides(
        [
            f"data.source={source}",
            "data.labels_csv=labels.csv",
            "data.name=site-a",
            "train.epochs=1",
            "train.strategy=linear_probe",
            "eval.gradcam_examples=1",
            f"train.model_dir={tmp_path / 'models/student'}",
            f"train.checkpoint_dir={tmp_path / 'models/checkpoints'}",
            "registry.model_name=marker-student",
        ]
    )
    run_ingest(marked, progress=False)
    report = run_train(marked, progress=False)
    run_evaluate(marked)
    registered = run_register(marked)

    recorded = read_source(marked.data.processed_dir)
    assert (recorded.name, recorded.labels) == ("site-a", "labels CSV")
    run = MlflowClient(fresh_mlflow_store).get_run(report["run_id"])
    assert f"site-a {report['dataset_version'][:6]}" in run.info.run_name
    assert run.data.params["data.source"] == run.data.tags["dataset.source"] == "site-a"
    card = MlflowClient().get_model_version("marker-student", registered["version"]).description
    assert "Source: dicom_folder `site-a`" in card

    leaks = _files_holding(tmp_path, source, MARKER.encode())
    processed = Path(marked.data.processed_dir)
    kept = [
        leak for leak in leaks if Path(leak).name in KEPT_IN and leak.startswith(processed.name)
    ]
    assert kept  # the manifest does trace images back to their files: the scan can see it
    assert [leak for leak in leaks if leak not in kept] == []
    assert (tmp_path / "mlflow.db").stat().st_size > 100_000  # the scan read a real store
