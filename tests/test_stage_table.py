"""The stage table (tasks/stages/table.py) is the one declaration of each stage: dvc.yaml, the
Prefect flow, the command line and the run summary agree with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows import cli, pipeline, summary
from flows.cache import outputs_present, stage_key
from tasks import reports
from tasks.config import Params
from tasks.figures import write_figures
from tasks.stages import table

REPO = Path(__file__).resolve().parent.parent


def _dvc_path(name: str) -> str:
    """How dvc.yaml names an artifact or a report of the table."""
    if name.startswith(table.REPORT_PREFIX):
        stage = name.removeprefix(table.REPORT_PREFIX)
        return f"reports/{reports.BY_STAGE[stage].file_name}"
    return table.ARTIFACTS[name]


def _listed(entries: list) -> set[str]:
    """dvc.yaml list entries: plain paths, or one-key mappings (``path: {cache: false}``)."""
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def test_dvc_yaml_has_exactly_the_pipeline_stages_of_the_table_in_order() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert list(stages) == [stage.name for stage in table.PIPELINE]


@pytest.mark.parametrize("stage", table.PIPELINE, ids=lambda stage: stage.name)
def test_each_dvc_stage_reads_and_writes_what_its_row_declares(stage: table.Stage) -> None:
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage.name]
    assert declared["cmd"] == f"medtransfer {stage.name} --quiet"
    assert declared.get("params", []) == list(stage.params)
    data_deps = {dep for dep in declared["deps"] if not dep.startswith(("tasks/", "serving/"))}
    assert data_deps == {_dvc_path(name) for name in stage.reads}
    outputs = _listed(declared.get("outs", [])) | _listed(declared.get("metrics", []))
    assert outputs == {_dvc_path(name) for name in stage.writes}


def test_every_pipeline_stage_is_a_prefect_task_of_the_same_name() -> None:
    for stage in table.PIPELINE:
        assert getattr(pipeline, stage.name).name == stage.name
    with pytest.raises(KeyError, match="not a pipeline stage"):
        pipeline.stage_task("advise")


def test_the_run_summary_has_a_section_for_every_stage_report_of_the_pipeline() -> None:
    with_report = {stage.name for stage in table.PIPELINE if stage.report_writes}
    assert set(summary.SECTIONS) == with_report


def test_every_stage_is_a_subcommand_with_its_help_and_the_lock_its_row_asks_for() -> None:
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    for stage in table.STAGES:
        assert commands[stage.name].description == stage.help
        assert (stage.name in cli.WRITES_OUTPUTS) == stage.locks
    assert "--resume" in commands["train"].format_help()
    assert "--resume" not in commands["evaluate"].format_help()


def test_every_report_the_table_names_is_a_declared_report() -> None:
    for stage in table.STAGES:
        for name in stage.reads + stage.writes:
            if name.startswith(table.REPORT_PREFIX):
                assert name.removeprefix(table.REPORT_PREFIX) in reports.BY_STAGE
            else:
                assert name in table.ARTIFACTS, name


def test_a_stage_s_outputs_count_as_present_only_when_all_its_written_files_exist(
    params: Params,
) -> None:
    assert not outputs_present("evaluate", params)
    reports.METRICS.write(params.reports_dir, {"threshold": 0.5})
    assert not outputs_present("evaluate", params)  # its figures (the DVC metrics) are missing
    write_figures(params.reports_dir, "evaluate", {"test_auc": {"estimate": 0.5}})
    assert outputs_present("evaluate", params)
    assert not outputs_present("train", params)  # neither model nor report


def test_register_s_cache_key_follows_the_per_group_figures_its_worst_group_gate_reads(
    params: Params,
) -> None:
    for report in (reports.TRAIN, reports.METRICS, reports.ROBUSTNESS):
        report.write(params.reports_dir, {"run_id": "r1"})
    without_groups = stage_key("register", params)
    groups = reports.plot_path(params.reports_dir, "groups_test.json")
    groups.parent.mkdir(parents=True, exist_ok=True)
    groups.write_text('[{"group": "scanner A", "auc": 0.9}]')
    with_groups = stage_key("register", params)
    groups.write_text('[{"group": "scanner A", "auc": 0.6}]')
    assert len({without_groups, with_groups, stage_key("register", params)}) == 3


def test_an_unknown_stage_is_refused_naming_the_stages() -> None:
    with pytest.raises(KeyError, match="the stages are"):
        table.stage("deploy")
