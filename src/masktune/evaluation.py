"""Metrics: accuracy overall and per group, and how well the masks hit the spurious feature."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from .training import labels_of, predict


def group_metrics(predictions: torch.Tensor, labels: torch.Tensor, spurious: torch.Tensor | None = None) -> dict:
    """Accuracy (%) overall and per group (label x spurious flag), with counts.

    ``predictions`` and ``labels`` are class indices [N]; ``spurious`` a bool flag [N] per sample
    (e.g. "carries the square"). Groups without samples are left out; the worst-group accuracy is
    the minimum over the groups present.
    """
    correct = (predictions == labels).float()
    result: dict = {"accuracy": 100.0 * correct.mean().item(), "count": len(labels)}
    if spurious is None:
        return result
    groups = {}
    for y in labels.unique().tolist():
        for s in (0, 1):
            members = (labels == y) & (spurious.long() == s)
            if members.any():
                groups[f"y={y},spurious={s}"] = {
                    "accuracy": 100.0 * correct[members].mean().item(),
                    "count": int(members.sum()),
                }
    result["groups"] = groups
    result["worst_group_accuracy"] = min(g["accuracy"] for g in groups.values())
    return result


def evaluate(
    model: nn.Module, datasets: Mapping[str, Dataset], *, device: torch.device | str | None = None,
    batch_size: int = 512,
) -> dict[str, dict]:
    """:func:`group_metrics` of ``model`` on each named dataset (groups from ``metadata["spurious"]``)."""
    results = {}
    for name, dataset in datasets.items():
        predictions = predict(model, dataset, device=device, batch_size=batch_size).argmax(1)
        spurious = getattr(dataset, "metadata", {}).get("spurious")
        results[name] = group_metrics(predictions, labels_of(dataset), spurious)
    return results


def mask_diagnostics(masks: torch.Tensor, spurious: torch.Tensor | None = None,
                     region: torch.Tensor | None = None) -> dict[str, float]:
    """How much the masks hide, and how much of the spurious ``region`` [H, W] they cover.

    ``masked_percent``: masked pixels over all pixels. With ``region`` and the per-image
    ``spurious`` flag, over the images that carry the feature: ``region_coverage_percent`` (mean
    share of the region's pixels masked), ``region_fully_covered_percent`` (images whose whole
    region is masked) and ``masked_inside_region_percent`` (share of their masked pixels that lie
    in the region).
    """
    per_image = masks.flatten(1).sum(1).float()
    result = {
        "masked_percent": 100.0 * per_image.mean().item() / masks[0].numel(),
        "masked_pixels_per_image": per_image.mean().item(),
    }
    if region is None or spurious is None or not spurious.any():
        return result
    carried = masks[spurious.bool()]
    inside = (carried & region).flatten(1).sum(1).float()
    masked = carried.flatten(1).sum(1).float()
    result["region_coverage_percent"] = 100.0 * (inside / region.sum()).mean().item()
    result["region_fully_covered_percent"] = 100.0 * (inside == region.sum()).float().mean().item()
    result["masked_inside_region_percent"] = 100.0 * inside.sum().item() / max(masked.sum().item(), 1.0)
    return result
