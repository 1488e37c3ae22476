"""Reading ``params.yaml`` and applying ``-S key=value`` overrides.

Overrides use the spelling of ``dvc exp run -S``: a dotted key, ``=``, and a YAML value, so
``train.compare=[full,scratch]`` is a list and ``data.image_size=160`` an int.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from tasks.errors import MedtransferError

DEFAULT_PARAMS_FILE = Path("params.yaml")


def load_params(path: str | Path = DEFAULT_PARAMS_FILE, overrides: Iterable[str] = ()) -> dict:
    """Read a params file and apply overrides.

    Args:
        path: the YAML file, ``params.yaml`` in the working directory by default.
        overrides: ``key=value`` strings applied in order.

    Returns:
        The nested parameter dictionary.
    """
    path = Path(path)
    if not path.is_file():
        raise MedtransferError(
            f"No parameter file at {path.resolve()}. Run medtransfer from the project folder "
            "(the one holding params.yaml) or pass --params PATH."
        )
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise MedtransferError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(params, dict):
        raise MedtransferError(
            f"{path} must hold a mapping of sections, not {type(params).__name__}."
        )
    return apply_overrides(params, overrides)


def apply_overrides(params: Mapping[str, Any], overrides: Iterable[str]) -> dict:
    """Return a copy of ``params`` with each ``dotted.key=yaml_value`` override applied.

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
                f"The value in override {override!r} is not YAML: {err}"
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


def get_dotted(params: Mapping[str, Any], dotted_key: str) -> Any:
    """Return ``params[a][b]`` for ``"a.b"``, or raise a clear error naming the missing key."""
    node: Any = params
    for part in dotted_key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise MedtransferError(
                f"params.yaml has no {dotted_key!r}; add it or check the spelling."
            )
        node = node[part]
    return node


def checked_section(params: Mapping[str, Any], name: str, known: Iterable[str]) -> dict:
    """A copy of the ``name`` section of ``params`` (empty when absent), its keys checked.

    Raises:
        MedtransferError: a key that is not in ``known`` (a typo would otherwise be ignored).
    """
    section = dict(params.get(name) or {})
    unknown = sorted(set(section) - set(known))
    if unknown:
        raise MedtransferError(
            f"Unknown keys in {name}: {unknown}; known keys are {sorted(known)}."
        )
    return section
