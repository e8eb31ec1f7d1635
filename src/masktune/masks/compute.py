"""Masks of a whole dataset: MaskTune's saliency masks, streamed batch by batch and bit-packed, and
RandMask's random squares (the paper's ablation)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..data.loader import first_batch, make_loader, to_device
from ..models import fastest_memory_format, fold_batchnorm, place, resolve_cam_layer
from ..saliency import CAM, get_method, saliency_maps
from .maskset import MaskSet, model_fingerprint, pack_bits
from .rules import MaskRule, make_rule


@dataclass
class Masker:
    """A model prepared for masking (see :func:`prepare_masking`); call it on a dataset for its masks.

    Prepared once, it streams any number of datasets (e.g. the chunks of a large training set)
    without repeating the CAM-layer lookup, the BatchNorm folding, the memory-format probe or the
    model's fingerprint.
    """

    model: nn.Module  # the eval-mode copy with BatchNorm folded in (the same maps, faster)
    layer_name: str
    cam_layer: nn.Module
    method: CAM
    rule: MaskRule
    device: torch.device
    memory_format: torch.memory_format
    meta: dict[str, str]
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    precision: str = "auto"

    def __call__(self, dataset: Dataset, *, batch_size: int = 512, num_workers: int | None = None,
                 progress: bool = True) -> MaskSet:
        """The masks of every image of ``dataset``, bit-packed (one batch of activations alive at a time)."""
        packed = []
        loader = make_loader(dataset, batch_size, num_workers=num_workers, device=self.device)
        for images, *_ in tqdm(loader, desc="masking", unit="batch", disable=not progress, leave=False):
            images = to_device(images, self.device)
            images = (self.preprocess(images) if self.preprocess else images).contiguous(
                memory_format=self.memory_format)
            heat, _ = saliency_maps(self.model, images, self.cam_layer, method=self.method, precision=self.precision)
            packed.append(pack_bits(self.rule(heat)).cpu())
        height, width = first_batch(dataset, "cpu").shape[-2:]
        return MaskSet(torch.cat(packed), height, width, self.meta)


def prepare_masking(
    model: nn.Module,
    example: torch.Tensor,
    layer: str | nn.Module | None = None,
    *,
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    device: torch.device | str | None = None,
    precision: str = "auto",
) -> Masker:
    """``model`` prepared to mask datasets whose images look like ``example`` (a batch, e.g. of one).

    The model is put on ``device`` (default: where it is); the maps come from an eval-mode copy made
    by :func:`~masktune.models.fold_batchnorm`, fed channels-last images when it accepts them (both
    only for speed). ``preprocess`` runs on each batch on the device before the model (e.g.
    normalisation; it must not move pixels).
    """
    device = place(model, device)
    cam, rule = get_method(method), make_rule(rule)
    example = example.to(device)
    example = preprocess(example) if preprocess else example
    layer_name, _ = resolve_cam_layer(model, layer, example, device=device)
    folded = fold_batchnorm(model, keep=layer_name)
    meta = {"cam_method": cam.name, "layer": layer_name, "rule": repr(rule), "model_fingerprint": model_fingerprint(model)}
    return Masker(folded, layer_name, folded.get_submodule(layer_name), cam, rule, device,
                  fastest_memory_format(folded, example), meta, preprocess, precision)


def compute_masks(
    model: nn.Module,
    dataset: Dataset,
    layer: str | nn.Module | None = None,
    *,
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    num_workers: int | None = None,
    precision: str = "auto",
    progress: bool = True,
) -> MaskSet:
    """Saliency masks of every image of ``dataset`` for the model's predicted class, bit-packed.

    The dataset yields ``(image, label, ...)`` with images [C, H, W], deterministically (the *mask
    view*: no random augmentation); masks are in its geometry. Batches stream from a DataLoader
    (``num_workers``, pinned memory on a GPU); only one batch of activations is alive at a time,
    and each batch's masks are packed at once. ``precision``: that of the forward pass (``"auto"``:
    bfloat16 autocast on CUDA, float32 elsewhere). The model and every batch are put on ``device``
    (default: the model's); see :func:`prepare_masking` for ``layer``, ``method``, ``rule`` and
    ``preprocess``.
    """
    masker = prepare_masking(model, first_batch(dataset, "cpu"), layer, method=method, rule=rule,
                             preprocess=preprocess, device=device, precision=precision)
    return masker(dataset, batch_size=batch_size, num_workers=num_workers, progress=progress)


def _squares(side: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    rows, cols = torch.arange(height), torch.arange(width)
    in_rows = (rows >= top) & (rows < top + side)
    in_cols = (cols >= left) & (cols < left + side)
    return in_rows[:, :, None] & in_cols[:, None, :]


def _square_draws(n: int, height: int, width: int, min_side: int, max_side: int,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    side = torch.randint(min_side, max_side + 1, (n, 1), generator=generator)
    top = torch.randint(0, height, (n, 1), generator=generator) - side // 2
    left = torch.randint(0, width, (n, 1), generator=generator) - side // 2
    return side, top, left


def random_square_masks(
    n: int, height: int, width: int, *, min_side: int = 2, max_side: int = 14, generator: torch.Generator | None = None
) -> torch.Tensor:
    """RandMask: one square per image, side uniform in [min_side, max_side], centre uniform over the
    image, clipped at the border. Returns bool [n, height, width]."""
    return _squares(*_square_draws(n, height, width, min_side, max_side, generator), height, width)


def random_square_maskset(
    n: int, height: int, width: int, *, min_side: int = 2, max_side: int = 14, generator: torch.Generator | None = None,
    chunk: int = 4096,
) -> MaskSet:
    """:func:`random_square_masks` as a bit-packed :class:`MaskSet` (the same masks for the same
    ``generator``), built ``chunk`` masks at a time: never more than one chunk unpacked."""
    side, top, left = _square_draws(n, height, width, min_side, max_side, generator)
    packed = [pack_bits(_squares(side[i:i + chunk], top[i:i + chunk], left[i:i + chunk], height, width))
              for i in range(0, n, chunk)]
    return MaskSet(torch.cat(packed) if packed else torch.zeros(0, -(-height * width // 8), dtype=torch.uint8),
                   height, width, {"rule": f"randmask(side={min_side}..{max_side})"})
