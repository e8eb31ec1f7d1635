"""Experiments: named, versioned recipes (data, model, the authors' hyperparameters), the registry
that ``masktune run <name>`` looks them up in, and the configuration of a run of one.

Register an experiment of your own with :func:`register`; the paper's are registered when
:mod:`masktune.pipeline` is imported (:mod:`masktune.pipeline.experiments`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError
from .config import RunConfig, coerce, setting_types, type_of


@dataclass
class ExperimentData:
    """What an experiment trains and tests on. Datasets yield ``(raw image [C, H, W], label)``; a
    ``metadata["spurious"]`` value per sample, where present, defines the groups. ``augment``
    transforms each training batch (after masking), e.g. a :class:`~masktune.BatchAugment`;
    ``feature_region`` [H, W] marks the pixels of a known spurious feature, for the mask diagnostics."""

    train: Dataset
    val: Dataset | None
    tests: dict[str, Dataset]
    num_classes: int
    feature_region: torch.Tensor | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Experiment:
    """A named, versioned experiment: data, model and the authors' hyperparameters. ``defaults``
    replace :class:`RunConfig`'s defaults; ``data_options`` are the options of ``build_data`` (with
    their defaults), set as ``data.<option>``. ``summarize`` derives extra figures of a method from
    its metrics per test set (e.g. the BG-gap)."""

    name: str
    version: int
    description: str
    build_data: Callable[[RunConfig], ExperimentData]
    build_model: Callable[[RunConfig, int], nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    data_options: Mapping[str, Any] = field(default_factory=dict)
    summarize: Callable[[Mapping[str, dict]], dict] | None = None


EXPERIMENTS: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Add ``experiment`` to :data:`EXPERIMENTS` (``masktune run <name>``); returns it."""
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def get_experiment(name: str) -> Experiment:
    """The registered experiment called ``name``."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def make_config(experiment: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The configuration of ``experiment``: its defaults, then ``overrides``.

    Keys are :class:`RunConfig` field names, or ``data.<option>`` for the experiment's data
    options. Values are typed values or text (as ``--set`` gives them), converted to the setting's
    type (:func:`~masktune.pipeline.config.coerce`). Unknown keys are refused.
    """
    spec = get_experiment(experiment)
    kinds = setting_types()
    base = RunConfig()
    values = {name: getattr(base, name) for name in kinds} | dict(spec.defaults)
    data = dict(spec.data_options)
    for key, value in (overrides or {}).items():
        if key.startswith("data."):
            option = key[len("data."):]
            if option not in data:
                raise ConfigError(f"unknown option {key!r} for {experiment}; options: "
                                  + ", ".join(f"data.{k}" for k in sorted(data)))
            data[option] = coerce(key, value, type_of(data[option]))
        elif key in kinds:
            values[key] = coerce(key, value, kinds[key])
        else:
            raise ConfigError(f"unknown setting {key!r}; settings: {', '.join(sorted(kinds))}, data.<option>")
    return RunConfig(experiment=experiment, data=data, **values)
