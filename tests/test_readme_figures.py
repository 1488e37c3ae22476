"""The figures README.md quotes are those recorded in benchmarks/results/ (so that a result
regenerated with other numbers makes the README wrong visibly, here, rather than quietly)."""

from __future__ import annotations

import re

from tests.conftest import REPO

RESULTS = REPO / "benchmarks" / "results"
README = (REPO / "README.md").read_text()


def _flat(text: str) -> str:
    """``text`` with line breaks and runs of spaces as single spaces (README wraps lines)."""
    return re.sub(r"\s+", " ", text)


def _table_cell(result: str, model: str, budget: str, column: str) -> str:
    """The cell of ``column`` in the row of ``model`` at ``budget`` of a results table."""
    lines = (RESULTS / result).read_text().splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    names = [cell.strip() for cell in header.strip("|").split("|")]
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if (
            line.startswith("|")
            and cells[0] == model
            and cells[names.index("budget /255")] == budget
        ):
            return cells[names.index(column)]
    raise AssertionError(f"{result}: no row for {model} at {budget}/255")


def test_the_demo_s_gate_figures_in_the_readme_are_the_recorded_mimicry_at_1_255() -> None:
    """The default (full) passes the mimicry gate, the former default (partial) failed it:
    both figures as robustness-strategies.md records them, with its date."""
    text = _flat(README)
    default = re.search(
        r"flipped (\S+ \[\S+, \S+\]) of its correct answers at 1/255, against the allowed 0\.6;"
        r" `benchmarks/results/robustness-strategies.md`",
        text,
    )
    assert default, "README's demo paragraph no longer quotes the default's gate figure"
    assert _table_cell("robustness-strategies.md", "full", "1", "mimicry success") == (
        default.group(1)
    )
    former = re.search(
        r"`partial` with 3 blocks, failed the mimicry gate \((\S+ \[\S+, \S+\]), measured (\S+)\)",
        text,
    )
    assert former, "README's demo paragraph no longer quotes the former default's figure"
    assert _table_cell("robustness-strategies.md", "partial", "1", "mimicry success") == (
        former.group(1)
    )
    recorded = _flat((RESULTS / "robustness-strategies.md").read_text())
    assert f"- date: {former.group(2)} " in recorded


def test_the_readme_s_mimicry_figures_per_strategy_are_the_recorded_ones() -> None:
    quoted = re.search(
        r"flips (\S+ \[\S+, \S+\]) of linear_probe's correct answers, (\S+ \[\S+, \S+\]) of "
        r"partial's and (\S+ \[\S+, \S+\]) of full's",
        _flat(README),
    )
    assert quoted, "README no longer quotes the per-strategy mimicry figures"
    for model, figure in zip(("linear_probe", "partial", "full"), quoted.groups(), strict=True):
        assert _table_cell("robustness-strategies.md", model, "1", "mimicry success") == figure


def test_every_results_file_the_readme_names_exists() -> None:
    named = set(re.findall(r"benchmarks/results/([\w.-]+\.md)", README))
    named |= set(re.findall(r"\| `([\w-]+\.md)` \|", README))  # the benchmark table's column
    assert named
    assert sorted(name for name in named if not (RESULTS / name).is_file()) == []


def test_a_result_measured_on_older_defaults_says_so_instead_of_claiming_the_verdict() -> None:
    """pipeline.md was measured when robustness attacked 32 images with fewer attacks; its
    "robustness verdict pass" is not what today's default gives (README: the demo fails a
    gate), so the file names its commit and says what changed."""
    text = (RESULTS / "pipeline.md").read_text()
    assert "robustness verdict pass" not in text
    assert "83fbfd5" in text and "stale" in text.lower()


def test_the_results_header_names_the_commit_measured() -> None:
    from benchmarks.report import machine_header

    commit = re.search(r"^- commit: ([0-9a-f]{7,})(\+changes)?$", machine_header(), re.M)
    assert commit, machine_header()
