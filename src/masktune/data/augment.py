"""Training augmentations applied to a whole batch of raw images on its device.

They run inside the training loop, after masking, so a mask always lines up with the image it was
computed on (SPEC.md section 1, "applied after masking"). All geometric parts are folded into one
affine warp per image (a single ``grid_sample`` call for the batch); colour parts are arithmetic on
the batch. Randomness comes from torch's global generator, so a seeded run is reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

# AlexNet-style PCA lighting noise: eigenvalues and eigenvectors of ImageNet's RGB covariance.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
_GREY = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class BatchAugment:
    """Random augmentations of a batch of raw images ``[B, C, H, W]`` in [0, 1]; call it on the batch.

    - ``crop_scale``: random resized crop (torchvision's ``RandomResizedCrop``): area share drawn
      from this range, aspect ratio log-uniform in ``crop_ratio``, resized back to the input size.
      A crop that would not fit is clipped to the image instead of being redrawn.
    - ``flip``: horizontal flip with probability 1/2.
    - ``degrees``, ``translate``: ``RandomAffine``: rotation uniform in +-degrees, shift uniform in
      +-translate of the width and height, rounded to whole pixels; uncovered pixels are 0.
    - ``pad_crop``: ``RandomCrop(size, padding=pad_crop)``: a shift of -p..p whole pixels, zero fill.
    - ``jitter``: brightness, contrast and saturation factors uniform in [1 - j, 1 + j]
      (``ColorJitter(j, j, j)``, applied in that order), clipped to [0, 1].
    - ``lighting``: PCA lighting noise with this standard deviation (3-channel images only).
    """

    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    degrees: float = 0.0
    translate: float = 0.0
    pad_crop: int = 0
    jitter: float = 0.0
    lighting: float = 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """A randomly augmented copy of ``images``."""
        if images.dim() != 4:
            raise ConfigError(
                f"BatchAugment transforms a batch [B, C, H, W] on the device, got a tensor of shape "
                f"{tuple(images.shape)}; pass it as augment= of the training settings (TrainSettings), which "
                "apply it to each training batch after masking, not as a per-image dataset transform"
            )
        if self.crop_scale is not None or self.flip or self.degrees or self.translate or self.pad_crop:
            images = self._warp(images)
        if self.jitter:
            images = self._colour(images)
        if self.lighting:
            alpha = torch.randn(len(images), 3, device=images.device) * self.lighting
            eigval = torch.tensor(IMAGENET_EIGVAL, device=images.device)
            eigvec = torch.tensor(IMAGENET_EIGVEC, device=images.device)
            images = images + ((alpha * eigval) @ eigvec.T)[..., None, None]
        return images

    def _uniform(self, n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
        return torch.rand(n, device=device) * (high - low) + low

    def _warp(self, images: torch.Tensor) -> torch.Tensor:
        """One affine warp per image: output coordinates map to input ones by ``theta`` (normalised)."""
        n, _, height, width = images.shape
        device = images.device
        eye = torch.eye(2, device=device).expand(n, 2, 2)
        matrix, shift = eye.clone(), torch.zeros(n, 2, device=device)
        if self.degrees or self.translate:
            angle = torch.deg2rad(self._uniform(n, -self.degrees, self.degrees, device))
            cos, sin = angle.cos(), angle.sin()
            # a rotation in pixel space, written in coordinates normalised separately along x and y
            matrix = torch.stack([torch.stack([cos, -sin * height / width], 1),
                                  torch.stack([sin * width / height, cos], 1)], 1)
            pixels = torch.stack([
                torch.round(self._uniform(n, -self.translate * width, self.translate * width, device)),
                torch.round(self._uniform(n, -self.translate * height, self.translate * height, device)),
            ], 1)
            shift = pixels * torch.tensor([2 / width, 2 / height], device=device)
        if self.pad_crop:
            pixels = torch.randint(-self.pad_crop, self.pad_crop + 1, (n, 2), device=device).float()
            shift = shift + pixels * torch.tensor([2 / width, 2 / height], device=device)
        outer, outer_shift = eye.clone(), torch.zeros(n, 2, device=device)
        if self.flip:
            sign = torch.where(torch.rand(n, device=device) < 0.5, -1.0, 1.0)
            outer = outer * torch.stack([sign, torch.ones_like(sign)], 1)[:, None, :]
        if self.crop_scale is not None:
            area = self._uniform(n, *self.crop_scale, device)
            ratio = torch.exp(self._uniform(n, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), device))
            # crop width / height as shares of the image's, for a crop of aspect `ratio` in pixels
            size = torch.stack([(area * ratio * height / width).sqrt(), (area / ratio * width / height).sqrt()],
                               1).clamp(max=1.0)
            outer_shift = (torch.rand(n, 2, device=device) * 2 - 1) * (1 - size)
            outer = outer * size[:, None, :]
        theta = torch.cat([outer @ matrix, (outer @ shift[..., None]) + outer_shift[..., None]], 2)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, images: torch.Tensor) -> torch.Tensor:
        n, device = len(images), images.device
        low, high = max(0.0, 1 - self.jitter), 1 + self.jitter
        grey_weights = torch.tensor(_GREY, device=device).view(1, 3, 1, 1)

        def blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
            return (factor.view(n, 1, 1, 1) * a + (1 - factor.view(n, 1, 1, 1)) * b).clamp(0, 1)

        images = (images * self._uniform(n, low, high, device).view(n, 1, 1, 1)).clamp(0, 1)
        mean_grey = (images * grey_weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        images = blend(images, mean_grey, self._uniform(n, low, high, device))
        grey = (images * grey_weights).sum(1, keepdim=True)
        return blend(images, grey, self._uniform(n, low, high, device))
