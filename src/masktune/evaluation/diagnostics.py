"""Mask diagnostics: how much of the image the masks hide, and how well they cover a known spurious
feature (on the images that carry it, split by whether their label is the one it points to)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.loader import first_batch, make_loader, to_device
from ..masks.compute import prepare_masking
from ..masks.maskset import MaskSet
from ..saliency import CAM, saliency_maps
from .leakage import mask_leakage


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
                     region: torch.Tensor | None = None, labels: torch.Tensor | None = None, *,
                     dataset: Dataset | None = None, fill: float = 0.0) -> dict[str, float]:
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
    mask the region on the aligned images only. With ``dataset`` (the unmasked images the masks
    belong to), ``leakage_percent`` is :func:`~masktune.evaluation.leakage.mask_leakage`'s score in
    percent: how much of a class's masked pixels are a mark (the ``fill`` where the other classes do
    not have it) that tells the classes apart.
    """
    has_feature = region is not None and spurious is not None and bool(spurious.any())
    per_image, inside_all = _masked_counts(masks, region if has_feature else None)
    result = {
        "masked_percent": 100.0 * per_image.mean().item() / (masks.shape[-2] * masks.shape[-1]),
        "masked_pixels_per_image": per_image.mean().item(),
    }
    if dataset is not None:
        result["leakage_percent"] = 100.0 * mask_leakage(dataset, masks, fill=fill)["score"]
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


LOW_HEAT = 20.0  # % of the heat: below it the masks hide little of what the model looks at


def heat_verdict(percent: float) -> str:
    """The plain-language reading of :func:`heat_removed`'s share."""
    if percent < LOW_HEAT:
        return (f"the masks cover only {percent:.0f}% of the ERM model's heat: what it relies on is larger or more "
                "spread out than the masks (a large or diffuse cue?), so masking can remove only part of it")
    return f"the masks cover {percent:.0f}% of the ERM model's heat"


def heat_shares(model: nn.Module, dataset: Dataset, cover: MaskSet | torch.Tensor, layer: str | None = None, *,
                method: str | CAM = "xgradcam", device: torch.device | str | None = None,
                batch_size: int = 256) -> torch.Tensor:
    """The share (%) of each image's heat mass (``method``'s map for the predicted class, the map
    masks are made from) inside ``cover``: one region [H, W] for every image, or a mask per image
    ([N, H, W] or a :class:`MaskSet`). Returns a CPU tensor [N]."""
    masker = prepare_masking(model, first_batch(dataset, "cpu"), layer, method=method, device=device)
    shares, start = [], 0
    for images, *_ in make_loader(dataset, batch_size):
        images = to_device(images, masker.device).contiguous(memory_format=masker.memory_format)
        heat, _ = saliency_maps(masker.model, images, masker.cam_layer, method=masker.method)
        inside = cover if cover.dim() == 2 else cover[start:start + len(images)]
        start += len(images)
        shares.append(((heat * inside.to(heat.device)).sum((1, 2)) / heat.sum((1, 2)).clamp_min(1e-12)).cpu())
    return 100.0 * torch.cat(shares)


def heat_removed(model: nn.Module, dataset: Dataset, masks: MaskSet | torch.Tensor, layer: str | None = None, *,
                 method: str | CAM = "xgradcam", device: torch.device | str | None = None, limit: int = 2048,
                 batch_size: int = 256) -> float:
    """The share (%) of each image's heat mass that its mask covers (:func:`heat_shares`), averaged
    over the first ``limit`` images of ``dataset``. Low values say the masks hide little of what the
    model looks at: a cue larger than the masks, or one spread thinly over the image."""
    n = min(limit, len(dataset))
    return heat_shares(model, Subset(dataset, range(n)), masks[:n], layer, method=method, device=device,
                       batch_size=batch_size).mean().item()
