"""``params.yaml`` as raw YAML, before :mod:`tasks.config` checks and types it: the file read
with every key unique, and ``-S dotted.key=value`` overrides applied to existing keys only.
Every problem is one line naming the file, the key or the YAML line and column."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.errors import MedtransferError


def read_params_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a params file (unchecked)."""
    path = Path(path)
    if not path.is_file():
        raise MedtransferError(
            f"No parameter file at {path.resolve()}. Run medtransfer from the project folder "
            "(the one holding params.yaml) or pass --params PATH."
        )
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        raise MedtransferError(
            f"{path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML."
        ) from err
    except yaml.YAMLError as err:
        raise MedtransferError(f"{path} is not valid YAML: {_yaml_problem(err)}") from err
    if not isinstance(raw, dict):
        raise MedtransferError(f"{path} must hold a mapping of sections, not {type(raw).__name__}.")
    return raw


def apply_overrides(params: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """Return a copy of the raw mapping ``params`` with each ``dotted.key=yaml_value``
    override applied.

    The key must already exist in ``params``, so that a typo fails loudly instead of being
    silently ignored.
    """
    result = copy.deepcopy(dict(params))
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        if not sep or not key.strip():
            raise MedtransferError(
                f"Override {override!r} is not of the form key=value (e.g. data.image_size=160)."
            )
        try:
            value = yaml.safe_load(raw_value) if raw_value.strip() else None
        except yaml.YAMLError as err:
            raise MedtransferError(
                f"The value in override {override!r} is not YAML: {_yaml_problem(err)}"
            ) from err
        set_dotted(result, key.strip(), value)
    return result


def set_dotted(params: dict, dotted_key: str, value: Any) -> None:
    """Set ``params[a][b][c] = value`` for ``dotted_key == "a.b.c"``; the key must exist."""
    *sections, leaf = dotted_key.split(".")
    node = params
    walked: list[str] = []
    for section in sections:
        walked.append(section)
        if not isinstance(node.get(section), dict):
            raise MedtransferError(
                f"Unknown parameter section {'.'.join(walked)!r} in override {dotted_key!r}; "
                f"known keys there: {sorted(node)}."
            )
        node = node[section]
    if leaf not in node:
        where = f"in section {'.'.join(sections)!r}" if sections else "at the top level"
        raise MedtransferError(
            f"Unknown parameter {dotted_key!r}; keys {where} are {sorted(node)}."
        )
    node[leaf] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (plain YAML keeps the
    last silently, so an edited setting could be overridden by a forgotten copy below it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} appears twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line from a YAML error: the problem and its line and column."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
