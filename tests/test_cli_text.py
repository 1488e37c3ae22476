"""What the command line prints for a person: help without reStructuredText markup, a run
summary whose commands work as typed and whose dataset version reads as a hash."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

from flows import cli
from flows.summary import summary_lines


def _help_texts() -> dict[str, str]:
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    return {"": parser.format_help(), **{n: c.format_help() for n, c in commands.items()}}


def test_no_help_text_shows_restructuredtext_double_backticks() -> None:
    texts = _help_texts()
    assert "medtransfer" in texts[""] and len(texts) > 10
    assert {name: text for name, text in texts.items() if "``" in text} == {}


def test_the_summary_s_mlflow_ui_command_names_a_program_that_exists_outside_the_venv() -> None:
    line = summary_lines({"train": {"run_id": "abc"}}, "sqlite:///mlflow.db")[-1]
    command = shlex.split(re.search(r"`([^`]*mlflow[^`]* ui [^`]*)`", line).group(1))
    program = Path(command[0])
    # not a bare `mlflow`: that is on PATH only inside the activated venv
    assert program.parent != Path("."), command
    assert program.is_file() and os.access(program, os.X_OK), command
    assert command[1:] == ["ui", "--backend-store-uri", "sqlite:///mlflow.db"]


def test_the_summary_shows_the_dataset_version_without_dvc_s_dir_suffix() -> None:
    report = {"dataset_version": "67fc0c1e5ab0c8e0d4c5cea.dir", "strategy": "partial"}
    lines = summary_lines({"train": report})
    assert "dataset version: 67fc0c1e5ab0c8e0d4c5cea" in lines


def test_the_model_card_shows_the_dataset_version_without_dvc_s_dir_suffix() -> None:
    from tests.conftest import model_card_of

    card = model_card_of(dataset_version="67fc0c1e5ab0c8e0d4c5cea.dir")
    assert "Dataset version (DVC hash of the processed dataset): `67fc0c1e5ab0c8e0d4c5cea`." in card
    assert "Evaluated only on dataset `67fc0c1e5ab0c8e0d4c5cea`;" in card
    assert ".dir" not in card


def test_a_promotion_on_new_data_names_both_dataset_versions_without_dvc_s_dir_suffix() -> None:
    from tasks.registry.promotion import Candidate, Champion, promotion_decision

    candidate = Candidate(
        run_id="r",
        dataset_version="9a1b2c3d.dir",
        spec={},
        metrics={"test": {"auc": 0.9}},
        robustness={"verdict": {"passed": True}},
        ingest={},
    )
    promoted, reasons = promotion_decision(candidate, Champion("1", "67fc0c1e.dir", 0.95))
    assert promoted
    assert "evaluated on dataset 67fc0c1e, not 9a1b2c3d: a passing version" in reasons[0]
