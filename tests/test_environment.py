"""The dependency set installs and co-exists: every tool imports and Prefect runs a flow."""

from __future__ import annotations

import importlib

import pytest

TOOLS = ["torch", "monai", "pydicom", "mlflow", "bentoml", "dvc", "prefect", "art", "sklearn"]


@pytest.mark.parametrize("module", TOOLS)
def test_tool_imports(module: str) -> None:
    assert importlib.import_module(module).__name__ == module


def test_pixel_data_plugins_are_available() -> None:
    from pydicom.pixels import get_decoder

    for uid in (
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    ):
        assert get_decoder(uid).is_available, uid


def test_tiny_prefect_flow_runs(prefect_harness) -> None:
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow
    def tiny(n: int) -> list[int]:
        return [f.result() for f in double.map(range(n))]

    assert tiny(4) == [0, 2, 4, 6]
