"""Mask rules: how a heatmap becomes a mask. MaskTune's rule masks the pixels hotter than the mean
plus ``k`` standard deviations of the image's positive heat; two simpler rules are options."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError


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

    def validate(self) -> None:
        if not (math.isfinite(self.value) and self.value >= 0):
            raise ConfigError(f"mean-std needs a finite k >= 0 (heat > mean + k * std), got {self.value:g}")

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return threshold_masks(heatmaps, self.value)


class TopPercentRule(MaskRule):
    """The ``p`` percent hottest pixels of each image (round(p/100 * H*W) of them; among equal heat,
    the first in row-major order), never a pixel with zero heat."""

    name, parameter, default = "top-percent", "p", 5.0

    def validate(self) -> None:
        if not 0 < self.value <= 100:
            raise ConfigError(f"top-percent needs 0 < p <= 100, got {self.value:g}")

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
            raise ConfigError(f"threshold needs 0 <= t < 1 (maps are normalised to [0, 1]), got {self.value:g}")

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return heatmaps > self.value


class HeatShareRule(MaskRule):
    """The hottest pixels of each image that together hold the share ``q`` percent of its heat mass
    (the fewest such pixels: hottest first, the one that crosses ``q`` included; among equal heat,
    the first in row-major order), never a pixel with zero heat. Unlike mean + k std, the masked
    area follows the heat: a cue whose heat spreads over a large region gets a large mask."""

    name, parameter, default = "heat-share", "q", 50.0

    def validate(self) -> None:
        if not 0 < self.value <= 100:
            raise ConfigError(f"heat-share needs 0 < q <= 100, got {self.value:g}")

    def __call__(self, heatmaps: torch.Tensor) -> torch.Tensor:
        flat = heatmaps.flatten(-2).double()
        heat, order = flat.sort(dim=-1, descending=True, stable=True)
        before = heat.cumsum(-1) - heat  # heat of the hotter pixels
        take = (before < self.value / 100 * heat.sum(-1, keepdim=True)) & (heat > 0)
        return torch.zeros_like(take).scatter_(-1, order, take).view_as(heatmaps)


RULES: dict[str, type[MaskRule]] = {cls.name: cls for cls in (MeanStdRule, TopPercentRule, ThresholdRule,
                                                              HeatShareRule)}


def make_rule(rule: str | MaskRule = "mean-std", value: float | None = None) -> MaskRule:
    """The mask rule called ``rule`` with parameter ``value`` (None: the rule's default); a
    :class:`MaskRule` is returned as is."""
    if isinstance(rule, MaskRule):
        return rule
    if rule not in RULES:
        raise ConfigError(f"unknown mask rule {rule!r}; choose one of: {', '.join(RULES)}")
    return RULES[rule](value)
