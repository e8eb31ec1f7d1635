"""Masks: the rules that turn heatmaps into masks, masks for a whole dataset, RandMask, the dataset
that applies masks, and iterative MaskTune (re-mask with the finetuned model, finetune again)."""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .errors import MaskTuneError
from .masksets import MaskSet, MaskSetError, model_fingerprint, pack_bits
from .models import fastest_memory_format, resolve_cam_layer
from .saliency import CAM, get_method, saliency_maps
from .training import continued_optimizer, finetune, first_batch, make_loader, model_device

GEOMETRIES = ("aligned", "authors")


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


class MaskRule:
    """Turns heatmaps [B, H, W] (min-max normalised, as :func:`saliency_maps` returns them) into bool
    masks of the same shape, per image. A rule has one parameter, ``value``; ``str(rule)`` names both."""

    name = ""
    parameter = ""
    default = 0.0

    def __init__(self, value: float | None = None) -> None:
        self.value = float(self.default if value is None else value)
        self.validate()

    def validate(self) -> None:
        """Refuse a parameter value the rule cannot use."""

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{self.name}({self.parameter}={self.value:g})"


class MeanStdRule(MaskRule):
    """MaskTune's rule (:func:`threshold_masks`): heat > mean + k*std of the positive heat."""

    name, parameter, default = "mean-std", "k", 2.0

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return threshold_masks(heatmaps, self.value)


class TopPercentRule(MaskRule):
    """The ``p`` percent hottest pixels of each image (round(p/100 * H*W) of them; among equal heat,
    the first in row-major order), never a pixel with zero heat."""

    name, parameter, default = "top-percent", "p", 5.0

    def validate(self) -> None:
        if not 0 < self.value <= 100:
            raise MaskTuneError(f"top-percent needs 0 < p <= 100, got {self.value:g}")

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        flat = heatmaps.flatten(-2)
        count = math.floor(self.value / 100 * flat.shape[-1] + 0.5)
        order = flat.sort(dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(flat.shape[-1], device=flat.device)
                                                .expand_as(order))
        return ((rank < count) & (flat > 0)).view_as(heatmaps)


class ThresholdRule(MaskRule):
    """A fixed threshold ``t`` on the normalised map: heat > t."""

    name, parameter, default = "threshold", "t", 0.5

    def validate(self) -> None:
        if not 0 <= self.value < 1:
            raise MaskTuneError(f"threshold needs 0 <= t < 1 (maps are normalised to [0, 1]), got {self.value:g}")

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return heatmaps > self.value


RULES: dict[str, type[MaskRule]] = {cls.name: cls for cls in (MeanStdRule, TopPercentRule, ThresholdRule)}


