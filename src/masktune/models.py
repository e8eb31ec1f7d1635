"""Models from the paper and the lookup of a model's CAM layer.

Any ``torch.nn.Module`` classifier works with masktune: the CAM layer is named by its dotted module
name (as in ``model.named_modules()``), or found automatically.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import MaskTuneError

_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class LayerError(MaskTuneError, ValueError):
    """The CAM layer named by the user does not exist or has no spatial output."""


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """The paper's biased-MNIST CNN (SPEC.md section 2); CAM layer ``block4`` (32 x 8 x 8 for 28 x 28 input)."""

    cam_layer = "block4"

    def __init__(self, num_classes: int = 2, in_channels: int = 3) -> None:
        super().__init__()
        self.block1 = _conv_block(in_channels, 16)
        self.block2 = _conv_block(16, 16)
        self.pool1 = nn.MaxPool2d(2)
        self.block3 = _conv_block(16, 32)
        self.block4 = _conv_block(32, 32)
        self.pool2 = nn.MaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block2(self.block1(x)))
        x = self.pool2(self.block4(self.block3(x)))
        return self.classifier(x)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own mode afterwards, even on error."""
    modes = [m.training for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in zip(model.modules(), modes):
            module.training = mode


def spatial_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output is 4-D with more than one spatial cell, in execution order.

    ``example`` is one input batch (a single image is enough); the model runs once in eval mode.
    """
    found: list[str] = []
    names = {module: name for name, module in model.named_modules() if name}

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1:
            found.append(names[module])

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return list(dict.fromkeys(found))


def resolve_cam_layer(model: nn.Module, layer: str | nn.Module | None, example: torch.Tensor) -> tuple[str, nn.Module]:
    """Find the CAM layer of ``model``: a module, a dotted name, or ``None`` for automatic choice.

    Automatic choice takes ``model.cam_layer`` when the model defines it, else the last module (in
    execution order) with a spatial 4-D output that is not a pooling layer. ``example`` is an input
    batch used to see which layers are spatial.
    """
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise LayerError("the CAM layer module given is not a submodule of the model; pass one of model.named_modules()")
    if layer is None:
        layer = getattr(model, "cam_layer", None)
    candidates = spatial_layers(model, example)
    if layer is None:
        usable = [name for name in candidates if not isinstance(modules[name], _POOLING)]
        if not usable:
            raise LayerError(
                f"{type(model).__name__} has no layer with a spatial (N, C, H, W) output to compute a CAM on; "
                "masktune needs a convolutional feature map"
            )
        return usable[-1], modules[usable[-1]]
    if layer not in modules or not layer:
        raise LayerError(
            f"the model has no layer named {layer!r}. Layers with a spatial output, any of which can be the CAM "
            f"layer: {', '.join(candidates) or '(none)'}"
        )
    if layer not in candidates:
        raise LayerError(
            f"layer {layer!r} does not produce a spatial (N, C, H, W) output, so no CAM can be computed on it. "
            f"Layers with a spatial output: {', '.join(candidates) or '(none)'}"
        )
    return layer, modules[layer]
