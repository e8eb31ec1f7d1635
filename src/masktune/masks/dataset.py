"""The training set with masks applied: masked pixels set to a fill value in every channel, batch
by batch, in the geometry the masks were computed in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import ConfigError, MaskSetError
from .maskset import MaskSet

GEOMETRIES = ("aligned", "authors")


def stretch_masks(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize bool masks [..., h, w] to ``size`` by nearest neighbour (source pixel floor(i * h / H),
    as OpenCV's INTER_NEAREST, which the authors use)."""
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    return F.interpolate(flat, size=tuple(size), mode="nearest").view(*masks.shape[:-2], *size).bool()


class MaskedDataset(Dataset):
    """``base`` with ``masks`` applied on the fly: masked pixels are set to ``fill`` (on the raw [0, 1]
    scale) in every channel.

    ``base`` yields raw images (before normalisation) as tensors [C, H, W]; ``masks`` is a
    :class:`~masktune.MaskSet` or a bool tensor [N, H, W]. Random augmentation belongs after
    masking, on whole batches in the training loop (``TrainSettings.augment``), so a random crop
    moves the masked pixels with the image.
    ``geometry="aligned"`` (default): ``base`` yields the images the masks were computed on (the mask
    view, e.g. resized and centre-cropped), and sizes must match. ``geometry="authors"``: ``base``
    yields the raw images and each mask is stretched over the whole image (nearest neighbour), as
    the authors' code does; when the mask view was a crop, the mask then misses its target.
    """

    def __init__(self, base: Dataset, masks: MaskSet | torch.Tensor, *, fill: float = 0.0,
                 geometry: str = "aligned") -> None:
        if len(masks) != len(base):
            raise MaskSetError(f"{len(masks)} masks for a dataset of {len(base)} images; compute masks on this dataset")
        if geometry not in GEOMETRIES:
            raise ConfigError(f"unknown mask geometry {geometry!r}; choose one of: {', '.join(GEOMETRIES)}")
        self.base = base
        self.masks = masks
        self.fill = fill
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.base)

    def _apply(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.geometry == "authors":
            masks = stretch_masks(masks, images.shape[-2:])
        elif images.shape[-2:] != masks.shape[-2:]:
            raise MaskSetError(
                f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[-2:])}; "
                "masks must be computed in the geometry of the images they are applied to "
                "(or pass geometry='authors' to stretch them over the raw images)"
            )
        fill = round(self.fill * 255) if images.dtype == torch.uint8 else self.fill  # a uint8 batch: 0..255
        return images.masked_fill(masks.unsqueeze(-3), fill)

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
        masks = self.masks[indices]
        return [(self._apply(image, mask), *rest) for mask, (image, *rest) in zip(masks, batch)]
