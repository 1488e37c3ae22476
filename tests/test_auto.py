"""``auto``'s rule beyond the evidence: the candidates (data size, native resolution), the
pilots' decision on accuracy and inherited exposure, the refusal of ``auto`` with ``compare``,
and the words ``advise`` prints. Pure logic on hand-made numbers (the stage runs in
tests/test_evidence.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from flows.summary import summary_lines
from tasks.config import Params
from tasks.errors import MedtransferError
from tasks.transfer.auto import check_compare, decision_table
from tasks.transfer.candidates import native_resolution, rank_candidates, smaller_size
from tasks.transfer.pilots import Candidate, Pilot, decide
from tasks.transfer.selection import TapEvidence, choose_depth, choose_transfer

LITE0_BLOCKS = [0, 2, 4, 7, 10, 14, 15, 15]


def _taps(teacher: str, aucs: list[float], half_width: float = 0.03) -> list[TapEvidence]:
    names = [f"stage{i + 1}" for i in range(len(aucs) - 1)] + ["top"]
    return [
        TapEvidence(teacher, n, b, (b + 1) / 16, 8, a, a - half_width, a + half_width, a, -0.5, 0.1)
        for n, a, b in zip(names, aucs, LITE0_BLOCKS, strict=True)
    ]


class _Probe:
    """What :func:`decide` reads of the exposure probe."""

    threshold = 0.6
    enabled = True


def _pilot(label: str, val_auc: float, exposure_high: float) -> Pilot:
    strategy, _, depth = label.partition("/")
    pilot = Pilot(Candidate("efficientnet-lite0", strategy, int(depth or 0), "test"))
    pilot.val_auc, pilot.val_auc_low, pilot.val_auc_high = val_auc, val_auc - 0.05, val_auc + 0.05
    pilot.exposure, pilot.exposure_low = exposure_high - 0.15, exposure_high - 0.3
    pilot.exposure_high, pilot.exposure_n = exposure_high, 40
    pilot.passes = exposure_high <= _Probe.threshold
    return pilot


# ---------------------------------------------------------------------------- the decision --


def test_the_best_validation_auc_whose_exposure_passes_wins_over_a_better_exposed_one() -> None:
    partial = _pilot("partial/3", 0.95, 0.66)  # the better AUC, but its upper bound fails
    full = _pilot("full", 0.93, 0.36)
    lp_ft = _pilot("lp_ft", 0.90, 0.40)
    final = [partial, full, lp_ft]  # the evidence's order
    decision = decide(final, final, _Probe(), 10.0, False)
    assert decision.chosen is full
    assert decision.runner_up is lp_ft
    assert decision.exposure_passed
    assert decision.confidence == "low"  # full's lower bound 0.88 lies below lp_ft's 0.90
    assert any("lite0 partial/3 scored higher (0.950)" in r for r in decision.reasons)
    assert decision.gate == 0.6


def test_when_no_finalist_passes_the_least_exposed_is_chosen_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worse = _pilot("partial/3", 0.95, 0.70)
    better = _pilot("partial/1", 0.90, 0.64)
    with caplog.at_level(logging.WARNING, logger="tasks.transfer.pilots"):
        decision = decide([worse, better], [worse, better], _Probe(), 1.0, False)
    assert decision.chosen is better
    assert not decision.exposure_passed
    assert "no finalist's inherited exposure passes the gate" in decision.reasons[0]
    assert "expect the promotion gate to refuse it" in caplog.text


def test_within_the_best_pilots_interval_the_evidences_order_decides() -> None:
    evidence_first = _pilot("partial/1", 0.757, 0.52)  # the evidence's depth, ranked first
    best = _pilot("lp_ft", 0.762, 0.38)  # interval [0.712, 0.812] holds 0.757
    decision = decide([best, evidence_first], [evidence_first, best], _Probe(), 1.0, False)
    assert decision.chosen is evidence_first
    assert decision.reasons[1] == (
        "the pilots cannot separate lite0 partial/1 (0.757) from lite0 lp_ft (0.762 [0.712, "
        "0.812]): the evidence's ranking decides"
    )
    resolved = _pilot("lp_ft", 0.90, 0.38)  # interval [0.85, 0.95]: 0.757 lies below it
    decision = decide([resolved, evidence_first], [evidence_first, resolved], _Probe(), 1, False)
    assert decision.chosen is resolved


def test_a_higher_scoring_pilot_that_passes_is_never_said_to_fail_the_gate() -> None:
    # breastmnist_64: partial/6 chosen by the evidence's order inside full's interval, while
    # the reasons said full and lp_ft "fail the gate" with upper bounds 0.37 and 0.23
    evidence_first = _pilot("partial/6", 0.839, 0.30)
    full = _pilot("full", 0.887, 0.37)  # interval [0.837, 0.937] holds 0.839
    lp_ft = _pilot("lp_ft", 0.871, 0.23)
    final = [evidence_first, full, lp_ft]
    decision = decide(final, final, _Probe(), 1.0, False)
    assert decision.chosen is evidence_first
    assert not [r for r in decision.reasons if "fails the gate" in r]
    assert decision.reasons[-1] == (
        "lite0 lp_ft scored higher (0.871) and passes the gate, but inside lite0 full's "
        "interval: the evidence ranked it lower"
    )


def test_confidence_is_high_only_when_the_winner_lies_clear_of_the_runner_up() -> None:
    close = [_pilot("full", 0.93, 0.3), _pilot("lp_ft", 0.90, 0.3)]
    assert decide(close, close, _Probe(), 1.0, False).confidence == "low"  # 0.88 < 0.90
    clear = [_pilot("full", 0.97, 0.3), _pilot("lp_ft", 0.90, 0.3)]
    assert decide(clear, clear, _Probe(), 1.0, False).confidence == "high"  # 0.92 > 0.90


def test_the_decision_table_and_the_summary_lines_state_the_choice() -> None:
    decision = choose_transfer({"efficientnet-lite0": _taps("efficientnet-lite0", [0.8] * 8)}, 9, 1)
    pilots = [_pilot("full", 0.93, 0.36), _pilot("partial/3", 0.95, 0.66)]
    made = decide(pilots, pilots, _Probe(), 1.0, False)
    decision.pilots, decision.runner_up = made.to_dict(), "lite0 partial/3"
    decision.strategy, decision.reasons = "full", made.reasons
    decision.confidence = made.confidence  # low: 0.88 lies below partial/3's 0.95
    table = decision_table(decision)
    assert table[2].startswith("| lite0 full | test | 0 | 0.930 [0.880, 0.980] |")
    assert table[2].endswith("| 0.21 [0.06, 0.36] (40) | pass | **yes** |")
    assert table[3].endswith("| 0.51 [0.36, 0.66] (40) | FAIL |  |")
    lines = summary_lines({"train": {"auto": decision.to_dict()}})
    assert lines[1] == (
        "auto chose efficientnet-lite0 full (confidence low; runner-up lite0 partial/3)"
    )
    assert lines[2].startswith("  because lite0 full: validation AUC 0.930 [0.880, 0.980]")


# -------------------------------------------------------------------------- the candidates --


def test_enough_images_make_full_and_lp_ft_candidates_beside_the_evidence_depth() -> None:
    evidence = {
        "efficientnet-lite0": _taps(
            "efficientnet-lite0", [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.85, 0.8]
        )
    }
    found = rank_candidates(evidence, ["efficientnet-lite0"], 500, "auto", 3)
    assert [(c.strategy, c.unfreeze_blocks) for c in found] == [
        ("partial", 1),
        ("full", 16),
        ("lp_ft", 16),
    ]


def test_few_images_freeze_more_and_a_close_teacher_is_piloted_too() -> None:
    strong = _taps("efficientnet-lite0", [0.6, 0.7, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8])
    close = _taps("efficientnet-lite1", [0.6, 0.7, 0.89, 0.8, 0.8, 0.8, 0.8, 0.8])
    evidence = {"efficientnet-lite0": strong, "efficientnet-lite1": close}
    found = rank_candidates(evidence, list(evidence), 150, "auto", 3)
    assert [(c.teacher, c.strategy) for c in found] == [
        ("efficientnet-lite0", choose_depth("efficientnet-lite0", strong)[0]),
        ("efficientnet-lite0", "linear_probe"),
        ("efficientnet-lite1", choose_depth("efficientnet-lite1", close)[0]),
    ]
    far = {
        "efficientnet-lite0": strong,
        "efficientnet-lite1": _taps("efficientnet-lite1", [0.8] * 8),
    }
    assert {c.teacher for c in rank_candidates(far, list(far), 150, "auto", 3)} == {
        "efficientnet-lite0"
    }  # 0.80 lies below the winner's interval [0.87, 0.93]


def test_with_enough_images_a_close_teacher_is_piloted_beside_full_and_lp_ft() -> None:
    strong = _taps("efficientnet-lite0", [0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.85, 0.8])
    close = _taps("efficientnet-lite1", [0.6, 0.7, 0.75, 0.8, 0.85, 0.89, 0.85, 0.8])
    evidence = {"efficientnet-lite0": strong, "efficientnet-lite1": close}
    found = rank_candidates(evidence, list(evidence), 500, "auto", 3)
    assert [(c.teacher, c.strategy, c.unfreeze_blocks) for c in found] == [
        ("efficientnet-lite0", "partial", 1),
        ("efficientnet-lite0", "full", 16),
        ("efficientnet-lite0", "lp_ft", 16),
        ("efficientnet-lite1", *choose_depth("efficientnet-lite1", close)[:2]),
    ]


def test_a_configured_strategy_weighs_only_the_teachers() -> None:
    strong = _taps("efficientnet-lite0", [0.9] * 8)
    close = _taps("efficientnet-lite2", [0.89] * 8)
    found = rank_candidates(
        {"efficientnet-lite0": strong, "efficientnet-lite2": close},
        ["efficientnet-lite0", "efficientnet-lite2"],
        1000,
        "partial",
        3,
    )
    assert [(c.teacher, c.strategy, c.unfreeze_blocks) for c in found] == [
        ("efficientnet-lite0", "partial", 3),
        ("efficientnet-lite2", "partial", 3),
    ]


def test_the_native_resolution_is_read_from_the_npz_header(tmp_path: Path) -> None:
    path = tmp_path / "small.npz"
    images = np.zeros((3, 28, 28), np.uint8)
    np.savez(path, train_images=images, train_labels=np.zeros((3, 1)))
    assert native_resolution(path) == 28
    assert native_resolution(tmp_path / "missing.npz") is None
    assert smaller_size(28, 128) == 32
    assert smaller_size(64, 128) == 64
    assert smaller_size(256, 128) is None
    assert smaller_size(120, 128) is None  # rounds up to 128: nothing smaller to suggest


def test_the_native_resolution_of_a_dicom_folder_is_the_median_header_size(
    tmp_path: Path,
) -> None:
    from tests.conftest import make_mono_dataset

    for i, side in enumerate((40, 48, 48, 200)):
        ds = make_mono_dataset(np.zeros((side, side + 10), np.uint16))
        ds.save_as(tmp_path / f"{i}.dcm", enforce_file_format=True)
    (tmp_path / "labels.csv").write_text("path,label\n")
    assert native_resolution(tmp_path) == 48


# ------------------------------------------------------------------------- refusals, words --


def test_strategy_auto_with_compare_is_refused_in_one_line(params: Params) -> None:
    auto = params.with_overrides(["train.strategy=auto", "train.compare=[partial,full]"])
    with pytest.raises(MedtransferError, match=r"train\.strategy=auto chooses one strategy"):
        check_compare(auto)
    check_compare(params.with_overrides(["train.teacher=auto", "train.compare=[partial,full]"]))


def test_advise_says_where_the_knn_auc_peaks_and_why_a_lower_scoring_teacher_won() -> None:
    # lite0 peaks at stage5 (0.966); stage6 holds within 0.01 (0.960) and sets the depth
    lite0 = _taps("efficientnet-lite0", [0.6, 0.7, 0.8, 0.9, 0.966, 0.960, 0.9, 0.9])
    lite2 = _taps("efficientnet-lite2", [0.6, 0.7, 0.8, 0.9, 0.969, 0.9, 0.9, 0.9])
    lite2 = [r.__class__(**{**r.__dict__, "logme": -0.9}) for r in lite2]  # LogME worse
    decision = choose_transfer({"efficientnet-lite2": lite2, "efficientnet-lite0": lite0}, 9, 1)
    assert decision.teacher == "efficientnet-lite0"
    assert decision.reasons[0] == (
        "teacher efficientnet-lite0: best k-NN AUC 0.966 [0.936, 0.996] vs efficientnet-lite2 "
        "0.969: within 0.01 of each other, a tie that LogME breaks (-0.500 vs -0.900 at their "
        "best taps)"
    )
    assert decision.reasons[1] == (
        "efficientnet-lite0: k-NN AUC peaks at stage5 (block 11/16, 0.966); the deepest tap "
        "within 0.01 of it is stage6 (block 15/16, 0.960); at the top 0.900"
    )


def test_the_model_card_carries_the_decision_table_and_the_runner_up() -> None:
    from tasks.registry.model_card import CardInputs, render_model_card

    decision = choose_transfer({"efficientnet-lite0": _taps("efficientnet-lite0", [0.8] * 8)}, 9, 1)
    pilots = [_pilot("full", 0.93, 0.36), _pilot("partial/3", 0.95, 0.66)]
    decision.pilots, decision.runner_up = decide(pilots, pilots, _Probe(), 1, False).to_dict(), "x"
    selection = {**decision.to_dict(), "decision_table": decision_table(decision)}
    inputs = dict(model_name="m", version="1", run_id="r", spec={}, dataset_version="d")
    card = render_model_card(
        CardInputs(
            **inputs,
            ingest={},
            metrics={},
            robustness=None,
            promoted=False,
            alias="champion",
            selection=selection,
        )
    )
    assert (
        "pilot fine-tunes judged on validation accuracy and inherited exposure; runner-up x" in card
    )
    assert "\n".join(decision_table(decision)) in card


@pytest.mark.parametrize(
    ("budget_minutes", "epochs", "spent", "finalists"),
    [
        # round 1: 3 pilots x 2 epochs x 10 s = 60 s; round 2 would take 2 x 4 x 10 = 80 s more
        (2, [2, 2, 2], True, [("partial", 2), ("full", 2), ("lp_ft", 2)]),
        # 140 s fit in 3 minutes; a third round (1 x 8 x 10 s) would not: the last two decide
        (3, [4, 4, 2], True, [("full", 4), ("lp_ft", 4)]),
        # enough budget: a round of one would decide nothing, so the last two are the finalists
        (10, [4, 4, 2], False, [("full", 4), ("lp_ft", 4)]),
    ],
)
def test_successive_halving_keeps_the_better_half_and_measures_the_finalists_exposure(
    params: Params, monkeypatch: pytest.MonkeyPatch, budget_minutes, epochs, spent, finalists
) -> None:
    from tasks.transfer import pilots as module

    now = [0.0]
    aucs = {"full": 0.9, "lp_ft": 0.8, "partial": 0.7}

    measured: list[tuple[str, int]] = []

    def fake_round(params, dataset, pilots, epochs, progress) -> list[str]:
        for pilot in pilots:
            pilot.val_auc, pilot.epochs = aucs[pilot.candidate.strategy], epochs
        now[0] += 10.0 * len(pilots) * epochs  # 10 s per pilot epoch
        return [f"model of {p.candidate.strategy} at {epochs}" for p in pilots]

    def fake_measure(finalists, models, probe) -> None:
        for pilot, model in zip(finalists, models, strict=True):
            assert model == f"model of {pilot.candidate.strategy} at {pilot.epochs}"
            measured.append((pilot.candidate.strategy, pilot.epochs))
            pilot.passes = True

    monkeypatch.setattr(module, "_run_round", fake_round)
    monkeypatch.setattr(module, "_measure_finalists", fake_measure)
    monkeypatch.setattr(module, "ExposureProbe", lambda params, dataset: _Probe())
    settings = params.with_overrides(
        [f"train.auto_budget_minutes={budget_minutes}", "train.epochs=8"]
    )
    candidates = [Candidate("efficientnet-lite0", s, 0, "t") for s in ("partial", "full", "lp_ft")]
    decision = module.successive_halving(settings, None, candidates, False, lambda: now[0])
    assert [p.epochs for p in decision.pilots] == [epochs[2], epochs[0], epochs[1]]
    assert decision.budget_spent is spent
    assert decision.chosen.candidate.strategy == "full"
    # exposure is measured once, on the last round's pilots after their longest fine-tune
    assert measured == finalists
