"""`dvc repro` in a real git + DVC repository: reproducible ingestion of a versioned input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.config import Params
from tasks.data import synthetic
from tasks.data.dataset import dataset_version
from tests.conftest import REPO


def _run(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_dvc_repro_gives_the_same_dataset_hash_twice(tmp_path: Path, params: Params) -> None:
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(REPO / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    small = params.to_dict()
    # the shipped source: the synthesize stage's folder, with its labels.csv inside
    small["data"] = {
        **small["data"],
        "processed_dir": "data/processed",
        "source": "data/synthetic/dicom",
        "labels_csv": "labels.csv",
    }
    small["synthetic"] = {**small["synthetic"], "output_dir": "data/synthetic"}
    small["reports_dir"] = "reports"
    (repo / "params.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)

    ran = _run(["dvc", "repro", "ingest"], repo)
    assert "Running stage 'synthesize'" in ran  # the synthetic set is ingest's upstream stage
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    first = next(
        o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/processed"
    )
    assert dataset_version(repo / "data/processed") == first

    assert "didn't change" in _run(["dvc", "repro", "ingest"], repo)  # up to date: nothing re-ran
    _run(["dvc", "repro", "--force", "ingest"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    second = next(
        o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/processed"
    )
    assert second == first
    assert json.loads((repo / "reports/ingest.json").read_text())["files_seen"] > 0


PIPELINE = ["synthesize", "ingest", "train", "evaluate", "robustness", "register", "package"]


def _tiny_pipeline_repo(root: Path, train_params: Params) -> Path:
    """A git + DVC project at ``root`` with the pipeline's code and a test-size params.yaml
    whose clean-AUC gate no student can pass (the gates say no: nothing gets approved)."""
    repo = root / "pipeline"
    repo.mkdir()
    for folder in ("tasks", "serving"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    tiny = train_params.to_dict()
    tiny["data"] = {
        **tiny["data"],
        "processed_dir": "data/processed",
        "source": "data/synthetic/dicom",
        "labels_csv": "labels.csv",
    }
    tiny["synthetic"] = {**tiny["synthetic"], "output_dir": "data/synthetic"}
    tiny["reports_dir"] = "reports"
    tiny["train"] = {
        **tiny["train"],
        "epochs": 1,
        "model_dir": "models/student",
        "checkpoint_dir": "models/checkpoints",
    }
    tiny["robustness"] = {
        **tiny["robustness"],
        "max_samples": 4,
        "epsilons_255": [1],
        "pgd_steps": 1,
        "apgd_steps": 2,
        "universal_images": 2,
        "universal_steps": 1,
        "reference_probe": False,
        "square_max_samples": 2,
        "square_queries": 2,
    }
    tiny["gates"] = {
        **tiny["gates"],
        "min_clean_auc": 1.01,  # above any AUC's lower bound: the verdict always fails
        "max_teacher_transfer_success": None,
        "max_universal_fooling": None,
    }
    tiny["serving"] = {**tiny["serving"], "export_dir": "bentos"}
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    (repo / ".gitignore").write_text("/data/\n/models/\n/bentos/\n/.bentoml/\n")
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)
    _commit(repo, "base")
    return repo


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", message],
        repo,
    )


def _set_param(repo: Path, section: str, key: str, value: object) -> None:
    values = yaml.safe_load((repo / "params.yaml").read_text())
    values[section][key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))


def _flow_in(repo: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``medtransfer run`` in ``repo`` on its params.yaml (in-process, on Prefect's harness)."""
    from flows.pipeline import run_pipeline

    monkeypatch.chdir(repo)
    return run_pipeline("params.yaml")


