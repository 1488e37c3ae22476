"""The teacher registry: each architecture family's file registers its teachers by name."""

from __future__ import annotations

from tasks.errors import MedtransferError
from tasks.model.teachers._contract import TeacherSpec

DEFAULT_TEACHER = "efficientnet-lite0"

_REGISTRY: dict[str, TeacherSpec] = {}


def register_teacher(spec: TeacherSpec, *, replace: bool = False) -> None:
    """Make ``spec`` available by name; refuses to shadow an existing name unless ``replace``."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f"a teacher named {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def known_teachers() -> tuple[str, ...]:
    """Names of the registered teachers, sorted."""
    return tuple(sorted(_REGISTRY))


def get_teacher(teacher: str | TeacherSpec) -> TeacherSpec:
    """The spec registered under ``teacher`` (a spec is returned as it is).

    Raises:
        MedtransferError: for an unknown name, listing the known ones.
    """
    if isinstance(teacher, TeacherSpec):
        return teacher
    try:
        return _REGISTRY[teacher]
    except KeyError:
        raise MedtransferError(
            f"Unknown teacher {teacher!r}. Known teachers: {', '.join(known_teachers())}. "
            "Choose one of them (other architectures need tasks.model.teachers.register_teacher)."
        ) from None


# --------------------------------------------------------------------------------------------
# Weights: find, verify, read, load
