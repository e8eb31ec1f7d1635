"""The training set with masks applied: masked pixels set to a fill value in every channel, batch
by batch, in the geometry the masks were computed in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.base import labels_of
from ..data.loader import make_loader, to_device
from ..errors import ConfigError, MaskSetError
from .maskset import MaskSet

GEOMETRIES = ("aligned", "authors")
FILLS = ("zero", "mean", "random-image")
MIXINGS = ("own", "own+other-class")


def stretch_masks(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize bool masks [..., h, w] to ``size`` by nearest neighbour (source pixel floor(i * h / H),
    as OpenCV's INTER_NEAREST, which the authors use)."""
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    return F.interpolate(flat, size=tuple(size), mode="nearest").view(*masks.shape[:-2], *size).bool()


def mean_image(dataset: Dataset, batch_size: int = 1024) -> torch.Tensor:
    """The per-pixel mean of ``dataset``'s images, float ``[C, H, W]`` in [0, 1] (one pass)."""
    total, count = None, 0
    for images, *_ in make_loader(dataset, batch_size):
        images = to_device(images, "cpu").double()
        total = images.sum(0) if total is None else total + images.sum(0)
        count += len(images)
    if total is None:
        raise ConfigError("the per-pixel mean fill needs a non-empty dataset")
    return (total / count).float()


class MaskedDataset(Dataset):
    """``base`` with ``masks`` applied on the fly: masked pixels are replaced in every channel.

    ``base`` yields raw images (before normalisation) as tensors [C, H, W]; ``masks`` is a
    :class:`~masktune.MaskSet` or a bool tensor [N, H, W]. Random augmentation belongs after
    masking, on whole batches in the training loop (``TrainSettings.augment``), so a random crop
    moves the masked pixels with the image (with every fill below).

    ``fill`` is what masked pixels become: a number on the raw [0, 1] scale (``0.0``, the paper's
    zeros, is the default; ``"zero"`` means the same), ``"mean"`` (the dataset's per-pixel mean
    image) or ``"random-image"`` (the same pixels of another training image drawn at random, any
    class). ``mixing="own+other-class"`` masks each image with its own mask and the mask of a
    random image of another class, so that where masks lie says nothing about the class. Random
    draws use torch's global generator (a seeded run replays them).

    ``geometry="aligned"`` (default): ``base`` yields the images the masks were computed on (the mask
    view, e.g. resized and centre-cropped), and sizes must match. ``geometry="authors"``: ``base``
    yields the raw images and each mask is stretched over the whole image (nearest neighbour), as
    the authors' code does; when the mask view was a crop, the mask then misses its target.
    """

    def __init__(self, base: Dataset, masks: MaskSet | torch.Tensor, *, fill: float | str = 0.0,
                 mixing: str = "own", geometry: str = "aligned") -> None:
        if len(masks) != len(base):
            raise MaskSetError(f"{len(masks)} masks for a dataset of {len(base)} images; compute masks on this dataset")
        if geometry not in GEOMETRIES:
            raise ConfigError(f"unknown mask geometry {geometry!r}; choose one of: {', '.join(GEOMETRIES)}")
        self.check_options(fill, mixing)
        if geometry == "authors" and fill in ("mean", "random-image"):
            raise ConfigError(f"fill {fill!r} needs images of one size: use geometry='aligned'")
        self.base = base
        self.masks = masks
        self.fill = 0.0 if fill == "zero" else fill
        self.fill_image = mean_image(base) if fill == "mean" else None
        self.mixing = mixing
        self.geometry = geometry
        if mixing != "own":
            labels = labels_of(base)
            self.labels = labels
            self._others = {int(c): (labels != c).nonzero().flatten() for c in labels.unique()}

    @staticmethod
    def check_options(fill: float | str, mixing: str) -> None:
        """Refuse an unknown ``fill`` or ``mixing``."""
        if isinstance(fill, str) and fill not in FILLS:
            raise ConfigError(f"unknown mask fill {fill!r}; choose a number in [0, 1] or one of: {', '.join(FILLS)}")
        if mixing not in MIXINGS:
            raise ConfigError(f"unknown mask mixing {mixing!r}; choose one of: {', '.join(MIXINGS)}")

    def __len__(self) -> int:
        return len(self.base)

    def applied_masks(self, indices: list[int] | torch.Tensor) -> torch.Tensor:
        """The masks applied to the images at ``indices`` [B, H, W]: their own, and with
        ``mixing="own+other-class"`` also those of random images of other classes (a new draw)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        masks = self.masks[indices]
        if self.mixing == "own":
            return masks
        partners = torch.empty_like(indices)
        labels = self.labels[indices]
        for c, pool in self._others.items():
            members = labels == c
            if members.any() and len(pool):
                partners[members] = pool[torch.randint(len(pool), (int(members.sum()),))]
            elif members.any():
                partners[members] = indices[members]  # a single class: no other class to borrow from
        return masks | self.masks[partners]

    def _read(self, indices: torch.Tensor) -> torch.Tensor:
        getitems = getattr(self.base, "__getitems__", None)
        batch = getitems(indices.tolist()) if getitems is not None else [self.base[int(i)] for i in indices]
        return batch[0] if isinstance(batch, tuple) else torch.stack([sample[0] for sample in batch])

    def _apply(self, images: torch.Tensor, indices: list[int]) -> torch.Tensor:
        masks = self.applied_masks(indices)
        if self.geometry == "authors":
            masks = stretch_masks(masks, images.shape[-2:])
        elif images.shape[-2:] != masks.shape[-2:]:
            raise MaskSetError(
                f"mask size {tuple(masks.shape[-2:])} differs from image size {tuple(images.shape[-2:])}; "
                "masks must be computed in the geometry of the images they are applied to "
                "(or pass geometry='authors' to stretch them over the raw images)"
            )
        where = masks.unsqueeze(-3)
        if self.fill == "random-image":
            donors = self._read(torch.randint(len(self.base), (len(images),)))
            return torch.where(where, donors.to(images.dtype), images)
        if self.fill_image is not None:
            fill = self.fill_image if images.dtype != torch.uint8 else (self.fill_image * 255).round().to(torch.uint8)
            return torch.where(where, fill, images)
        fill = round(self.fill * 255) if images.dtype == torch.uint8 else self.fill  # a uint8 batch: 0..255
        return images.masked_fill(where, fill)

    def __getitem__(self, index: int) -> tuple:
        image, *rest = self.base[index]
        return (self._apply(image.unsqueeze(0), [index])[0], *rest)

    def __getitems__(self, indices: list[int]) -> tuple | list:
        """A batch: batched tensors when ``base`` serves batches, else a list of samples."""
        getitems = getattr(self.base, "__getitems__", None)
        batch = getitems(indices) if getitems is not None else [self.base[i] for i in indices]
        if isinstance(batch, tuple):
            images, *rest = batch
            return (self._apply(images, indices), *rest)
        return [(self._apply(image.unsqueeze(0), [i])[0], *rest) for i, (image, *rest) in zip(indices, batch)]
