"""Names in prose follow the code: every ``tasks.…`` dotted name and ``tasks/….py`` path that the
product's source, tests, benchmarks, README, pyproject.toml and Makefile mention exists (the flat layout's
``tasks.dicom_io``, ``tasks.teachers`` … once outlived the move into rooms)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("tasks", "flows", "serving", "tests", "benchmarks")
SUFFIXES = (".py", ".md", ".yaml", ".toml")
# Placeholders that explain a pattern rather than name a module.
EXAMPLES = {"tasks.x", "tasks.x.y", "tasks._x"}
# Files a test writes into a copy of the tree to show how new plug-ins are picked up.
EXAMPLE_PATHS = {"tasks/robustness/attacks/extra.py", "tasks/robustness/attacks/_helper.py"}
# Recorded results name the layout of the day they were measured: history, not prose to update.
RECORDS = ROOT / "benchmarks" / "results"
DOTTED = re.compile(r"\btasks(?:\.[A-Za-z_]\w*)+")
PATH = re.compile(r"\btasks/[\w/]+\.py\b")


def resolves(dotted: str, root: Path = ROOT) -> bool:
    """Whether ``tasks.a.b.c`` is a module, or names an attribute of one (its longest module
    prefix is at least ``tasks.a``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 1, -1):
        base = root.joinpath(*parts[:end])
        if base.with_suffix(".py").is_file() or (base / "__init__.py").is_file():
            return True
    return False


def stale_references(text: str, root: Path = ROOT) -> list[str]:
    """The dotted names and paths in ``text`` that name nothing under ``root``."""
    dotted = [m for m in DOTTED.findall(text) if m not in EXAMPLES and not resolves(m, root)]
    paths = [m for m in PATH.findall(text) if m not in EXAMPLE_PATHS and not (root / m).is_file()]
    return dotted + paths


def test_the_scan_finds_the_flat_layouts_names_and_passes_the_rooms() -> None:
    text = (
        "see tasks.dicom_io.read_dataset and tasks/train.py; tasks.teachers.register_teacher;\n"
        "tasks.data.dicom_io.read_dataset, tasks/stages/train.py, tasks.model.teachers.get_teacher"
    )
    assert stale_references(text) == [
        "tasks.dicom_io.read_dataset",
        "tasks.teachers.register_teacher",
        "tasks/train.py",
    ]


def test_no_source_file_or_readme_names_a_module_that_does_not_exist() -> None:
    files = [p for d in SCANNED for p in sorted((ROOT / d).rglob("*")) if p.suffix in SUFFIXES]
    stale = {
        str(path.relative_to(ROOT)): found
        for path in [*files, ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Makefile"]
        if path != Path(__file__).resolve()  # this file names stale ones on purpose
        and RECORDS not in path.parents
        and (found := stale_references(path.read_text(errors="ignore")))
    }
    assert stale == {}, f"names of modules that do not exist: {stale}"
