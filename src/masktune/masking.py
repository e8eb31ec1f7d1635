"""Masks: the mean + k*std rule, masks for a whole dataset, RandMask, and a dataset that applies them."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .models import resolve_cam_layer
from .saliency import CAM, saliency_maps
from .training import first_batch, make_loader, model_device


def threshold_masks(heatmaps: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """MaskTune's rule: mask pixels hotter than mean + k*std of the image's strictly positive heat.

    ``heatmaps`` is [B, H, W]; the std is the population std; an image with no positive heat gets
    an empty mask. Returns a bool tensor of the same shape (True = masked).
    """
    heat = heatmaps.double()
    positive = heat > 0
    count = positive.sum((-2, -1), keepdim=True)
    denom = count.clamp(min=1)
    mean = torch.where(positive, heat, 0).sum((-2, -1), keepdim=True) / denom
    var = torch.where(positive, (heat - mean) ** 2, 0).sum((-2, -1), keepdim=True) / denom
    return (heat > mean + k * var.sqrt()) & (count > 0)


def compute_masks(
    model: nn.Module,
    dataset: Dataset,
    layer: str | nn.Module | None = None,
    *,
    method: str | CAM = "xgradcam",
    k: float = 2.0,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> torch.Tensor:
    """Saliency masks of every image of ``dataset`` for the model's predicted class.

    The dataset yields ``(image, label, ...)`` with images [C, H, W]; the model runs in eval mode on
    ``device`` (default: the model's). Returns a bool tensor [N, H, W] on the CPU (True = masked).
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    _, cam_layer = resolve_cam_layer(model, layer, first_batch(dataset, device))
    masks = []
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device)
    for images, *_ in tqdm(loader, desc="masking", unit="batch", disable=not progress, leave=False):
        heat, _ = saliency_maps(model, images.to(device, non_blocking=True), cam_layer, method=method)
        masks.append(threshold_masks(heat, k).cpu())
    return torch.cat(masks)


def random_square_masks(
    n: int, height: int, width: int, *, min_side: int = 2, max_side: int = 14, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandMask: one square per image, side uniform in [min_side, max_side], centre uniform over the
    image, clipped at the border. Returns bool [n, height, width]."""
    side = torch.randint(min_side, max_side + 1, (n, 1), generator=generator)
    top = torch.randint(0, height, (n, 1), generator=generator) - side // 2
    left = torch.randint(0, width, (n, 1), generator=generator) - side // 2
    rows = torch.arange(height)
    cols = torch.arange(width)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    return in_rows[:, :, None] & in_cols[:, None, :]


class MaskedDataset(Dataset):
    """``base`` with ``masks`` applied on the fly: masked pixels are set to ``fill`` in every channel.

    ``base`` must yield raw images (before normalisation) as tensors [C, H, W] with the same height
    and width as the masks; ``transform`` (e.g. normalisation, augmentation) runs after masking.
    """

    def __init__(self, base: Dataset, masks: torch.Tensor, *, fill: float = 0.0, transform: Any = None) -> None:
        if len(masks) != len(base):
            raise ValueError(f"{len(masks)} masks for a dataset of {len(base)} images; compute masks on this dataset")
        self.base = base
        self.masks = masks
        self.fill = fill
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)

    def _apply(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(
                f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[-2:])}; "
                "masks must be computed in the geometry of the images they are applied to"
            )
        masked = images.masked_fill(masks.unsqueeze(-3), self.fill)
        return self.transform(masked) if self.transform is not None else masked

    def __getitem__(self, index: int) -> tuple:
        image, *rest = self.base[index]
        return (self._apply(image, self.masks[index]), *rest)

    def __getitems__(self, indices: list[int]) -> tuple | list:
        """A batch: batched tensors when ``base`` serves batches, else a list of samples."""
        getitems = getattr(self.base, "__getitems__", None)
        batch = getitems(indices) if getitems is not None else [self.base[i] for i in indices]
        if isinstance(batch, tuple):
            images, *rest = batch
            return (self._apply(images, self.masks[indices]), *rest)
        return [(self._apply(image, self.masks[i]), *rest) for i, (image, *rest) in zip(indices, batch)]
