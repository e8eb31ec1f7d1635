"""Metrics of predictions: accuracy overall and per group (WILDS-style ``eval(y_pred, y_true,
metadata)``), and the Background Challenge's BG-gap.

Group metrics need per-sample groups: a dataset gives them as ``metadata["spurious"]`` (a tensor
with one value per sample), and the groups are (label, spurious value). A dataset without it gets
plain accuracy only, and its result says so under ``"groups_unavailable"``.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.base import labels_of
from ..training import predict

NO_GROUPS = ("the dataset has no metadata['spurious'] (one value per sample), so there are no groups and no "
             "worst-group accuracy; give the dataset a metadata dict holding that tensor")


def _spurious(metadata: Mapping[str, torch.Tensor] | torch.Tensor | None) -> torch.Tensor | None:
    if metadata is None or isinstance(metadata, torch.Tensor):
        return metadata
    return metadata.get("spurious")


def _groups(labels: torch.Tensor, spurious: torch.Tensor) -> tuple[list[str], torch.Tensor]:
    """Names of the groups (label, spurious value) present, in sorted order, and each sample's group."""
    pairs, inverse = torch.unique(torch.stack([labels.long(), spurious.long()], 1), dim=0, return_inverse=True)
    return [f"y={y},spurious={s}" for y, s in pairs.tolist()], inverse


def _group_order(name: str) -> tuple[int, ...]:
    return tuple(int(part.split("=")[1]) for part in name.split(","))


def group_counts(labels: torch.Tensor, metadata: Mapping[str, torch.Tensor] | torch.Tensor | None) -> dict[str, int]:
    """Samples per group (label x ``metadata["spurious"]``), e.g. of the training set; {} without groups."""
    spurious = _spurious(metadata)
    if spurious is None:
        return {}
    names, inverse = _groups(labels, spurious)
    return dict(zip(names, torch.bincount(inverse, minlength=len(names)).tolist()))


def group_metrics(
    predictions: torch.Tensor, labels: torch.Tensor, metadata: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    *, train_group_counts: Mapping[str, int] | None = None,
) -> dict:
    """Metrics of predictions against labels, WILDS-style (``eval(y_pred, y_true, metadata)``); accuracies in %.

    ``predictions`` and ``labels`` are class indices [N]; ``metadata`` holds per-sample tensors, of
    which ``"spurious"`` (or a tensor given directly) defines the groups as (label, spurious value).
    Returns ``accuracy`` (plain test accuracy, what the authors' code prints) and ``count``; with
    groups also ``groups`` (accuracy and count of each group with test samples) and
    ``worst_group_accuracy`` (their minimum). With ``train_group_counts`` (see :func:`group_counts`),
    ``empty_groups`` lists the training groups without test samples, and ``train_weighted_accuracy``
    is the average of the group accuracies weighted by the training group proportions (the GroupDRO /
    JTT / DFR / WILDS convention); it is None when a training group has no test samples (its
    accuracy, and so the average, is undefined).
    """
    correct = predictions == labels
    result: dict = {"accuracy": 100.0 * correct.double().mean().item(), "count": len(labels)}
    spurious = _spurious(metadata)
    if spurious is None:
        return result
    names, inverse = _groups(labels, spurious)
    counts = torch.bincount(inverse, minlength=len(names)).tolist()
    hits = torch.bincount(inverse, weights=correct.double(), minlength=len(names)).tolist()
    result["groups"] = {name: {"accuracy": 100.0 * h / n, "count": n} for name, h, n in zip(names, hits, counts)}
    present = {name: g["accuracy"] for name, g in result["groups"].items()}
    result["worst_group_accuracy"] = min(present.values()) if present else None
    if train_group_counts is not None:
        result["empty_groups"] = sorted(set(train_group_counts) - set(present), key=_group_order)
        total = sum(train_group_counts.get(name, 0) for name in present)
        result["train_weighted_accuracy"] = (
            sum(acc * train_group_counts.get(name, 0) for name, acc in present.items()) / total
            if total and not result["empty_groups"] else None)
    return result


def evaluate_logits(
    logits: Mapping[str, torch.Tensor], datasets: Mapping[str, Dataset], *,
    train_group_counts: Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """:func:`group_metrics` of the predictions ``logits[name].argmax(1)`` on each named dataset; the
    result of a dataset without groups holds ``"groups_unavailable"`` (the reason and the fix)."""
    results = {}
    for name, dataset in datasets.items():
        metadata = getattr(dataset, "metadata", None)
        results[name] = group_metrics(logits[name].argmax(1), labels_of(dataset), metadata,
                                      train_group_counts=train_group_counts)
        if _spurious(metadata) is None:
            results[name]["groups_unavailable"] = NO_GROUPS
    return results


def evaluate(
    model: nn.Module, datasets: Mapping[str, Dataset], *, device: torch.device | str | None = None,
    batch_size: int = 512, train_group_counts: Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """:func:`evaluate_logits` of ``model`` (run on ``device``, default: where it is) on each named
    dataset: plain accuracy, and group metrics where the dataset has ``metadata["spurious"]``."""
    logits = {name: predict(model, dataset, device=device, batch_size=batch_size) for name, dataset in datasets.items()}
    return evaluate_logits(logits, datasets, train_group_counts=train_group_counts)


def bg_gap(metrics: Mapping[str, dict]) -> dict[str, float]:
    """The Background Challenge's BG-gap: accuracy on ``mixed_same`` minus accuracy on ``mixed_rand``
    (how much the accuracy depends on the background carrying class information)."""
    return {"bg_gap": metrics["mixed_same"]["accuracy"] - metrics["mixed_rand"]["accuracy"]}
