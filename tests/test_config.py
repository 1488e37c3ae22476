"""params.yaml loading and -S overrides."""

from __future__ import annotations

import pytest

from tasks.config import apply_overrides, load_params
from tasks.errors import MedtransferError
from tests.conftest import REPO


def test_overrides_parse_yaml_values() -> None:
    params = {"data": {"image_size": 128, "source": "synthetic"}, "train": {"compare": None}}
    out = apply_overrides(
        params, ["data.image_size=160", "train.compare=[full,scratch]", "data.source=/x/y"]
    )
    assert out["data"]["image_size"] == 160
    assert out["train"]["compare"] == ["full", "scratch"]
    assert out["data"]["source"] == "/x/y"
    assert params["data"]["image_size"] == 128  # the input is not modified


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.imagesize=3", "Unknown parameter"),
        ("nosection.x=1", "Unknown parameter section"),
        ("data", "key=value"),
    ],
)
def test_bad_overrides_fail_loudly(override: str, message: str) -> None:
    with pytest.raises(MedtransferError, match=message):
        apply_overrides({"data": {"image_size": 1}}, [override])


def test_repository_params_load() -> None:
    params = load_params(REPO / "params.yaml")
    # the synthesize stage's folder, a path DVC can depend on
    assert params["data"]["source"] == f"{params['synthetic']['output_dir']}/dicom"


def test_missing_params_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(MedtransferError, match="No parameter file"):
        load_params(tmp_path / "params.yaml")
