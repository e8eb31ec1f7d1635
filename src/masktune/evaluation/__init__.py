"""Evaluation: accuracy per test set and group, mask diagnostics, and selective classification."""

from .diagnostics import mask_diagnostics
from .leakage import guarded_mixing, mask_leakage
from .metrics import bg_gap, evaluate, evaluate_logits, group_counts, group_metrics
from .selective import COVERAGES, selective_classification

__all__ = ["COVERAGES", "bg_gap", "evaluate", "evaluate_logits", "group_counts", "group_metrics", "guarded_mixing", "mask_diagnostics", "mask_leakage",
           "selective_classification"]
