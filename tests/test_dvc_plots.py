"""`dvc plots diff` in a real git + DVC repository with the project's own plot declarations:
every plot of the committed baseline loads (from DVC's cache) beside the workspace's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO

# A stand-in stage command: writes each plot file its stage declares, with values that follow
# params.yaml's `v` (so the two revisions differ), JSON rows carrying the plot's x and y fields.
WRITER = """
import json, sys
from pathlib import Path
import yaml

v = yaml.safe_load(open("params.yaml"))["v"]
for path, fields in json.loads(sys.argv[1]).items():
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".png":
        out.write_bytes(b"\\x89PNG\\r\\n\\x1a\\n" + bytes([v]))
    else:
        rows = [{field: v + i for field in fields} for i in range(3)]
        out.write_text(json.dumps(rows))
"""


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done


def _plot_fields(props: dict, top_level: list) -> list[str]:
    """The JSON fields a plot file needs: its own x/y and any top-level plot's y on it."""
    fields = {props.get("x", "x"), props.get("y", "y")}
    for entry in top_level:
        for definition in entry.values():
            fields.add(definition.get("x", "x"))
            for ys in (definition.get("y") or {}).values():
                fields.update(ys if isinstance(ys, list) else [ys])
    return sorted(fields)


def _stand_in_pipeline(repo: Path) -> list[str]:
    """dvc.yaml with the project's plot declarations (outs as declared, top-level plots as is),
    each stage's command replaced by WRITER; returns the plot paths."""
    project = yaml.safe_load((REPO / "dvc.yaml").read_text())
    top_level = project.get("plots", [])
    stages, paths = {}, []
    for name, stage in project["stages"].items():
        if not stage.get("plots"):
            continue
        files = {}
        for entry in stage["plots"]:
            path, props = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            files[path] = _plot_fields(props or {}, top_level)
            paths.append(path)
        stages[name] = {
            "cmd": f"python writer.py '{json.dumps(files)}'",
            "params": ["v"],
            "plots": stage["plots"],
        }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages, "plots": top_level}))
    return paths


def test_dvc_plots_diff_loads_every_plot_of_the_committed_baseline_and_the_workspace(
    tmp_path: Path,
) -> None:
    """After the first `dvc repro`, the user commits what DVC's hint names (dvc.lock and the
    .gitignore files it wrote, as the README says); after a parameter change and another
    `dvc repro`, `dvc plots diff` loads every plot for HEAD and the workspace, without
    "DVC failed to load some plots for following revisions: 'HEAD'"."""
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "writer.py").write_text(WRITER)
    (repo / "params.yaml").write_text("v: 1\n")
    paths = _stand_in_pipeline(repo)
    # the project's own ignore rules decide what git sees of the generated files
    (repo / ".gitignore").write_text((REPO / ".gitignore").read_text())
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    _run([*git, "add", "-A"], repo)
    _run([*git, "commit", "-qm", "template"], repo)

    _run(["dvc", "repro"], repo)
    # DVC's hint after repro: `git add dvc.lock <the .gitignore files it wrote>`
    ignores = [p.relative_to(repo).as_posix() for p in repo.rglob(".gitignore")]
    _run([*git, "add", "dvc.lock", *ignores], repo)
    _run([*git, "commit", "-qm", "baseline"], repo)
    (repo / "params.yaml").write_text("v: 2\n")
    _run(["dvc", "repro"], repo)

    diff = _run(["dvc", "plots", "diff", "--json"], repo)
    assert "failed to load" not in diff.stderr
    shown = json.loads(diff.stdout)
    assert "errors" not in shown
    revisions = {
        path: {rev for plot in plots for rev in plot.get("revisions", [])}
        for path, plots in shown["data"].items()
    }
    for path in paths:
        assert revisions[path] == {"HEAD", "workspace"}, path
    assert revisions["training loss"] == {"HEAD", "workspace"}