def test_dvc_repro_runs_the_whole_pipeline_like_the_flow_and_exp_run_varies_it(
    tmp_path: Path, train_params: Params, prefect_harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc repro` on a fresh clone runs every stage from dvc.yaml and ends green although the
    gates say no (package records "nothing approved"); `medtransfer run` after it is all cache
    hits; `dvc exp run -S train.lr=...` retrains with the new rate as a DVC experiment."""
    repo = _tiny_pipeline_repo(tmp_path, train_params)
    _run(["dvc", "repro"], repo)
    for report in ("ingest", "train", "metrics", "robustness", "register", "package"):
        assert (repo / "reports" / f"{report}.json").is_file(), report
    # the figures that decide, a row each, numbers only: a table that fits a terminal
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo))
    figures = next(iter(shown.values()))["data"]
    evaluated = json.loads((repo / "reports/metrics.json").read_text())["test"]
    assert figures["reports/figures/evaluate/test_auc.json"]["data"] == {
        "estimate": evaluated["auc"],
        "ci_low": evaluated["ci95"]["auc"]["low"],
        "ci_up": evaluated["ci95"]["auc"]["high"],
        "n": evaluated["n_patients"],
    }
    gate = figures["reports/figures/robustness/clean_auc.json"]["data"]
    assert gate["limit"] == 1.01 and gate["bound"] == gate["ci_low"] and gate["passed"] == 0
    assert figures["reports/figures/robustness/verdict.json"]["data"] == {"passed": 0}
    assert all(
        isinstance(value, int | float) or value is None
        for figure in figures.values()
        for value in figure["data"].values()
    )
    table = _run(["dvc", "metrics", "show"], repo).splitlines()
    assert len(table) == len(figures) + 1 and max(map(len, table)) <= 120
    assert "didn't change" in _run(["dvc", "repro", "evaluate"], repo)
    # the plots are data DVC reads with its templates (what `dvc plots diff` overlays)
    plotted = _run(["dvc", "plots", "show", "--json", "--split"], repo)
    for name in (
        "train_history.json",
        "roc_test.json",
        "confusion_test.json",
        "robustness_curves.json",
    ):
        assert f"reports/plots/{name}" in plotted, name
    assert "training loss" in plotted  # the top-level plot of the history's two losses
    packaged = json.loads((repo / "reports/package.json").read_text())
    assert packaged["built"] is False and packaged["archive"] is None
    assert packaged["next"] == "medtransfer package -S registry.version=1"

    # One book: the flow reads DVC's record, so nothing is recomputed or registered again.
    rerun = _flow_in(repo, monkeypatch)
    assert rerun["cached"] == PIPELINE
    assert rerun["register"]["version"] == "1"
    assert rerun["package"]["built"] is False  # the gates said no: an outcome, not an error
    # ...and records what it runs: after a new alias name, DVC has nothing left to redo.
    _set_param(repo, "registry", "alias", "approved")
    changed = _flow_in(repo, monkeypatch)
    assert changed["cached"] == PIPELINE[:5]  # register and package ran again
    assert changed["register"]["already_registered"] is True
    assert _run(["dvc", "status"], repo).strip() == "Data and pipelines are up to date."
    repro = _run(["dvc", "repro"], repo)
    assert "Running stage" not in repro
    assert repro.strip().endswith("Data and pipelines are up to date.")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions("name='medtransfer-student'")) == 1
    # no file git tracks (code, DVC's own files, .gitignore) was changed, but the params.yaml
    # this test edited
    tracked = ["git", "status", "--porcelain", "--untracked-files=no", "--", ":!params.yaml"]
    assert _run(tracked, repo) == ""

    # Experiments are git commits of their own: the baseline must be committed first.
    _commit(repo, "results")
    base_run = json.loads((repo / "reports/train.json").read_text())["run_id"]
    ran = _run(["dvc", "exp", "run", "-S", "train.lr=0.003"], repo)
    assert "Stage 'ingest' didn't change" in ran  # the data stage is reused, not redone
    experiments = [
        rev
        for commit in json.loads(_run(["dvc", "exp", "show", "--json"], repo))
        for experiment in commit.get("experiments") or []
        for rev in experiment["revs"]
    ]
    assert len(experiments) == 1
    tried = experiments[0]["data"]
    assert tried["params"]["params.yaml"]["data"]["train"]["lr"] == 0.003
    assert "estimate" in tried["metrics"]["reports/figures/evaluate/test_auc.json"]["data"]
    assert "reports/figures/robustness/verdict.json" in tried["metrics"]
    new_run = json.loads((repo / "reports/train.json").read_text())["run_id"]
    assert new_run != base_run
    logged = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(new_run).data.params
    assert logged["train.lr"] == "0.003"


def test_dvc_versions_the_input_folder_a_new_dicom_file_reruns_ingest(
    tmp_path: Path, params: Params
) -> None:
    """data.source is a dependency of ingest: an unchanged folder re-runs nothing, one more
    DICOM file makes `dvc status` report ingest changed and `dvc repro` re-ingest it."""
    repo = tmp_path / "project"
    repo.mkdir()
    shutil.copytree(REPO / "tasks", repo / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    # A user's folder: DICOM files with their labels CSV inside (data.labels_csv relative to it).
    folder, _ = synthetic.generate(
        synthetic.SyntheticConfig.from_params(
            params.with_overrides(
                [
                    f"synthetic.output_dir={repo / 'incoming'}",
                    "synthetic.n_patients=10",
                    "synthetic.size=32",
                ]
            )
        )
    )
    held_back = tmp_path / "case_0009"
    shutil.move(folder / "case_0009", held_back)
    mine = {**params.to_dict(), "reports_dir": "reports"}
    mine["data"] = {
        **mine["data"],
        "source": "incoming/dicom",
        "labels_csv": "labels.csv",
        "processed_dir": "data/processed",
    }
    mine["synthetic"] = {**mine["synthetic"], "output_dir": "data/synthetic"}
    (repo / "params.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)

    ran = _run(["dvc", "repro", "ingest"], repo)
    assert "Running stage 'ingest'" in ran
    assert "synthesize" not in ran  # a folder of one's own needs no synthetic set
    seen = json.loads((repo / "reports/ingest.json").read_text())["files_seen"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "incoming/dicom" in {dep["path"] for dep in lock["stages"]["ingest"]["deps"]}

    assert "ingest" not in _run(["dvc", "status", "ingest"], repo)
    assert "Stage 'ingest' didn't change" in _run(["dvc", "repro", "ingest"], repo)

    shutil.move(held_back, folder / "case_0009")  # new DICOM files arrive
    status = _run(["dvc", "status", "ingest"], repo)
    assert "ingest" in status and "incoming/dicom" in status
    assert "Running stage 'ingest'" in _run(["dvc", "repro", "ingest"], repo)
    report = json.loads((repo / "reports/ingest.json").read_text())
    assert report["files_seen"] > seen
    assert report["quarantined"] == 0  # every new file found its label in the CSV


def test_the_flow_s_dvc_book_records_a_stage_as_dvc_commit_does_and_only_for_params_yaml(
    tmp_path: Path,
) -> None:
    """flows/dvc_book.py on a one-stage DVC project: a stage never run is not up to date; its
    output made and recorded, `dvc status` is clean; overrides or another parameter file
    keep no book."""
    from flows.dvc_book import project_book

    repo = tmp_path / "tiny"
    repo.mkdir()
    (repo / "params.yaml").write_text("size: 3\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  make:\n    cmd: echo 3 > out.txt\n    params: [size]\n"
        "    outs: [{out.txt: {cache: false}}]\n"
    )
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    assert project_book(repo / "params.yaml", ["size=4"]) is None
    assert project_book(repo / "other.yaml", []) is None
    assert project_book(tmp_path / "params.yaml", []) is None  # not a DVC project
    book = project_book(repo / "params.yaml", [])
    assert book is not None and not book.up_to_date("make")

    (repo / "out.txt").write_text("3\n")  # what the flow's stage wrote
    book.record("make")
    assert book.up_to_date("make")
    assert _run(["dvc", "status"], repo).strip() == "Data and pipelines are up to date."
    (repo / "params.yaml").write_text("size: 4\n")
    assert not book.up_to_date("make")
