"""The dependency set installs and co-exists: every tool imports and Prefect runs a flow."""

from __future__ import annotations

import importlib
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

# Each tool the product drives: its distribution, the module a check imports, and one small use
# with a known answer, so a tool that imports but is broken (or moved off its pin) fails here.
TOOLS = {
    "torch": ("torch", "torch", lambda m: m.arange(4.0).sum().item() == 6.0),
    "monai": (
        "monai",
        "monai.transforms",
        lambda m: np.allclose(
            m.ScaleIntensityRange(0.0, 255.0, 0.0, 1.0)(np.array([0.0, 51.0, 255.0])),
            [0.0, 0.2, 1.0],
        ),
    ),
    "pydicom": (
        "pydicom",
        "pydicom.data",
        lambda m: m.get_testdata_file("CT_small.dcm").endswith("CT_small.dcm"),
    ),
    "mlflow": (
        "mlflow",
        "mlflow.utils.mlflow_tags",
        lambda m: m.MLFLOW_RUN_NAME == "mlflow.runName",
    ),
    "bentoml": ("bentoml", "bentoml", lambda m: m.__version__ == version("bentoml")),
    "dvc": ("dvc", "dvc.api", lambda m: callable(m.params_show)),
    "prefect": ("prefect", "prefect", lambda m: m.flow(lambda: 41 + 1).fn() == 42),
    "art": (
        "adversarial-robustness-toolbox",
        "art.attacks.evasion",
        lambda m: m.ProjectedGradientDescent.attack_params[0] == "norm",
    ),
    "sklearn": (
        "scikit-learn",
        "sklearn.metrics",
        lambda m: m.roc_auc_score([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75,
    ),
}
PINS = dict(
    line.strip().split("==", 1)
    for line in (Path(__file__).resolve().parent.parent / "constraints.txt")
    .read_text()
    .splitlines()
    if "==" in line and not line.startswith("#")
)


@pytest.mark.parametrize("tool", TOOLS)
def test_each_tool_is_the_pinned_version_and_gives_a_known_answer(tool: str) -> None:
    distribution, module, known_answer = TOOLS[tool]
    assert version(distribution).split("+")[0] == PINS[distribution]  # 2.13.0+cpu is 2.13.0
    assert known_answer(importlib.import_module(module))


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


def test_runs_from_a_checkout_keep_prefect_state_in_the_project_unless_the_user_chose() -> None:
    from flows.environment import apply_process_defaults

    plain: dict[str, str] = {}
    apply_process_defaults(plain)
    assert plain["PREFECT_HOME"] == str(Path(__file__).resolve().parent.parent / ".prefect")
    own = {"PREFECT_HOME": "/srv/prefect"}
    apply_process_defaults(own)
    assert own["PREFECT_HOME"] == "/srv/prefect"
    server = {"PREFECT_API_URL": "http://127.0.0.1:4200/api"}
    apply_process_defaults(server)  # a long-running server keeps its own state
    assert "PREFECT_HOME" not in server
