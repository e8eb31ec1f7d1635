"""The settings of a run: :class:`RunConfig`, and how text (``--set key=value``) becomes typed values.

It knows the settings, their types and ranges, not the components that use them (it imports
only the default coverages). Names that components define (mask rules, CAM methods, optimizers, devices) are checked
by :func:`masktune.pipeline.runner.check_config` before a run starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..evaluation.selective import COVERAGES

METHODS = ("erm", "randmask", "masktune")
GUARDED = "guarded"  # the mask mixing that follows the leakage of the own masks (see RECIPES)
_PAPER = {"cam_method": "xgradcam", "mask_rule": "mean-std", "mask_param": None, "mask_fill": "zero",
          "mask_mixing": "own", "iterations": 1, "accumulate": False}
RECIPES: dict[str, dict[str, Any]] = {"paper": _PAPER, "guarded": _PAPER | {"mask_mixing": GUARDED}}
"""Named masking recipes: the settings each one sets (explicit settings override them).
``paper``: the paper's (xGradCAM, heat > mean + 2 std, zero fill, each image's own mask, one
iteration), which are also the defaults. ``guarded``: the paper's, except that when the own
masks leave a mark that predicts the label (leakage from 10%, on the training set), the finetune
also masks each image with the mask of a random image of another class."""
MAX_SEED = 2**32 - 1  # seeds derive per-epoch generator seeds (seed * 100_003 + ...), which must fit 64 bits


@dataclass
class RunConfig:
    """Every setting of a run. An experiment's ``defaults`` replace these defaults; ``data`` holds
    the options of the experiment's data builder. ``pretrained`` loads pretrained weights where the
    experiment's model has them; ``selective`` adds selective classification (ERM alone and the
    MaskTune rule) at ``coverages`` (%) on the test set ``selective_test`` (default: the first).
    ``mask_fill`` and ``mask_mixing`` say how MaskTune's masks are applied (see
    :class:`~masktune.MaskedDataset`; ``zero`` and ``own`` are the paper's; ``mask_mixing``
    ``"guarded"`` chooses ``own`` or ``own+other-class`` by the leakage of the own masks, see
    :data:`RECIPES`). ``num_workers`` ``None`` chooses DataLoader workers by the data (none for in-memory and cached
    images); ``precision`` and ``compile`` are those of :class:`~masktune.TrainSettings`.
    ``cache`` reads image-file datasets from their decoded-image cache (in ``cache_dir``, default
    ``$MASKTUNE_HOME/images``) instead of decoding every file in every stage."""

    experiment: str = "biased-mnist"
    seed: int = 0
    epochs: int = 3
    methods: tuple[str, ...] = METHODS
    out: str | None = None
    device: str = "cpu"
    data_dir: str | None = None
    limit: int | None = None
    cam_layer: str | None = None
    cam_method: str = "xgradcam"
    mask_rule: str = "mean-std"
    mask_param: float | None = None
    mask_fill: str = "zero"
    mask_mixing: str = "own"
    iterations: int = 1
    accumulate: bool = False
    masks: str | None = None
    batch_size: int = 128
    lr: float = 0.01
    finetune_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_workers: int | None = None
    precision: str = "auto"
    compile: bool = False
    cache: bool = True
    cache_dir: str | None = None
    tensorboard: bool = False
    optimizer: str = "sgd"
    pretrained: bool = True
    selective: bool = False
    coverages: tuple[float, ...] = COVERAGES
    selective_test: str | None = None
    mask_chunk: int = 8192
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        """Where the run writes: ``out``, or ``runs/<experiment>-seed<seed>``."""
        return Path(self.out) if self.out else Path("runs") / f"{self.experiment}-seed{self.seed}"

    @property
    def tuning_lr(self) -> float:
        """The finetunes' learning rate: ``finetune_lr``, or the ERM rate (as the authors)."""
        return self.finetune_lr if self.finetune_lr is not None else self.lr

    def validate(self) -> None:
        """Refuse settings that cannot work on their own, saying which and why: types (whole numbers
        where they are meant), ranges, finite numbers, known and distinct methods."""
        _check_types(self)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods must be distinct, got {', '.join(self.methods)}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"seed must be a whole number in 0..{MAX_SEED}, got {self.seed}")
        for name, low in (("batch_size", 1), ("num_workers", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"{name} must be at least {low}, got {value}")
        for name in ("lr", "finetune_lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.mask_param is not None and not math.isfinite(self.mask_param):
            raise ConfigError(f"mask_param must be a finite number, got {self.mask_param}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive number of images, got {self.limit}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        if self.selective and not {"erm", "masktune"} <= set(self.methods):
            raise ConfigError("selective classification compares ERM with the MaskTune rule: methods must include "
                              "erm and masktune")
        if not self.coverages or not all(0 < c <= 100 for c in self.coverages):
            raise ConfigError(f"coverages are percentages in (0, 100], got {self.coverages}")
        if self.mask_chunk < 1:
            raise ConfigError(f"mask_chunk must be a positive number of images, got {self.mask_chunk}")


def recipe_settings(name: str) -> dict[str, Any]:
    """The settings of the recipe called ``name`` (:data:`RECIPES`), to pass as overrides."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def _check_types(config: RunConfig) -> None:
    """Refuse a typed value of the wrong type (text is converted by :func:`coerce`; a Python caller
    may pass anything): a whole number where one is meant, a number where one is meant."""
    for name, kind in setting_types().items():
        value = getattr(config, name)
        options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
        if value is None and type(None) in options:
            continue
        base = next(option for option in options if option is not type(None))
        wrong = base in (int, float, bool) and (
            (base is bool) != isinstance(value, bool) or not isinstance(value, int if base is int else (int, float)))
        if wrong:
            what = {int: "a whole number", float: "a number", bool: "true or false"}[base]
            raise ConfigError(f"{name} must be {what}, got {value!r}")


def setting_types() -> dict[str, Any]:
    """The type of each :class:`RunConfig` setting that can be overridden (all but ``experiment`` and ``data``)."""
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if f.name not in ("experiment", "data")}


def type_of(default: Any) -> Any:
    """The type of a data option, from its default value (a tuple: of its first item)."""
    if isinstance(default, tuple):
        return tuple[type(default[0]), ...] if default else tuple[str, ...]
    return type(default)


def coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` as the type ``kind`` (``int``, ``float | None``, ``tuple[str, ...]``, ...).

    Text (e.g. from ``--set``) is parsed: ``none`` for an optional setting, ``true``/``false`` for
    a flag, whole numbers for integers, comma-separated items for tuples. Typed values pass through,
    an int where a float is meant becomes a float and a list a tuple.
    """
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else ()
    if options:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        kind = next(option for option in options if option is not type(None))
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        items = value.strip().strip("()[]").split(",") if isinstance(value, str) else value
        try:
            return tuple(coerce(key, part.strip() if isinstance(part, str) else part, item)
                         for part in items if not isinstance(part, str) or part.strip())
        except ConfigError:
            what = {int: "whole numbers", float: "numbers"}.get(item, "values")
            raise ConfigError(f"{key} must be {what} separated by commas (e.g. 255,0,0 for a colour), "
                              f"got {value!r}") from None
    if not isinstance(value, str):
        return float(value) if kind is float and isinstance(value, int) and not isinstance(value, bool) else value
    text = value.strip()
    if kind is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return text.lower() in ("true", "1", "yes")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key} must be a whole number, got {value!r}") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {value!r}") from None
    return value


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (the ``--set`` option) as a dict."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides
