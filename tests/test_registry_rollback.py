"""The registry's rollback on a real SQLite MLflow store: a failed registration removes what it
made and nothing another registration made."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.registry.mlflow_registry import ensure_registered_model, roll_back


@pytest.fixture
def client(fresh_mlflow_store: str):
    from mlflow import MlflowClient

    return MlflowClient(fresh_mlflow_store)


def _version(client, name: str, tmp_path: Path) -> str:
    return str(client.create_model_version(name, source=tmp_path.as_uri()).version)


def test_a_rollback_keeps_a_model_it_created_once_another_version_is_in_it(
    client, tmp_path: Path
) -> None:
    assert ensure_registered_model(client, "student") is True
    kept = _version(client, "student", tmp_path)  # another registration, in between
    failed = _version(client, "student", tmp_path)
    roll_back(client, "student", failed, created_model=True)
    versions = client.search_model_versions("name='student'")
    assert [str(v.version) for v in versions] == [kept]


def test_a_rollback_removes_a_model_it_created_when_its_version_was_the_only_one(
    client, tmp_path: Path
) -> None:
    assert ensure_registered_model(client, "student") is True
    roll_back(client, "student", _version(client, "student", tmp_path), created_model=True)
    assert not client.search_registered_models(filter_string="name='student'")


def test_only_mlflows_does_not_exist_counts_as_a_missing_model(
    client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.exceptions import MlflowException

    assert ensure_registered_model(client, "student") is True
    assert ensure_registered_model(client, "student") is False

    def store_locked(*args, **kwargs):
        raise MlflowException("database is locked")  # INTERNAL_ERROR, not RESOURCE_DOES_NOT_EXIST

    monkeypatch.setattr(client, "get_registered_model", store_locked)
    with pytest.raises(MlflowException, match="database is locked"):
        ensure_registered_model(client, "other")
    assert not client.search_registered_models(filter_string="name='other'")
