"""A DVC remote round trip: `dvc push` of the synthetic set, the processed dataset and the student
to a remote (a local folder standing for object storage), then a fresh `git clone` and
`dvc pull` that leaves `dvc status` clean with the same dataset version. The reports are DVC
metrics kept out of its cache (`cache: false`): they travel with git."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tasks.config import Params
from tasks.data.dataset import dataset_version
from tests.conftest import REPO
from tests.test_dvc import _run

GIT_USER = ["-c", "user.name=t", "-c", "user.email=t@example.org"]


def _project(repo: Path, params: Params) -> None:
    """A git + DVC project with the stages, the code and ``params`` (paths inside it)."""
    repo.mkdir()
    for folder in ("tasks", "serving"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo)
    small = params.to_dict()
    small["data"] |= {"processed_dir": "data/processed", "source": "data/synthetic/dicom",
                      "labels_csv": "labels.csv"}  # fmt: skip
    small["synthetic"] |= {"output_dir": "data/synthetic"}
    small["reports_dir"] = "reports"
    small["train"] |= {"epochs": 1, "model_dir": "models/student",
                       "checkpoint_dir": "models/checkpoints"}  # fmt: skip
    (repo / "params.yaml").write_text(yaml.safe_dump(small, sort_keys=False))
    (repo / ".gitignore").write_text("/models/checkpoints/\n")
    _run(["git", "init", "-q"], repo)
    _run(["dvc", "init", "-q"], repo)
    _run(["dvc", "config", "core.analytics", "false"], repo)


def _ingest_md5(repo: Path) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"]["ingest"]["outs"] if o["path"] == "data/processed")


def test_dvc_push_then_a_fresh_clone_and_pull_is_clean_with_the_same_dataset_version(
    tmp_path: Path, train_params: Params
) -> None:
    repo, remote, clone = tmp_path / "project", tmp_path / "object-storage", tmp_path / "clone"
    _project(repo, train_params)
    _run(["dvc", "remote", "add", "-d", "shared", str(remote)], repo)  # as the README says
    _run(["dvc", "repro", "train"], repo)  # synthesize -> ingest -> train
    version = _ingest_md5(repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", *GIT_USER, "commit", "-qm", "trained"], repo)
    pushed = _run(["dvc", "push"], repo)
    assert "pushed" in pushed and any(remote.rglob("*"))

    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / "data/processed").exists() and not (clone / "models/student").exists()
    # the stages that ran and theirs before them: a bare `dvc pull` would also ask for the
    # evaluate stage's plots (cached outputs), which no stage here produced
    _run(["dvc", "pull", "--with-deps", "train"], clone)
    # the stages that ran (evaluate and later never did, here or there)
    assert "Data and pipelines are up to date" in _run(["dvc", "status", "train"], clone)
    assert dataset_version(clone / "data/processed") == version == _ingest_md5(clone)
    for path in ("data/processed/images.npy", "models/student"):
        original, pulled = repo / path, clone / path
        if original.is_file():
            assert pulled.read_bytes() == original.read_bytes()
        else:
            assert sorted(p.name for p in pulled.iterdir()) == sorted(
                p.name for p in original.iterdir()
            )
    assert (clone / "reports/train.json").read_bytes() == (repo / "reports/train.json").read_bytes()
