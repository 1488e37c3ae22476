"""Which project source files a module runs: its import closure inside ``tasks/``.

One derivation, used everywhere a list of modules used to be written by hand: the Prefect
cache key of each stage and ``dvc.yaml``'s code deps (``flows.cache``), and the files the
Bento ships (``serving/bentofile.yaml``, checked by a test). The closure is read from the
source with :mod:`ast`, without importing anything, and follows imports at any depth
(function-level imports included, since those run too).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
from functools import cache
from pathlib import Path

from tasks.stages import table
from tasks.stages.table import PIPELINE

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "tasks"


def module_path(module: str, root: Path = PROJECT_ROOT) -> Path | None:
    """The file of a dotted ``module`` under ``root`` (``tasks.data.dicom_io`` ->
    ``tasks/data/dicom_io.py``; a package gives its ``__init__.py``), or None if none exists."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(path: Path, package: str = PACKAGE) -> set[str]:
    """Dotted names of the ``package`` modules ``path`` imports (``from tasks.x import y`` names
    ``tasks.x`` and, when ``y`` is itself a module, ``tasks.x.y``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        found |= _plugin_modules(node, path)
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name == package or name.startswith(package + ".")}


def _plugin_modules(node: ast.AST, path: Path) -> set[str]:
    """The modules a call ``import_plugins("tasks.x")`` (:func:`tasks.plugins.import_plugins`)
    loads at run time: every public ``*.py`` beside that package's ``__init__.py``."""
    if not (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "import_plugins"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return set()
    package = node.args[0].value
    folder = _package_folder(package, path)
    if folder is None:
        return {package}
    return {package} | {
        f"{package}.{file.stem}" for file in folder.glob("*.py") if not file.stem.startswith("_")
    }


def _package_folder(package: str, path: Path) -> Path | None:
    """The folder of dotted ``package``, found from ``path`` (a file of the same tree)."""
    for parent in path.parents:
        candidate = parent.joinpath(*package.split("."))
        if (candidate / "__init__.py").is_file():
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    """``tasks.data.dicom_io`` -> ``[tasks, tasks.data, tasks.data.dicom_io]``: importing a
    module runs every parent package's ``__init__`` first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@cache
def _closure(start: tuple[str, ...], root: Path) -> tuple[Path, ...]:
    seen: dict[str, Path] = {}
    pending = [parent for module in start for parent in _with_parents(module)]
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        path = module_path(module, root)
        if path is None:  # ``from tasks.x import name`` where name is not a module
            continue
        seen[module] = path
        for imported in _imported_modules(path):
            pending += _with_parents(imported)
    return tuple(sorted(seen.values()))


def import_closure(*modules: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """Every ``tasks`` source file that importing ``modules`` runs, sorted, absolute.

    Args:
        modules: dotted module names, e.g. ``"tasks.stages.train"``.
        root: the project root (the folder that holds ``tasks/``).

    Returns:
        The files, packages' ``__init__.py`` included; a module outside ``tasks`` contributes
        only the ``tasks`` modules it and the modules of its own package that it imports import
        (``serving.service`` -> what the Bento needs).
    """
    found: set[Path] = set()
    for module in modules:
        if module.startswith(PACKAGE + ".") or module == PACKAGE:
            found |= set(_closure((module,), root))
        else:
            for imported in _imports_from_outside(module, root):
                found |= set(_closure((imported,), root))
    return sorted(found)


def _imports_from_outside(module: str, root: Path) -> set[str]:
    """The ``tasks`` modules that ``module`` (outside ``tasks``, e.g. ``serving.service``)
    imports, itself or through the modules of its own top-level package it imports
    (``serving.uploads``), at any depth.

    Raises:
        FileNotFoundError: ``module`` has no source file under ``root``.
    """
    if module_path(module, root) is None:
        raise FileNotFoundError(f"no source file for module {module!r} under {root}")
    own = module.split(".")[0]
    found: set[str] = set()
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        path = module_path(name, root)
        if name in seen or path is None:
            continue
        seen.add(name)
        found |= _imported_modules(path)
        pending += _imported_modules(path, own)
    return found


def relative_paths(paths: list[Path], root: Path = PROJECT_ROOT) -> list[str]:
    """``paths`` as POSIX paths relative to ``root`` (how dvc.yaml and bentofile.yaml name them)."""
    return [path.relative_to(root).as_posix() for path in paths]


# The pipeline's stages, from the one stage table (tasks.stages.table): a stage's code is the
# import closure of its entry-point module ``tasks.stages.<stage>`` plus its declared extras; the
# Prefect cache key (``flows.cache``), the training checkpoint's key and dvc.yaml's code deps
# (checked by tests/test_layout.py) all read it from here, so none of them lists modules by hand.
STAGES = tuple(stage.name for stage in PIPELINE)


def stage_code_files(stage: str, root: Path = PROJECT_ROOT) -> list[Path]:
    """The source files whose content ``stage``'s result depends on, sorted, absolute.

    Args:
        stage: a stage of :mod:`tasks.stages.table`.
        root: the project root (a copy of the tree in tests).

    Returns:
        The import closure of ``tasks.stages.<stage>`` plus the stage's declared extras (for
        ``package``: the serving files and the service's closure).

    Raises:
        KeyError: no such stage.
    """
    row = table.stage(stage)
    files = set(import_closure(row.module, *row.extra_modules, root=root))
    files |= {root / name for name in row.extra_files}
    return sorted(files)


def code_version(stage: str, root: Path = PROJECT_ROOT) -> str:
    """SHA-256 over the relative path and bytes of every file in :func:`stage_code_files`:
    an edit, a new import or a renamed module gives a new version."""
    digest = hashlib.sha256()
    for path in stage_code_files(stage, root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def rewrite_dvc_code_deps(text: str, root: Path = PROJECT_ROOT) -> str:
    """``dvc.yaml``'s text with each stage's ``tasks/``/``serving/`` deps replaced by its
    import closure, in place of the first of them; every other line (data deps, comments,
    params, outs) is kept as it is."""
    out: list[str] = []
    stage, in_deps, written = None, False, False
    for line in text.splitlines():
        name = re.match(r"^  (\w+):\s*$", line)
        if name:
            stage, in_deps, written = name.group(1), False, False
        elif re.match(r"^    deps:\s*$", line):
            in_deps = True
        elif in_deps and not line.startswith(("      - ", "      #")):
            in_deps = False  # (a comment among the deps does not end them)
        if in_deps and stage and re.match(r"^      - (tasks|serving)/", line):
            if not written:
                out += [
                    f"      - {path}"
                    for path in relative_paths(stage_code_files(stage, root), root)
                ]
                written = True
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    """``python -m tasks.code_closure``: print each stage's code deps as dvc.yaml lists them;
    with ``--write``, rewrite dvc.yaml's code deps from the imports (what the test checks)."""
    if "--write" in (sys.argv[1:] if argv is None else argv):
        dvc_yaml = PROJECT_ROOT / "dvc.yaml"
        dvc_yaml.write_text(rewrite_dvc_code_deps(dvc_yaml.read_text()))
        print(f"rewrote the code deps of {dvc_yaml}")
        return
    for stage in STAGES:
        print(f"{stage}:")
        print("\n".join(f"  - {path}" for path in relative_paths(stage_code_files(stage))))


if __name__ == "__main__":
    main()
