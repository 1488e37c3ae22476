"""The process defaults of ``flows.environment`` reach Prefect, and never override the user."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.processes import environment_without_prefect, run_python

READ_TIMEOUT = (
    "import flows\n"
    "from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout\n"
    "print(timeout.value())\n"
)


def _prefect_startup_timeout(prefect_home: Path, user_value: str | None) -> str:
    """The temporary-server startup timeout Prefect sees in a fresh process that imports flows,
    with ``user_value`` (or nothing) set by the user."""
    env = environment_without_prefect(prefect_home)
    if user_value is not None:
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = user_value
    done = run_python(READ_TIMEOUT, env, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize(("user_value", "expected"), [(None, "120"), ("45", "45")])
def test_startup_timeout_default_reaches_prefect_unless_the_user_set_one(
    tmp_path: Path, user_value: str | None, expected: str
) -> None:
    assert _prefect_startup_timeout(tmp_path / "prefect-home", user_value) == expected
