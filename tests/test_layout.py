"""The layout's contracts: what the Bento ships is what the service imports; what each
stage runs is its import closure, in dvc.yaml and in the cache keys alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from tasks.code_closure import (
    STAGES,
    code_version,
    import_closure,
    relative_paths,
    rewrite_dvc_code_deps,
    stage_code_files,
)

REPO = Path(__file__).resolve().parent.parent


SERVING_FILES = {path.relative_to(REPO).as_posix() for path in (REPO / "serving").glob("*.py")}


def test_the_bentofile_includes_exactly_the_service_and_its_import_closure() -> None:
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    expected = SERVING_FILES | set(relative_paths(import_closure("serving.service")))
    assert set(bentofile["include"]) == expected


def test_a_serving_module_s_closure_includes_what_its_sibling_modules_import(
    tmp_path: Path,
) -> None:
    """serving.service imports serving.uploads, which imports tasks code: the Bento needs it."""
    for name, source in {
        "tasks/__init__.py": "",
        "tasks/errors.py": "",
        "tasks/atomic.py": "",
        "serving/__init__.py": "",
        "serving/entry.py": "from serving.checks import check\n",
        "serving/checks.py": "from tasks.errors import MedtransferError\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(source)
    found = relative_paths(import_closure("serving.entry", root=tmp_path), root=tmp_path)
    assert found == ["tasks/__init__.py", "tasks/errors.py"]


def test_the_package_stage_depends_on_every_serving_module() -> None:
    code = set(relative_paths(stage_code_files("package")))
    assert code >= SERVING_FILES, sorted(SERVING_FILES - code)


def test_the_service_needs_neither_attacks_nor_training_nor_ingestion() -> None:
    needed = relative_paths(import_closure("serving.service"))
    assert "tasks/model/inference.py" in needed and "tasks/data/dicom_io.py" in needed
    for absent in ("tasks/robustness/", "tasks/training/", "tasks/stages/", "tasks/data/synthetic"):
        assert not any(path.startswith(absent) for path in needed), absent


def _dvc_code_deps(stage: dict) -> set[str]:
    """The deps of one dvc.yaml stage that are project source (tasks/, serving/)."""
    return {dep for dep in stage.get("deps", []) if dep.startswith(("tasks/", "serving/"))}


def test_every_dvc_stage_depends_on_exactly_its_import_closure() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        expected = set(relative_paths(stage_code_files(name)))
        listed = _dvc_code_deps(stage)
        assert listed == expected, (
            f"dvc.yaml stage {name}: missing {sorted(expected - listed)}, "
            f"extra {sorted(listed - expected)}"
        )


def test_editing_the_adversarial_module_changes_the_train_cache_key(tmp_path: Path) -> None:
    """The train stage imports tasks/training/adversarial.py, so its code version (the
    Prefect cache key's code part and the checkpoint key's) must follow that file."""
    copy = tmp_path / "project"
    for folder in ("tasks", "serving"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_version("train", copy)
    assert before == code_version("train", REPO)  # the same tree gives the same version
    evaluate_before = code_version("evaluate", copy)
    adversarial = copy / "tasks" / "training" / "adversarial.py"
    adversarial.write_text(adversarial.read_text() + "\n# an edit\n")
    assert code_version("train", copy) != before
    assert code_version("evaluate", copy) == evaluate_before  # evaluate does not import it


def test_rewriting_dvc_yaml_restores_a_dropped_code_dep_and_keeps_everything_else() -> None:
    shipped = (REPO / "dvc.yaml").read_text()
    assert rewrite_dvc_code_deps(shipped) == shipped  # already the closure: nothing moves
    broken = shipped.replace("      - tasks/training/adversarial.py\n", "", 1)
    assert broken != shipped
    assert rewrite_dvc_code_deps(broken) == shipped


def test_a_new_attack_file_joins_the_robustness_stage_code_but_not_the_train_stage(
    tmp_path: Path,
) -> None:
    """Attacks are loaded by discovery (tasks.plugins.import_plugins), not imported by name:
    the closure must still see a new family file, or its edits would hit a stale cache."""
    copy = tmp_path / "project"
    for folder in ("tasks", "serving"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # the closure is cached per tree: the untouched tree's version is the repository's
    before = {stage: code_version(stage, REPO) for stage in ("robustness", "train")}
    (copy / "tasks" / "robustness" / "attacks" / "extra.py").write_text("ATTACK = None\n")
    (copy / "tasks" / "robustness" / "attacks" / "_helper.py").write_text("X = 1\n")
    files = relative_paths(stage_code_files("robustness", copy), copy)
    assert "tasks/robustness/attacks/extra.py" in files
    assert "tasks/robustness/attacks/_helper.py" not in files  # machinery: only if imported
    assert code_version("robustness", copy) != before["robustness"]
    assert code_version("train", copy) == before["train"]  # train loads no attack family
