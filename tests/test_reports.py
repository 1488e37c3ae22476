"""The report contract: one path per report, written whole, read with a clear error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tasks import reports
from tasks.errors import MedtransferError


def test_every_stage_has_one_report_file_and_no_two_share_a_name() -> None:
    names = [report.file_name for report in reports.ALL]
    assert len(set(names)) == len(names)
    assert set(reports.BY_STAGE) == {
        "ingest",
        "train",
        "evaluate",
        "robustness",
        "register",
        "package",
        "monitor",
    }


def test_a_report_is_valid_json_with_non_finite_numbers_as_null(tmp_path: Path) -> None:
    content = {"best_val_auc": -math.inf, "auc": np.float32(0.5), "epochs": (1, 2), "nan": math.nan}
    path = reports.TRAIN.write(tmp_path, content)
    assert path == tmp_path / "train.json"
    assert path.read_text().count("Infinity") == 0 and "NaN" not in path.read_text()
    assert reports.TRAIN.read(tmp_path) == {
        "best_val_auc": None,
        "auc": 0.5,
        "epochs": [1, 2],
        "nan": None,
    }
    assert [p.name for p in tmp_path.iterdir()] == ["train.json"]  # no partial file left


def test_a_missing_or_broken_report_names_the_command_that_writes_it(tmp_path: Path) -> None:
    with pytest.raises(MedtransferError, match=r"run `medtransfer evaluate` first"):
        reports.METRICS.read(tmp_path)
    assert reports.METRICS.read_if_present(tmp_path) is None
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(MedtransferError, match=r"not valid JSON .*re-run `medtransfer evaluate`"):
        reports.METRICS.read(tmp_path)
