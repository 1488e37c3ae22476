"""The label-kind seam: the single-label case's loss, activation, decision and metrics on
known values (what training, evaluation and the metrics ask it for)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.evaluation.metrics import INTERVAL_METRICS, predict_labels
from tasks.model.label_kind import SINGLE_LABEL


def test_the_loss_is_class_weighted_cross_entropy_on_logits() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p(1) = 0.75, then 0.5
    labels = torch.tensor([1, 0])
    plain = float(SINGLE_LABEL.loss()(logits, labels))
    assert plain == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)
    weighted = float(SINGLE_LABEL.loss(torch.tensor([1.0, 3.0]))(logits, labels))
    # weighted mean: (3 * -ln 0.75 + 1 * -ln 0.5) / (3 + 1)
    assert weighted == pytest.approx((3 * -math.log(0.75) - math.log(0.5)) / 4)
    summed = float(SINGLE_LABEL.loss(reduction="sum")(logits, labels))
    assert summed == pytest.approx(2 * plain)


def test_the_activation_is_a_softmax_with_temperature() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert SINGLE_LABEL.probabilities(logits).tolist()[0] == pytest.approx([0.25, 0.75])
    # T = 2 halves the logits: odds sqrt(3)
    cooled = SINGLE_LABEL.probabilities(logits, temperature=2.0)[0, 1].item()
    assert cooled == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)))


def test_the_decision_thresholds_two_classes_and_takes_the_top_of_more() -> None:
    binary = np.array([[0.7, 0.3], [0.4, 0.6]])
    assert SINGLE_LABEL.decide(binary, 0.25).tolist() == [1, 1]
    assert SINGLE_LABEL.decide(binary, 0.5).tolist() == [0, 1]
    three = np.array([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    assert SINGLE_LABEL.decide(three, 0.99).tolist() == [1, 0]
    assert predict_labels(binary, 0.5).tolist() == [0, 1]  # the metrics use the same rule
    assert SINGLE_LABEL.top_class(binary).tolist() == [0, 1]
    assert SINGLE_LABEL.confidence(three).tolist() == [0.5, 0.6]


def test_the_reported_metrics_are_the_label_kind_s() -> None:
    assert SINGLE_LABEL.metrics == INTERVAL_METRICS
    assert INTERVAL_METRICS == ("auc", "accuracy", "sensitivity", "specificity", "ece")


def test_with_no_threshold_two_classes_take_the_top_class() -> None:
    # the serving decision when no threshold was chosen (tasks.model.inference.decide)
    binary = np.array([[0.7, 0.3], [0.4, 0.6], [0.45, 0.55]])
    assert SINGLE_LABEL.decide(binary, None).tolist() == [0, 1, 1]
    assert SINGLE_LABEL.decide(binary, 0.6).tolist() == [0, 1, 0]


def test_logits_give_the_same_top_class_as_their_probabilities() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 4.0, 3.9], [0.0, 0.0, 1e-3]])
    from_logits = SINGLE_LABEL.top_class(logits.numpy())
    assert from_logits.tolist() == [0, 1, 2]
    assert (
        from_logits.tolist()
        == SINGLE_LABEL.top_class(SINGLE_LABEL.probabilities(logits).numpy()).tolist()
    )


def test_rescaling_probabilities_matches_the_softmax_of_scaled_logits() -> None:
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5]])
    cooled = SINGLE_LABEL.rescale(probabilities, 2.0)
    # T = 2: odds 3 become sqrt(3); an even row stays even
    assert cooled[0, 1] == pytest.approx(math.sqrt(3) / (1 + math.sqrt(3)))
    assert cooled[1].tolist() == [0.5, 0.5]
    logits = torch.tensor([[0.0, math.log(3.0)]])
    torch_cooled = SINGLE_LABEL.probabilities(logits, temperature=2.0).numpy()
    np.testing.assert_allclose(cooled[:1], torch_cooled, rtol=1e-6)
    assert SINGLE_LABEL.rescale(probabilities, 1.0).dtype == np.float32


def test_the_numpy_log_loss_is_the_negative_log_likelihood_at_a_temperature() -> None:
    log_p = np.log(np.array([[0.25, 0.75], [0.5, 0.5]]))
    labels = np.array([1, 0])
    plain = SINGLE_LABEL.log_loss(log_p, labels, 1.0)
    assert plain == pytest.approx(-(math.log(0.75) + math.log(0.5)) / 2)
    cooled = SINGLE_LABEL.log_loss(log_p, labels, 2.0)
    assert cooled == pytest.approx(
        -(math.log(math.sqrt(3) / (1 + math.sqrt(3))) + math.log(0.5)) / 2
    )
    # the same loss the training half uses, on the same values
    torch_loss = float(SINGLE_LABEL.loss()(torch.from_numpy(log_p), torch.from_numpy(labels)))
    assert plain == pytest.approx(torch_loss)
