"""Selective classification: abstain on low-confidence inputs (SPEC.md section 3).

The authors' decision rule scores an input with ``p = softmax(softmax(z_erm) * softmax(z_masktune))``,
predicts ``argmax p`` with confidence ``max p``, and sets the threshold for a target coverage ``c``
from the *validation* confidences sorted in descending order: the one at index
``min(round(c * N_val), N_val - 1)``. Test inputs with confidence >= threshold are accepted; the
realised coverage and the error on the accepted inputs are reported. ERM alone uses
``softmax(z_erm)`` in the same rule. All figures are percentages.
"""

from __future__ import annotations

from typing import Sequence

import torch

COVERAGES = (80.0, 85.0, 90.0, 95.0, 100.0)


def masktune_probabilities(erm_logits: torch.Tensor, masktune_logits: torch.Tensor) -> torch.Tensor:
    """The authors' combined score ``softmax(softmax(z_erm) * softmax(z_masktune))``, [N, classes]."""
    return torch.softmax(torch.softmax(erm_logits.double(), 1) * torch.softmax(masktune_logits.double(), 1), 1)


def risk_coverage_curve(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[list[float], list[float], float]:
    """The risk-coverage curve and its area (AURC), in percent.

    Inputs are accepted in descending order of confidence; inputs with equal confidence are accepted
    together, so the curve has one point per distinct confidence value: the coverage (share
    accepted) and the risk (error among the accepted). The area is the step integral
    ``sum(risk_i * (coverage_i - coverage_{i-1}))`` with coverage as a fraction, i.e. the risk
    averaged over coverage (with no ties, the mean of the risk after each accepted input).
    """
    if len(confidence) == 0:
        return [], [], float("nan")
    order = torch.argsort(confidence, descending=True, stable=True)
    sorted_confidence = confidence[order]
    errors = torch.cumsum((~correct.bool()[order]).double(), 0)
    accepted = torch.arange(1, len(confidence) + 1, dtype=torch.float64)
    last_of_tie = torch.ones(len(confidence), dtype=torch.bool)
    last_of_tie[:-1] = sorted_confidence[:-1] != sorted_confidence[1:]
    coverage = accepted[last_of_tie] / len(confidence)
    risk = errors[last_of_tie] / accepted[last_of_tie]
    area = (risk * torch.diff(coverage, prepend=coverage.new_zeros(1))).sum().item()
    return (100 * coverage).tolist(), (100 * risk).tolist(), 100 * area


def selective_risk(val_confidence: torch.Tensor, test_confidence: torch.Tensor, test_correct: torch.Tensor,
                   coverages: Sequence[float] = COVERAGES) -> dict:
    """The authors' rule at each target coverage (in percent), plus the test risk-coverage curve.

    Returns ``{"coverage": [...], "risk": [...], "aurc": float, "error_at_coverage": {"80": {...}}}``;
    each entry of ``error_at_coverage`` holds the ``threshold``, the realised ``coverage``, the
    ``error`` on the accepted inputs (None if none is accepted) and the number ``accepted``.
    """
    if len(val_confidence) == 0:
        raise ValueError("selective classification needs a non-empty validation set to set its thresholds")
    ranked = torch.sort(val_confidence, descending=True).values
    correct = test_correct.bool()
    at_coverage = {}
    for target in coverages:
        threshold = ranked[min(round(target / 100 * len(ranked)), len(ranked) - 1)]
        accepted = test_confidence >= threshold
        n = int(accepted.sum())
        at_coverage[f"{target:g}"] = {
            "threshold": threshold.item(),
            "coverage": 100.0 * n / max(len(test_confidence), 1),
            "error": 100.0 * (1 - correct[accepted].double().mean().item()) if n else None,
            "accepted": n,
        }
    coverage, risk, area = risk_coverage_curve(test_confidence, correct)
    return {"coverage": coverage, "risk": risk, "aurc": area, "error_at_coverage": at_coverage}


def selective_classification(
    erm_val: torch.Tensor, masktune_val: torch.Tensor, erm_test: torch.Tensor, masktune_test: torch.Tensor,
    test_labels: torch.Tensor, coverages: Sequence[float] = COVERAGES,
) -> dict[str, dict]:
    """:func:`selective_risk` for ERM alone (``"erm"``) and for the authors' MaskTune rule
    (``"masktune"``), from the logits of both models on the validation and the test set."""
    results = {}
    for method, val, test in (("erm", torch.softmax(erm_val.double(), 1), torch.softmax(erm_test.double(), 1)),
                              ("masktune", masktune_probabilities(erm_val, masktune_val),
                               masktune_probabilities(erm_test, masktune_test))):
        confidence, prediction = test.max(1)
        results[method] = selective_risk(val.max(1).values, confidence, prediction == test_labels, coverages)
    return results
