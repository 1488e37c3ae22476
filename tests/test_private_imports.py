"""Product code uses each library through its public API: no import of a private module.

A private module is one whose dotted path has a part with a leading underscore (BentoML's
``_internal``, ``mlflow.utils._foo``) or a private name imported from a third-party module
(``from prefect.x import _helper``): the next release may move or drop it without notice.
Prefect's server package (``prefect.server``) counts too: it is the API server's own code, which
clients reach through ``prefect.get_client``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("tasks", "flows", "serving")
OWN = {"tasks", "flows", "serving", "tests", "benchmarks"}
INTERNAL = ("prefect.server",)


def private_imports(source: str) -> list[str]:
    """The third-party private imports in Python ``source``, as ``module`` or ``module.name``."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
            names: list[str] = []
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for module in modules:
            parts = module.split(".")
            if parts[0] in OWN or module == "__future__":
                continue
            if any(part.startswith("_") for part in parts) or module.startswith(INTERNAL):
                found.append(module)
            found += [n for n in names if n.rsplit(".", 1)[1].startswith("_")]
    return found


def test_the_scan_finds_a_private_module_and_a_private_name() -> None:
    source = (
        "from bentoml._internal.configuration.containers import BentoMLContainer\n"
        "import mlflow.utils._capture_modules\n"
        "from prefect.utilities import _private\n"
        "from prefect.server.api.server import SubprocessASGIServer\n"
        "from mlflow import MlflowClient\n"
        "from tasks._x import y\n"
    )
    assert private_imports(source) == [
        "bentoml._internal.configuration.containers",
        "mlflow.utils._capture_modules",
        "prefect.utilities._private",
        "prefect.server.api.server",
    ]


@pytest.mark.parametrize("package", PRODUCT)
def test_product_code_imports_no_private_module(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): found
        for path in sorted((ROOT / package).rglob("*.py"))
        if (found := private_imports(path.read_text()))
    }
    assert offenders == {}, f"private imports (use the library's public API): {offenders}"
