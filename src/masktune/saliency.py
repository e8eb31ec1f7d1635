"""Batched class-activation maps (CAMs), computed on the model's device with no per-image loop.

Each native method is a small subclass of :class:`CAM` that says how the CAM layer's activations
and gradients combine into one map per image (the pattern of pytorch-grad-cam's ``base_cam.py``).
The output of :func:`saliency_maps` matches pytorch-grad-cam's for the same method: ReLU of the
combined map, per-image min-max normalisation, bilinear resize to the input size (half-pixel
centres, no antialias) and a second min-max normalisation. Any other pytorch-grad-cam method
(ScoreCAM, EigenCAM, AblationCAM, ...) is available by name through :class:`LibraryCAM` when the
optional extra ``masktune[cam]`` is installed.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CAMMethodError, MaskTuneError
from .models import autocast, autocast_dtype, eval_mode, place

EPS = 1e-7
CAM_EXTRA = "pip install 'masktune[cam]'"


class CAM:
    """A gradient-based CAM method, run natively and batched on the model's device.

    Subclasses define :meth:`weights` (one weight per channel) or override :meth:`combine` (an
    element-wise map). Calling an instance computes the heatmaps of a batch.
    """

    name = ""

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """Per-channel weights [B, K] from activations and gradients [B, K, h, w]."""
        raise NotImplementedError(f"{type(self).__name__} must define weights() or combine()")

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """The raw map [B, h, w] before ReLU: by default the weighted sum of the activation channels."""
        return torch.einsum("bk,bkhw->bhw", self.weights(activations, gradients), activations)

    def __call__(
        self, model: nn.Module, images: torch.Tensor, layer: nn.Module, targets: torch.Tensor | None = None,
        *, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmaps [B, H, W] in [0, 1] and the explained classes [B]; see :func:`saliency_maps`.
        ``dtype``: the autocast dtype of the forward pass (None: float32)."""
        with eval_mode(model), _activation_leaf(layer) as captured, torch.no_grad():
            with autocast(images.device, dtype):
                logits = model(images)
            if not captured:
                raise MaskTuneError("the CAM layer did not run during the forward pass; choose a layer the model uses")
            activations = captured[0]
            if targets is None:
                targets = logits.argmax(1)
            targets = targets.to(logits.device)
            score = logits.float().gather(1, targets[:, None]).sum()
            (gradients,) = torch.autograd.grad(score, activations)
        with torch.no_grad():
            maps = self.combine(activations.detach().float(), gradients.float()).relu()
            return upsample_normalised(maps, images.shape[-2:]), targets


class XGradCAM(CAM):
    """XGrad-CAM (Fu et al. 2020), MaskTune's method: gradients weighted by the normalised activations."""

    name = "xgradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum((2, 3)) / (activations.sum((2, 3)) + EPS)


class GradCAM(CAM):
    """Grad-CAM (Selvaraju et al. 2017): spatially averaged gradients."""

    name = "gradcam"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return gradients.mean((2, 3))


class GradCAMPlusPlus(CAM):
    """Grad-CAM++ (Chattopadhay et al. 2018), with pytorch-grad-cam's closed form (eps 1e-6)."""

    name = "gradcam++"

    def weights(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        g2 = gradients.square()
        alpha = g2 / (2 * g2 + activations.sum((2, 3), keepdim=True) * g2 * gradients + 1e-6)
        alpha = torch.where(gradients != 0, alpha, 0)
        return (gradients.relu() * alpha).sum((2, 3))


class HiResCAM(CAM):
    """HiResCAM (Draelos and Carin 2020): element-wise gradient x activation, summed over channels."""

    name = "hirescam"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients * activations).sum(1)


