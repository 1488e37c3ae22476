"""The README's deploy line works as written: ``bentoml import`` of the exported archive."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import BIN
from tests.deploy.students import REPO

IMPORT_LINE = re.compile(r"# elsewhere: (bentoml import [^&\n]+?)\s*&&")


@pytest.mark.slow
def test_the_readmes_bentoml_import_line_imports_the_exported_archive(
    served, tmp_path: Path
) -> None:
    (command,) = IMPORT_LINE.findall((REPO / "README.md").read_text())
    archive = Path(served.package["archive"])
    version = served.package["bento"].split(":")[1]
    (tmp_path / "bentos").mkdir()
    shutil.copy(archive, tmp_path / "bentos" / f"medtransfer-{version}.tar.gz")
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if k != "BENTOML_HOME"},
        "BENTOML_HOME": str(home),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    # the user's shell, in the project folder that holds bentos/
    done = subprocess.run(
        ["bash", "-c", command.replace("<version>", version)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    listed = subprocess.run(
        [str(BIN / "bentoml"), "list", "-o", "json"], env=env, capture_output=True, text=True
    )
    assert served.package["bento"] in listed.stdout, listed.stdout + listed.stderr
