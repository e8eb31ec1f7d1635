"""Models from the paper, where a model runs (its device), and the lookup of a model's CAM layer.

Any ``torch.nn.Module`` classifier works with masktune: the CAM layer is named by its dotted module
name (as in ``model.named_modules()``), or found automatically. Every function of masktune that
computes with a model takes a ``device`` and puts the model there itself (:func:`place`).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .errors import ConfigError, LayerError, WeightsError

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_POOLING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


class Normalized(nn.Module):
    """``model`` behind a fixed per-channel normalisation ``(x - mean) / std``.

    It takes raw images in [0, 1], so masks (which zero raw pixels) and augmentations act before the
    normalisation, as in the authors' pipelines. The CAM layer is ``model.<cam_layer>``.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 cam_layer: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        inner = cam_layer or getattr(model, "cam_layer", None)
        if inner is not None:
            self.cam_layer = f"model.{inner}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def resnet50(num_classes: int, *, pretrained: bool = True, mean: Sequence[float] = IMAGENET_MEAN,
             std: Sequence[float] = IMAGENET_STD) -> Normalized:
    """torchvision's ResNet-50 with a new ``num_classes`` head, behind ImageNet normalisation.

    ``pretrained`` loads torchvision's ImageNet weights (``IMAGENET1K_V1``) from the torch hub cache,
    downloading them when they are not there; failing that, :class:`WeightsError` says where to put
    the file. CAM layer: the last bottleneck block of ``layer4`` (``model.layer4.2``).
    """
    from torchvision.models import ResNet50_Weights
    from torchvision.models import resnet50 as torchvision_resnet50

    net = torchvision_resnet50()
    if pretrained:
        weights = ResNet50_Weights.IMAGENET1K_V1
        try:
            net.load_state_dict(weights.get_state_dict(progress=False, check_hash=True))
        # Network, disk and format failures all mean the same to the user: the weights are not usable.
        except Exception as exc:
            target = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
            raise WeightsError(
                f"cannot load the ImageNet weights of ResNet-50 ({' '.join(str(exc).split())[:300]}). Download "
                f"{weights.url} to {target} (or set TORCH_HOME to a folder whose hub/checkpoints holds it), "
                "or train from random initialisation with --no-pretrained (--set pretrained=false)"
            ) from exc
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return Normalized(net, mean, std, cam_layer="layer4.2")


class BasicBlock(nn.Module):
    """The CIFAR ResNet block: two 3x3 convolutions; the shortcut subsamples and zero-pads channels
    when the shape changes (He et al. 2016, option A)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of depth 6n + 2 (16, 32, 64 channels; He et al. 2016); ``depth=32`` is ResNet-32.

    Takes raw [0, 1] images of any size (global average pooling); CAM layer: the last block of
    ``layer3``. Convolutions and the head use Kaiming-normal initialisation.
    """

    def __init__(self, num_classes: int = 10, depth: int = 32) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(*(BasicBlock(16, 16) for _ in range(n)))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), *(BasicBlock(32, 32) for _ in range(n - 1)))
        self.layer3 = nn.Sequential(BasicBlock(32, 64, 2), *(BasicBlock(64, 64) for _ in range(n - 1)))
        self.fc = nn.Linear(64, num_classes)
        self.cam_layer = f"layer3.{n - 1}"
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(x.mean((2, 3)))


def resnet32(num_classes: int = 10) -> CifarResNet:
    """ResNet-32 for 32 x 32 (CIFAR-10, SVHN) and 64 x 64 (Cats vs Dogs) images, CAM layer ``layer3.4``."""
    return CifarResNet(num_classes, depth=32)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU for a model with neither)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def place(model: nn.Module, device: torch.device | str | None = None) -> torch.device:
    """Move ``model`` to ``device`` (``None``: leave it where it is) and return the device it is on.

    Every masktune function that computes with a model calls this first and then moves each batch
    to the returned device, so a model built or loaded anywhere runs where it is asked to.
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    return device


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: plain float32, no autocast).

    ``"auto"`` is bfloat16 on CUDA and float32 elsewhere (deterministic on the CPU); ``"float16"``
    needs a gradient scaler in training (:func:`~masktune.train_erm` makes one).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else None
    return None if precision == "float32" else getattr(torch, precision)


def autocast(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` on ``device``'s type with ``dtype``, or nothing for ``dtype=None``."""
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None else nullcontext()


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


