"""MaskTune's finetune (SPEC.md section 1, steps 4 and 5): one epoch on the masked training set,
optionally iterated, re-masking with the finetuned model each time."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..models import place
from ..saliency import CAM
from ..training import TrainSettings, finetune, make_optimizer
from .compute import compute_masks
from .dataset import MaskedDataset
from .maskset import MaskSet
from .rules import MaskRule


@dataclass
class MaskTuneResult:
    """The masks of each MaskTune iteration and the finetuning metrics of each."""

    masks: list[MaskSet | torch.Tensor] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def masktune_finetune(
    model: nn.Module,
    train_set: Dataset,
    masks: MaskSet | torch.Tensor,
    settings: TrainSettings = TrainSettings(),
    *,
    optimizer_state: dict | None = None,
    iterations: int = 1,
    accumulate: bool = False,
    mask_view: Dataset | None = None,
    layer: str | nn.Module | None = None,
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    geometry: str = "aligned",
    fill: float | str = 0.0,
    mixing: str = "own",
    desc: str = "masktune",
) -> MaskTuneResult:
    """MaskTune's finetuning, optionally iterated (SPEC.md section 1, steps 4 and 5), on ``model`` in place.

    Iteration 1 finetunes one epoch on ``train_set`` with ``masks`` applied (:class:`MaskedDataset`
    with ``geometry``, ``fill`` and ``mixing``; the defaults are the paper's zeros), continuing ``optimizer_state`` (of the kind ``settings.optimizer``) with
    learning rate ``settings.lr``; ``settings.augment`` runs on each batch after masking.
    Each later iteration re-masks with the finetuned model (:func:`compute_masks` on ``mask_view``,
    default ``train_set``, with ``layer``, ``method``, ``rule`` and ``preprocess``) and finetunes one
    more epoch with the same optimizer. With ``accumulate`` the saliency is computed on the images
    already masked, and the new masks are added to the previous ones (logical or). Training and
    masking run on ``settings.device`` (default: where the model is), which the model is put on.
    """
    if iterations < 1:
        raise ConfigError(f"iterations must be at least 1, got {iterations}")
    device = place(model, settings.device)  # before the optimizer loads its state onto the parameters' device
    optimizer = make_optimizer(model, settings, optimizer_state)
    mask_view = train_set if mask_view is None else mask_view
    result = MaskTuneResult()
    for iteration in range(iterations):
        started = time.perf_counter()
        if iteration:
            source = MaskedDataset(mask_view, masks) if accumulate else mask_view
            new = compute_masks(model, source, layer, method=method, rule=rule, preprocess=preprocess, device=device,
                                num_workers=settings.num_workers, precision=settings.precision,
                                progress=settings.progress)
            if accumulate:
                new = (masks if isinstance(masks, MaskSet) else MaskSet.from_bool(masks)) | new
            masks = new
        masking_s = time.perf_counter() - started
        result.masks.append(masks)
        history = finetune(model, MaskedDataset(train_set, masks, geometry=geometry, fill=fill, mixing=mixing),
                           dataclasses.replace(settings, seed=settings.seed + iteration), optimizer=optimizer,
                           desc=desc)
        result.history += [{**h, "iteration": iteration + 1, "masking_s": round(masking_s, 3)} for h in history]
    return result