class LayerCAM(CAM):
    """LayerCAM (Jiang et al. 2021): positive gradients x activation, summed over channels."""

    name = "layercam"

    def combine(self, activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        return (gradients.relu() * activations).sum(1)


METHODS: dict[str, type[CAM]] = {cls.name: cls for cls in (XGradCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM)}


def _key(name: str) -> str:
    return name.lower().replace("++", "plusplus").replace("-", "").replace("_", "")


class LibraryCAM(CAM):
    """Any pytorch-grad-cam method, by its class name (case, ``-`` and ``_`` ignored: ``"scorecam"``).

    Runs pytorch-grad-cam itself (its own per-image loops, in float32 on the model's device: ``dtype``
    is ignored); the model's modes, hooks and parameter gradients are restored afterwards.
    """

    def __init__(self, name: str) -> None:
        library = _library()
        found = {_key(cls_name): cls for cls_name, cls in vars(library).items()
                 if isinstance(cls, type) and issubclass(cls, library.base_cam.BaseCAM)}
        if _key(name) not in found:
            choices = sorted(set(METHODS) | set(found) - {_key(native) for native in METHODS})
            raise CAMMethodError(f"unknown CAM method {name!r}; choose one of: {', '.join(choices)}")
        self.cam_class = found[_key(name)]
        self.name = _key(name)

    def __call__(
        self, model: nn.Module, images: torch.Tensor, layer: nn.Module, targets: torch.Tensor | None = None,
        *, dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        grads = [p.grad for p in model.parameters()]
        try:
            with eval_mode(model), self.cam_class(model=model, target_layers=[layer]) as cam:
                wanted = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
                maps = torch.from_numpy(cam(images, targets=wanted)).to(images.device)
                used = cam.outputs.argmax(1) if targets is None else targets.to(images.device)
        finally:
            for p, grad in zip(model.parameters(), grads):
                p.grad = grad
        return maps, used


def _library():
    try:
        import pytorch_grad_cam
        import pytorch_grad_cam.base_cam
    except ImportError as error:
        raise CAMMethodError(
            f"this CAM method comes from pytorch-grad-cam, which is not installed ({error}); "
            f"install the optional extra: {CAM_EXTRA}"
        ) from error
    return pytorch_grad_cam


def get_method(method: str | CAM) -> CAM:
    """The CAM method called ``method``: a native one (see ``METHODS``) or, failing that, a
    pytorch-grad-cam method through :class:`LibraryCAM`. A :class:`CAM` instance is returned as is."""
    if isinstance(method, CAM):
        return method
    native = {_key(name): cls for name, cls in METHODS.items()}
    if _key(method) in native:
        return native[_key(method)]()
    return LibraryCAM(method)


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


def upsample_normalised(maps: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """pytorch-grad-cam's post-processing of non-negative maps [B, h, w]: min-max normalise, resize
    bilinearly to ``size`` (half-pixel centres, no antialias), ReLU and min-max normalise again."""
    maps = F.interpolate(min_max(maps)[:, None], size=tuple(size), mode="bilinear", align_corners=False)
    return min_max(maps[:, 0].relu())


def saliency_maps(
    model: nn.Module,
    images: torch.Tensor,
    layer: nn.Module,
    *,
    method: str | CAM = "xgradcam",
    targets: torch.Tensor | None = None,
    precision: str = "auto",
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CAM heatmaps for a batch, at the input's height x width, values in [0, 1].

    ``method`` is a name (``xgradcam``, ``gradcam``, ``gradcam++``, ``hirescam``, ``layercam``, or
    any pytorch-grad-cam method) or a :class:`CAM`. ``targets`` are the classes to explain, one per
    image; ``None`` explains the predicted class (highest logit). ``precision`` (``"auto"``: bfloat16
    autocast on CUDA, float32 elsewhere; see :func:`~masktune.models.autocast_dtype`) is that of the
    forward pass; the maps are combined in float32. The model runs in eval mode; its modes and hooks are restored afterwards. The model and the images are put
    on ``device`` (default: the model's) first.
    Returns ``(heatmaps [B, H, W], targets [B])`` on that device.
    """
    device = place(model, device)
    return get_method(method)(model, images.to(device), layer, targets, dtype=autocast_dtype(precision, device))
