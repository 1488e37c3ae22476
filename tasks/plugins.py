"""Plug-in packages: a family of interchangeable parts (attacks) where a new part is one new file.

A plug-in package holds shared machinery in underscore modules and one public module per
family, each declaring its parts at the bottom (timm's habit). :func:`import_plugins` imports
every public module of the package; :mod:`tasks.code_closure` reads the same call (a literal
package name) so that a stage's code deps include every plug-in it loads.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def import_plugins(package: str) -> list[ModuleType]:
    """The public modules of ``package`` (a dotted name, e.g. ``"tasks.robustness.attacks"``),
    imported, sorted by name; modules whose name starts with ``_`` are shared machinery and are
    left out."""
    root = importlib.import_module(package)
    names = sorted(info.name for info in pkgutil.iter_modules(root.__path__))
    return [
        importlib.import_module(f"{package}.{name}") for name in names if not name.startswith("_")
    ]
