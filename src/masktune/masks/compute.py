"""Masks of a whole dataset: MaskTune's saliency masks, streamed batch by batch and bit-packed, and
RandMask's random squares (the paper's ablation)."""

from __future__ import annotations

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
    num_workers: int = 0,
    amp: bool = True,
    progress: bool = True,
) -> MaskSet:
    """Saliency masks of every image of ``dataset`` for the model's predicted class, bit-packed.

    The dataset yields ``(image, label, ...)`` with images [C, H, W], deterministically (the *mask
    view*: no random augmentation); masks are in its geometry. ``preprocess`` runs on each batch on
    the device before the model (e.g. normalisation; it must not move pixels). Batches stream from
    a DataLoader (``num_workers``, pinned memory on a GPU); only one batch of activations is alive
    at a time, and each batch's masks are packed at once. ``amp``: float16 autocast on a GPU.
    The model and every batch are put on ``device`` (default: the model's); the maps come from an
    eval-mode copy made by :func:`~masktune.models.fold_batchnorm`, fed channels-last images when it
    accepts them (both only for speed).
    """
    device = place(model, device)
    cam, rule = get_method(method), make_rule(rule)
    example = first_batch(dataset, device)
    example = preprocess(example) if preprocess else example
    layer_name, _ = resolve_cam_layer(model, layer, example, device=device)
    folded = fold_batchnorm(model, keep=layer_name)
    cam_layer = folded.get_submodule(layer_name)
    memory_format = fastest_memory_format(folded, example)
    packed = []
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device)
    for images, *_ in tqdm(loader, desc="masking", unit="batch", disable=not progress, leave=False):
        images = to_device(images, device)
        images = (preprocess(images) if preprocess else images).contiguous(memory_format=memory_format)
        heat, _ = saliency_maps(folded, images, cam_layer, method=cam, amp=amp)
        packed.append(pack_bits(rule(heat)).cpu())
    return MaskSet(torch.cat(packed), *example.shape[-2:], {
        "cam_method": cam.name, "layer": layer_name, "rule": repr(rule), "model_fingerprint": model_fingerprint(model),
    })


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
