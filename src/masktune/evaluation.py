"""Metrics: accuracy overall and per group (WILDS-style), BG-gap, and how well the masks hit the spurious feature."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from .masksets import MaskSet
from .training import labels_of, predict


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
    """:func:`group_metrics` of the predictions ``logits[name].argmax(1)`` on each named dataset."""
    return {name: group_metrics(logits[name].argmax(1), labels_of(dataset), getattr(dataset, "metadata", None),
                                train_group_counts=train_group_counts)
            for name, dataset in datasets.items()}


def evaluate(
    model: nn.Module, datasets: Mapping[str, Dataset], *, device: torch.device | str | None = None,
    batch_size: int = 512, train_group_counts: Mapping[str, int] | None = None,
) -> dict[str, dict]:
    """:func:`group_metrics` of ``model`` on each named dataset (groups from ``metadata["spurious"]``)."""
    logits = {name: predict(model, dataset, device=device, batch_size=batch_size) for name, dataset in datasets.items()}
    return evaluate_logits(logits, datasets, train_group_counts=train_group_counts)


def bg_gap(metrics: Mapping[str, dict]) -> dict[str, float]:
    """The Background Challenge's BG-gap: accuracy on ``mixed_same`` minus accuracy on ``mixed_rand``
    (how much the accuracy depends on the background carrying class information)."""
    return {"bg_gap": metrics["mixed_same"]["accuracy"] - metrics["mixed_rand"]["accuracy"]}


def _masked_counts(masks: MaskSet | torch.Tensor, region: torch.Tensor | None,
                   chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per image: the number of masked pixels, and of those inside ``region`` (one chunk of masks
    unpacked at a time)."""
    totals, insides = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    for start in range(0, len(masks), chunk):
        block = masks[start:start + chunk]
        totals.append(block.flatten(1).sum(1))
        if region is not None:
            insides.append((block & region).flatten(1).sum(1))
    return torch.cat(totals).float(), torch.cat(insides).float() if region is not None else None


def mask_diagnostics(masks: MaskSet | torch.Tensor, spurious: torch.Tensor | None = None,
                     region: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> dict[str, float]:
    """How much the masks hide, and how much of the spurious ``region`` [H, W] they cover.

    ``masks`` is a :class:`~masktune.MaskSet` or a bool tensor [N, H, W].
    ``masked_percent``: masked pixels over all pixels. With ``region`` and the per-image
    ``spurious`` flag, over the images that carry the feature: ``region_coverage_percent`` (mean
    share of the region's pixels masked), ``region_fully_covered_percent`` (images whose whole
    region is masked) and ``masked_inside_region_percent`` (share of their masked pixels that lie
    in the region). With ``labels`` too, the images that carry the feature are split into
    *aligned* ones (their label is the one the feature mostly comes with: the shortcut) and
    *conflicting* ones, and ``aligned_region_fully_covered_percent`` and
    ``conflicting_region_fully_covered_percent`` say how often each has its whole region masked.
    A model that uses the shortcut but recognises the conflicting images by other features should
    mask the region on the aligned images only.
    """
    has_feature = region is not None and spurious is not None and bool(spurious.any())
    per_image, inside_all = _masked_counts(masks, region if has_feature else None)
    result = {
        "masked_percent": 100.0 * per_image.mean().item() / (masks.shape[-2] * masks.shape[-1]),
        "masked_pixels_per_image": per_image.mean().item(),
    }
    if not has_feature:
        return result
    carried = spurious.bool()
    inside = inside_all[carried]
    masked = per_image[carried]
    full = inside == region.sum()
    result["region_coverage_percent"] = 100.0 * (inside / region.sum()).mean().item()
    result["region_fully_covered_percent"] = 100.0 * full.float().mean().item()
    result["masked_inside_region_percent"] = 100.0 * inside.sum().item() / max(masked.sum().item(), 1.0)
    if labels is not None:
        carried_labels = labels[carried]
        aligned = carried_labels == carried_labels.mode().values
        for name, share in (("aligned", aligned), ("conflicting", ~aligned)):
            if share.any():
                result[f"{name}_region_fully_covered_percent"] = 100.0 * full[share].float().mean().item()
    return result