def make_rule(rule: str | MaskRule = "mean-std", value: float | None = None) -> MaskRule:
    """The mask rule called ``rule`` with parameter ``value`` (None: the rule's default); a
    :class:`MaskRule` is returned as is."""
    if isinstance(rule, MaskRule):
        return rule
    if rule not in RULES:
        raise MaskTuneError(f"unknown mask rule {rule!r}; choose one of: {', '.join(RULES)}")
    return RULES[rule](value)


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
    The model moves to ``device`` (default: the model's); the maps come from an eval-mode copy made
    by :func:`fold_batchnorm`, fed channels-last images when it accepts them (both only for speed).
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    cam, rule = get_method(method), make_rule(rule)
    example = first_batch(dataset, device)
    example = preprocess(example) if preprocess else example
    layer_name, _ = resolve_cam_layer(model, layer, example)
    folded = fold_batchnorm(model, keep=layer_name)
    cam_layer = folded.get_submodule(layer_name)
    memory_format = fastest_memory_format(folded, example)
    packed = []
    loader = make_loader(dataset, batch_size, num_workers=num_workers, device=device)
    for images, *_ in tqdm(loader, desc="masking", unit="batch", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        images = (preprocess(images) if preprocess else images).contiguous(memory_format=memory_format)
        heat, _ = saliency_maps(folded, images, cam_layer, method=cam, amp=amp)
        packed.append(pack_bits(rule(heat)).cpu())
    return MaskSet(torch.cat(packed), *example.shape[-2:], {
        "cam_method": cam.name, "layer": layer_name, "rule": repr(rule), "model_fingerprint": model_fingerprint(model),
    })


def fold_batchnorm(model: nn.Module, keep: str = "") -> nn.Module:
    """An eval-mode copy of ``model`` in which every BatchNorm2d applied right after a Conv2d is folded
    into it (the same outputs up to float rounding, one pass over the feature map less); ``model``
    itself when it cannot be traced (``torch.fx``) or copied. The conv named ``keep`` (the CAM layer)
    keeps its own output."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
        folded = copy.deepcopy(model).eval()
    except Exception:  # tracing fails on data-dependent control flow, in many ways
        return model
    modules = dict(folded.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(source, torch.fx.Node)
                and source.op == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)
                and len(source.users) == 1 and calls[source.target] == calls[node.target] == 1
                and source.target != keep):
            for name, module in ((source.target, fuse_conv_bn_eval(modules[source.target], modules[node.target])),
                                 (node.target, nn.Identity())):
                parent, _, attribute = name.rpartition(".")
                setattr(folded.get_submodule(parent), attribute, module)
    return folded


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


def stretch_masks(masks: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Resize bool masks [..., h, w] to ``size`` by nearest neighbour (source pixel floor(i * h / H),
    as OpenCV's INTER_NEAREST, which the authors use)."""
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).to(torch.uint8)
    return F.interpolate(flat, size=tuple(size), mode="nearest").view(*masks.shape[:-2], *size).bool()


class MaskedDataset(Dataset):
    """``base`` with ``masks`` applied on the fly: masked pixels are set to ``fill`` in every channel.

    ``base`` yields raw images (before normalisation) as tensors [C, H, W]; ``masks`` is a
    :class:`~masktune.MaskSet` or a bool tensor [N, H, W]. ``transform`` (normalisation, random
    augmentation) runs after masking, so a random crop moves the masked pixels with the image.
    ``geometry="aligned"`` (default): ``base`` yields the images the masks were computed on (the mask
    view, e.g. resized and centre-cropped), and sizes must match. ``geometry="authors"``: ``base``
    yields the raw images and each mask is stretched over the whole image (nearest neighbour), as
    the authors' code does; when the mask view was a crop, the mask then misses its target.
    """

    def __init__(self, base: Dataset, masks: MaskSet | torch.Tensor, *, fill: float = 0.0, transform: Any = None,
                 geometry: str = "aligned") -> None:
        if len(masks) != len(base):
            raise MaskSetError(f"{len(masks)} masks for a dataset of {len(base)} images; compute masks on this dataset")
        if geometry not in GEOMETRIES:
            raise MaskTuneError(f"unknown mask geometry {geometry!r}; choose one of: {', '.join(GEOMETRIES)}")
        self.base = base
        self.masks = masks
        self.fill = fill
        self.transform = transform
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
        masks = self.masks[indices]
        return [(self._apply(image, mask), *rest) for mask, (image, *rest) in zip(masks, batch)]


@dataclass
class MaskTuneResult:
    """The masks of each MaskTune iteration and the finetuning metrics of each."""

    masks: list[MaskSet | torch.Tensor] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def masktune_finetune(
    model: nn.Module,
    train_set: Dataset,
    masks: MaskSet | torch.Tensor,
    *,
    iterations: int = 1,
    accumulate: bool = False,
    mask_view: Dataset | None = None,
    layer: str | nn.Module | None = None,
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    transform: Any = None,
    geometry: str = "aligned",
    optimizer: str = "sgd",
    optimizer_state: dict | None = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    seed: int = 0,
    **finetune_args: Any,
) -> MaskTuneResult:
    """MaskTune's finetuning, optionally iterated (SPEC.md section 1, steps 4 and 5), on ``model`` in place.

    Iteration 1 finetunes one epoch on ``train_set`` with ``masks`` applied (:class:`MaskedDataset`
    with ``transform`` and ``geometry``), continuing ``optimizer_state`` (of the ``optimizer``
    named, ``"sgd"`` or ``"adam"``) with learning rate ``lr``.
    Each later iteration re-masks with the finetuned model (:func:`compute_masks` on ``mask_view``,
    default ``train_set``, with ``layer``, ``method``, ``rule`` and ``preprocess``) and finetunes one
    more epoch with the same optimizer. With ``accumulate`` the saliency is computed on the images
    already masked, and the new masks are added to the previous ones (logical or). Other keyword
    arguments (``batch_size``, ``device``, ``num_workers``, ``progress``, ``desc``) go to
    :func:`~masktune.finetune`; masking uses the same ``num_workers`` and ``progress``.
    """
    if iterations < 1:
        raise MaskTuneError(f"iterations must be at least 1, got {iterations}")
    if finetune_args.get("device") is not None:
        model.to(finetune_args["device"])  # before the optimizer loads its state onto the parameters' device
    optimizer = continued_optimizer(optimizer, model, lr, momentum, weight_decay, optimizer_state)
    mask_args = {key: finetune_args[key] for key in ("num_workers", "progress") if key in finetune_args}
    mask_view = train_set if mask_view is None else mask_view
    result = MaskTuneResult()
    for iteration in range(iterations):
        started = time.perf_counter()
        if iteration:
            source = MaskedDataset(mask_view, masks) if accumulate else mask_view
            new = compute_masks(model, source, layer, method=method, rule=rule, preprocess=preprocess, **mask_args)
            if accumulate:
                new = (masks if isinstance(masks, MaskSet) else MaskSet.from_bool(masks)) | new
            masks = new
        masking_s = time.perf_counter() - started
        result.masks.append(masks)
        history = finetune(model, MaskedDataset(train_set, masks, transform=transform, geometry=geometry),
                           optimizer=optimizer, seed=seed + iteration, **{"desc": "masktune", **finetune_args})
        result.history += [{**h, "iteration": iteration + 1, "masking_s": round(masking_s, 3)} for h in history]
    return result
