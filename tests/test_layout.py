"""The layout's contracts: what the Bento ships is what the service imports."""

from __future__ import annotations

from pathlib import Path

import yaml

from tasks.code_closure import import_closure, relative_paths

REPO = Path(__file__).resolve().parent.parent


def test_the_bentofile_includes_exactly_the_service_and_its_import_closure() -> None:
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    expected = {"serving/__init__.py", "serving/service.py"}
    expected |= set(relative_paths(import_closure("serving.service")))
    assert set(bentofile["include"]) == expected


def test_the_service_needs_neither_attacks_nor_training_nor_ingestion() -> None:
    needed = relative_paths(import_closure("serving.service"))
    assert "tasks/model/inference.py" in needed and "tasks/data/dicom_io.py" in needed
    for absent in ("tasks/robustness/", "tasks/training/", "tasks/stages/", "tasks/data/synthetic"):
        assert not any(path.startswith(absent) for path in needed), absent