def fastest_memory_format(model: nn.Module, example: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for image batches when ``model`` accepts them in that layout (much
    faster convolutions and pooling, on CPUs and GPUs), else ``torch.contiguous_format``: some models
    ``view`` their feature maps, which only works on contiguous tensors. ``example`` is one input
    batch (one image is enough); the model runs once on it in eval mode."""
    if example.dim() != 4:
        return torch.contiguous_format
    try:
        with torch.no_grad(), eval_mode(model):
            model(example.contiguous(memory_format=torch.channels_last))
    except RuntimeError:
        return torch.contiguous_format
    return torch.channels_last


@dataclass
class _LayerOutput:
    """What one module produced in a traced forward pass."""

    name: str
    leaf: bool
    calls: int = 0
    done: int = 0  # when its (last) call finished, in hook order: a block finishes after its children
    output: object = None
    version: int = -1  # the output's in-place version counter when it was made
    spatial: bool = False
    pooled: bool = False


def _trace_layers(model: nn.Module, example: torch.Tensor) -> list[_LayerOutput]:
    """Every submodule that ran on ``example`` (eval mode, no gradients), in the order it (last) finished.

    An output is *pooled* when a pooling layer made it, when a block returns a pooled tensor as its
    own output, or when a module without parameters (dropout, an activation) ran on a pooled input.
    """
    records: dict[nn.Module, _LayerOutput] = {}
    pooled: set[int] = set()
    finished = iter(range(1, 1 << 62))

    def hook(module: nn.Module, inputs: tuple, output: object) -> None:
        record = records[module]
        record.calls += 1
        record.done, record.output = next(finished), output
        if not isinstance(output, torch.Tensor):
            return
        record.version = output._version
        from_pool = any(id(x) in pooled for x in inputs) and next(module.parameters(), None) is None
        record.pooled = isinstance(module, _POOLING) or id(output) in pooled or from_pool
        if record.pooled:
            pooled.add(id(output))
        record.spatial = output.dim() == 4 and output.shape[-2] * output.shape[-1] > 1

    handles = []
    for name, module in model.named_modules():
        if name:
            records[module] = _LayerOutput(name, leaf=next(module.children(), None) is None)
            handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return sorted((record for record in records.values() if record.calls), key=lambda record: record.done)


def spatial_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose output is 4-D with more than one spatial cell, in the order they
    finished (a block after the layers inside it).

    ``example`` is one input batch (a single image is enough); the model runs once in eval mode.
    """
    return [record.name for record in _trace_layers(model, example) if record.spatial]


def _automatic_layer(model: nn.Module, example: torch.Tensor) -> str:
    """The last module to finish with a spatial output that is not pooled and that runs once; among
    modules returning that same tensor with the same values (a block returns its last layer's
    output; an in-place layer changes its input's values), the last leaf layer, or else the
    innermost block."""
    usable = [r for r in _trace_layers(model, example) if r.spatial and not r.pooled and r.calls == 1]
    if not usable:
        raise LayerError(
            f"{type(model).__name__} has no layer with a spatial (N, C, H, W) output, outside pooling, to compute "
            "a CAM on; masktune needs a convolutional feature map"
        )
    last = usable[-1]
    same = [r for r in usable if r.output is last.output and r.version == last.version]
    leaves = [r for r in same if r.leaf]
    return leaves[-1].name if leaves else same[0].name


def resolve_cam_layer(model: nn.Module, layer: str | nn.Module | None, example: torch.Tensor, *,
                      device: torch.device | str | None = None) -> tuple[str, nn.Module]:
    """Find the CAM layer of ``model``: a module, a dotted name, or ``None`` for automatic choice.

    Automatic choice takes ``model.cam_layer`` when the model defines it, else the last layer (in
    execution order) with a spatial 4-D output that is not pooled: never a pooling layer, nor a layer
    or block whose output is a pooling layer's (see :func:`_automatic_layer`). ``example`` is an input
    batch used to see which layers are spatial; the model and ``example`` are put on ``device``
    (default: the model's) first.
    """
    device = place(model, device)
    example = example.to(device)
    modules = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in modules.items():
            if module is layer:
                return name, module
        raise LayerError("the CAM layer module given is not a submodule of the model; pass one of model.named_modules()")
    if layer is None:
        layer = getattr(model, "cam_layer", None)
    if layer is None:
        name = _automatic_layer(model, example)
        return name, modules[name]
    candidates = spatial_layers(model, example)
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
