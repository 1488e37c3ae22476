"""What ``pip install .`` gives a user: the runtime dependencies only, and a command that works.

The core install leaves out test tools and the Dask runner (the ``dask`` extra); the command
must not need them, and the Dask runner must say in one line which extra it needs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flows.fanout import task_runner_decode_map
from tasks.config import Params
from tasks.errors import MedtransferError

ROOT = Path(__file__).resolve().parents[1]
# Modules of what the core install leaves out: the extras' packages and what they bring.
NOT_IN_CORE = ("prefect_dask", "dask", "distributed", "pytest", "hypothesis", "playwright")

# Runs `medtransfer --help` with the left-out modules unimportable, from a folder without the
# source tree, so only the installed copy (on sys.path through PYTHONPATH) can answer.
HELP_WITHOUT_EXTRAS = f"""
import sys
BLOCKED = {NOT_IN_CORE!r}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
        return None

sys.meta_path.insert(0, Blocker())
import flows.cli
print("FROM", flows.cli.__file__)
sys.argv = ["medtransfer", "--help"]
flows.cli.main()
"""


def _core_dependencies() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [req.split(";")[0].strip() for req in project["dependencies"]]


def test_core_dependencies_hold_no_test_tool_and_no_dask() -> None:
    names = {req.split(">")[0].split("=")[0].split("<")[0].strip() for req in _core_dependencies()}
    left_out = {"prefect-dask", "dask", "distributed", "pytest", "hypothesis", "playwright"}
    assert names.isdisjoint(left_out), names & left_out
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["dask"] == ["prefect-dask>=0.3"]


@pytest.mark.slow
def test_pip_install_without_extras_gives_a_working_medtransfer_help(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / item, source / item)
    for package in ("tasks", "flows", "serving"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__py*"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip, "--target", str(target), str(source)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    run = subprocess.run(
        [sys.executable, "-c", HELP_WITHOUT_EXTRAS],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert f"FROM {target}" in run.stdout  # the installed copy, not the source tree
    assert "usage: medtransfer" in run.stdout and "ingest" in run.stdout


def test_the_dask_runner_without_its_extra_fails_with_one_line_naming_it(
    params: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # as if not installed
    dask = params.with_overrides(["orchestration.task_runner=dask", "data.workers=2"])
    with pytest.raises(MedtransferError) as error:
        task_runner_decode_map(dask)
    message = str(error.value)
    assert "\n" not in message and "pip install 'medtransfer[dask]'" in message
