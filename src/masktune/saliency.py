"""Batched class-activation maps (CAMs), computed on the model's device with no per-image loop.

Each method is a small subclass of :class:`CAM` (the pattern of pytorch-grad-cam's ``base_cam.py``);
the output of :func:`saliency_maps` matches pytorch-grad-cam's for ``targets=None``: ReLU of the
combined map, per-image min-max normalisation, bilinear resize to the input size (half-pixel
centres, no antialias) and a second min-max normalisation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MaskTuneError
from .models import eval_mode

EPS = 1e-7


class CAM:
    """A CAM method: turns the CAM layer's activations and gradients into one map per image."""

    name = ""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Per-channel weights, shape [B, K]."""
        raise NotImplementedError

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The raw map [B, h, w] before ReLU: the weighted sum of the activation channels."""
        return torch.einsum("bk,bkhw->bhw", self.weights(activations, gradients), activations)


class XGradCAM(CAM):
    """XGrad-CAM (Fu et al. 2020): gradients weighted by the normalised activations."""

    name = "xgradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum((2, 3)) / (activations.sum((2, 3)) + EPS)


METHODS: dict[str, type[CAM]] = {cls.name: cls for cls in (XGradCAM,)}


def get_method(method: str | CAM) -> CAM:
    """The CAM method called ``method`` (or ``method`` itself when it is already a :class:`CAM`)."""
    if isinstance(method, CAM):
        return method
    if method not in METHODS:
        raise MaskTuneError(f"unknown CAM method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return METHODS[method]()


@contextmanager
def _activation_leaf(layer: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Replace the layer's output by a detached copy that requires grad, and switch autograd on from
    there: layers before the CAM layer run without recording a graph, and the backward pass stops
    at the CAM layer (no gradients for earlier layers or parameters)."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
        if captured:
            raise MaskTuneError("the CAM layer runs more than once per forward pass; choose a layer used once")
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        torch.set_grad_enabled(True)  # the caller's no_grad context restores the mode afterwards
        return leaf.clone()  # later in-place ops (e.g. ReLU(inplace=True)) must not touch the leaf

    handle = layer.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def min_max(maps: torch.Tensor) -> torch.Tensor:
    """Per-map min-max normalisation over the last two dims, as pytorch-grad-cam does (eps 1e-7)."""
    flat = maps.flatten(-2)
    flat = flat - flat.amin(-1, keepdim=True)
    flat = flat / (flat.amax(-1, keepdim=True) + EPS)
    return flat.view_as(maps)


def saliency_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module,
    *,
    method: str | CAM = "xgradcam",
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM heatmaps for a batch, at the input's height x width, values in [0, 1].

    ``targets`` are the classes to explain, one per image; ``None`` explains the predicted class
    (highest logit). The model runs in eval mode; its modes and hooks are restored afterwards.
    Returns ``(heatmaps [B, H, W], targets [B])``.
    """
    cam = get_method(method)
    with eval_mode(model), _activation_leaf(layer) as captured, torch.no_grad():
        logits = model(images)
        if not captured:
            raise MaskTuneError("the CAM layer did not run during the forward pass; choose a layer the model uses")
        activations = captured[0]
        if targets is None:
            targets = logits.argmax(1)
        targets = targets.to(logits.device)
        score = logits.gather(1, targets[:, None]).sum()
        (gradients,) = torch.autograd.grad(score, activations)
    with torch.no_grad():
        maps = cam.combine(activations.detach().float(), gradients.float()).relu()
        maps = F.interpolate(min_max(maps)[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return min_max(maps[:, 0].relu()), targets
