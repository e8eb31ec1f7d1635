import math

import numpy as np
import pytest
import torch

from masktune.evaluation.selective import masktune_probabilities, risk_coverage_curve, selective_classification, selective_risk

# validation confidences (40 - i) / 64 for i = 0..19: exact in binary, so thresholds are exact
VAL = torch.tensor([(40 - i) / 64 for i in range(20)], dtype=torch.float64)
TEST = torch.tensor([30, 24, 24, 23, 22, 21, 20], dtype=torch.float64) / 64
CORRECT = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)


def test_authors_rule_hand_computed_with_ties_and_full_coverage():
    result = selective_risk(VAL[torch.randperm(20)], TEST, CORRECT)
    # threshold index round(c * 20): 16, 17, 18, 19 and min(20, 19) = 19 at 100%
    expected = {"80": (24, 3, 1), "85": (23, 4, 1), "90": (22, 5, 2), "95": (21, 6, 2), "100": (21, 6, 2)}
    assert list(result["error_at_coverage"]) == list(expected)
    for key, (threshold, accepted, errors) in expected.items():
        got = result["error_at_coverage"][key]
        assert got["threshold"] == threshold / 64
        assert got["accepted"] == accepted  # both test inputs tied at 24/64 are accepted together
        assert got["coverage"] == pytest.approx(100 * accepted / 7)
        assert got["error"] == pytest.approx(100 * errors / accepted)
    # at 100% the lowest test confidence (20/64) is below every validation confidence: rejected
    assert result["error_at_coverage"]["100"]["coverage"] < 100


def test_risk_coverage_curve_hand_computed():
    coverage, risk, area = risk_coverage_curve(TEST, CORRECT)
    # one point per distinct confidence: 30 | 24 24 | 23 | 22 | 21 | 20
    assert coverage == pytest.approx([100 * k / 7 for k in (1, 3, 4, 5, 6, 7)])
    assert risk == pytest.approx([0, 100 / 3, 25, 40, 100 / 3, 100 * 2 / 7])
    steps = [1 / 7, 2 / 7, 1 / 7, 1 / 7, 1 / 7, 1 / 7]
    assert area == pytest.approx(sum(r * s for r, s in zip([0, 100 / 3, 25, 40, 100 / 3, 100 * 2 / 7], steps)))
    result = selective_risk(VAL, TEST, CORRECT)
    assert result["coverage"] == coverage and result["risk"] == risk and result["aurc"] == area


def test_aurc_without_ties_is_the_mean_risk_over_acceptance_steps():
    rng = np.random.default_rng(0)
    confidence = rng.random(200)
    correct = rng.random(200) < 0.7
    _, risk, area = risk_coverage_curve(torch.from_numpy(confidence), torch.from_numpy(correct))
    order = np.argsort(-confidence)
    brute = [100 * (~correct[order[: k + 1]]).mean() for k in range(200)]
    assert risk == pytest.approx(brute)
    assert area == pytest.approx(np.mean(brute))


def test_no_accepted_input_gives_no_error_figure():
    result = selective_risk(torch.ones(5), torch.full((4,), 0.5), torch.ones(4, dtype=torch.bool), coverages=(90,))
    assert result["error_at_coverage"]["90"] == {"threshold": 1.0, "coverage": 0.0, "error": None, "accepted": 0}
    assert math.isnan(risk_coverage_curve(torch.zeros(0), torch.zeros(0, dtype=torch.bool))[2])


def test_masktune_rule_combines_both_models():
    erm = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
    tuned = torch.tensor([[0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])

    def softmax(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    want = softmax(softmax(erm.numpy().astype(float)) * softmax(tuned.numpy().astype(float)))
    assert masktune_probabilities(erm, tuned).numpy() == pytest.approx(want)

    labels = torch.tensor([0, 1])
    results = selective_classification(erm, tuned, erm, tuned, labels, coverages=(100,))
    assert set(results) == {"erm", "masktune"}
    # ERM alone predicts [0, 1]: both right; the combined rule predicts argmax of `want`
    assert results["erm"]["error_at_coverage"]["100"]["error"] == 0.0
    combined_correct = (want.argmax(1) == labels.numpy()).mean()
    assert results["masktune"]["error_at_coverage"]["100"]["error"] == pytest.approx(100 * (1 - combined_correct))
