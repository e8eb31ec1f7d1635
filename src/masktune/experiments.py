"""Experiments: named, versioned configurations and the pipeline that runs any of them.

An :class:`Experiment` says how to build the data and the model and which hyperparameters the
authors used; :func:`run_experiment` runs ERM, the chosen finetunes and the evaluation for it and
writes ``results.json`` and the checkpoints into the run directory.
"""

from __future__ import annotations

import ast
import dataclasses
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from . import __version__
from .distributed import resolve_device
from .errors import MaskTuneError
from .evaluation import evaluate_logits, group_counts
from .masking import make_rule
from .saliency import get_method
from .selective import COVERAGES, selective_classification
from .training import OPTIMIZERS, labels_of, predict

METHODS = ("erm", "randmask", "masktune")


class ConfigError(MaskTuneError, ValueError):
    """A setting is unknown or has a value that cannot work."""


@dataclass
class RunConfig:
    """Every setting of a run. An experiment's ``defaults`` replace these defaults; ``data`` holds
    the options of the experiment's data builder. ``pretrained`` loads pretrained weights where the
    experiment's model has them; ``selective`` adds selective classification (ERM alone and the
    MaskTune rule) at ``coverages`` (%) on the test set ``selective_test`` (default: the first)."""

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
    iterations: int = 1
    accumulate: bool = False
    masks: str | None = None
    batch_size: int = 128
    lr: float = 0.01
    finetune_lr: float | None = None
    momentum: float = 0.9
    weight_decay: float = 1e-4
    num_workers: int = 0
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

    def validate(self) -> None:
        """Refuse settings that cannot work, saying which and why."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be a positive number of images, got {self.limit}")
        if self.iterations < 1:
            raise ConfigError(f"iterations must be at least 1, got {self.iterations}")
        make_rule(self.mask_rule, self.mask_param)
        get_method(self.cam_method)
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.selective and not {"erm", "masktune"} <= set(self.methods):
            raise ConfigError("selective classification compares ERM with the MaskTune rule: methods must include "
                              "erm and masktune")
        if not self.coverages or not all(0 < c <= 100 for c in self.coverages):
            raise ConfigError(f"coverages are percentages in (0, 100], got {self.coverages}")
        if self.mask_chunk < 1:
            raise ConfigError(f"mask_chunk must be a positive number of images, got {self.mask_chunk}")
        resolve_device(self.device)


@dataclass
class ExperimentData:
    """What an experiment trains and tests on. Datasets yield ``(raw image [C, H, W], label)``; a
    ``metadata["spurious"]`` value per sample, where present, defines the groups. ``augment``
    transforms each training batch (after masking), e.g. a :class:`~masktune.augment.BatchAugment`."""

    train: Dataset
    val: Dataset | None
    tests: dict[str, Dataset]
    num_classes: int
    feature_region: torch.Tensor | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class Experiment:
    """A named, versioned experiment: data, model and the authors' hyperparameters. ``summarize``
    derives extra figures of a method from its metrics per test set (e.g. the BG-gap)."""

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
    """Add ``experiment`` to :data:`EXPERIMENTS` (``masktune run <name>``)."""
    EXPERIMENTS[experiment.name] = experiment
    return experiment


def get_experiment(name: str) -> Experiment:
    """The registered experiment called ``name``."""
    if name not in EXPERIMENTS:
        raise ConfigError(f"unknown experiment {name!r}; available: {', '.join(sorted(EXPERIMENTS))}")
    return EXPERIMENTS[name]


def _coerce(key: str, value: Any, like: Any) -> Any:
    """``value`` (often a command-line string) converted to the type of the default ``like``."""
    if not isinstance(value, str) or isinstance(like, str):
        return value
    if value.lower() in ("none", "null"):
        return None
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    if isinstance(like, bool):
        if value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(like, tuple):
        items = parsed if isinstance(parsed, tuple) else tuple(v.strip() for v in value.split(",") if v.strip())
        return tuple(_coerce(key, str(v), like[0]) if like else v for v in items)
    if isinstance(like, (int, float)) and not isinstance(parsed, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(parsed) if isinstance(like, float) else parsed


def make_config(experiment: str, overrides: Mapping[str, Any] | None = None) -> RunConfig:
    """The configuration of ``experiment``: its defaults, then ``overrides``.

    Keys are :class:`RunConfig` field names, or ``data.<option>`` for the experiment's data
    options; string values are converted to the type of the default. Unknown keys are refused.
    """
    spec = get_experiment(experiment)
    fields = {f.name: f for f in dataclasses.fields(RunConfig) if f.name not in ("experiment", "data")}
    base = RunConfig()
    values = {name: getattr(base, name) for name in fields} | dict(spec.defaults)
    data = dict(spec.data_options)
    for key, value in (overrides or {}).items():
        if key.startswith("data."):
            option = key[len("data."):]
            if option not in data:
                raise ConfigError(f"unknown option {key!r} for {experiment}; options: "
                                  + ", ".join(f"data.{k}" for k in sorted(data)))
            data[option] = _coerce(key, value, data[option])
        elif key in fields:
            like = values[key] if values[key] is not None else {"limit": 0, "finetune_lr": 0.0}.get(key, "")
            values[key] = _coerce(key, value, like)
        else:
            raise ConfigError(f"unknown setting {key!r}; settings: {', '.join(sorted(fields))}, data.<option>")
    return RunConfig(experiment=experiment, data=data, **values)


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (the ``--set`` option) as a dict."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set takes key=value, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


class StageTimer:
    """Wall time of each named stage, in seconds."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def environment(device: str) -> dict[str, str]:
    """Versions and hardware, for the results file."""
    return {
        "masktune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.processor() or "cpu",
        "threads": str(torch.get_num_threads()),
    }


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` samples of ``dataset`` (all of it for ``None``)."""
    if limit is None or limit >= len(dataset):
        return dataset
    subset = getattr(dataset, "subset", None)
    return subset(limit) if subset is not None else torch.utils.data.Subset(dataset, range(limit))


def evaluate_methods(spec: Experiment, config: RunConfig, models: dict[str, nn.Module], val: Dataset | None,
                     tests: dict[str, Dataset], full_train: Dataset) -> tuple[dict, dict]:
    """Metrics of each method on each test set (groups weighted by the training set's proportions),
    the experiment's summary figures and, when asked, selective classification."""
    train_metadata = getattr(full_train, "metadata", {})
    train_groups = group_counts(labels_of(full_train), train_metadata) if "spurious" in train_metadata else {}
    evaluated = [method for method in METHODS if method in config.methods]
    logits = {method: {name: predict(models[method], dataset, device=config.device, num_workers=config.num_workers)
                       for name, dataset in tests.items()} for method in evaluated}
    accuracies = {method: evaluate_logits(logits[method], tests, train_group_counts=train_groups or None)
                  for method in evaluated}
    extra: dict[str, Any] = {"train_group_counts": train_groups}
    if spec.summarize is not None:
        extra["summary"] = {method: spec.summarize(accuracies[method]) for method in evaluated}
    if config.selective:
        val_logits = {m: predict(models[m], val, device=config.device, num_workers=config.num_workers)
                      for m in ("erm", "masktune")}
        by_test_set = {name: selective_classification(val_logits["erm"], val_logits["masktune"], logits["erm"][name],
                                                      logits["masktune"][name], labels_of(dataset), config.coverages)
                       for name, dataset in tests.items()}
        chosen = config.selective_test or next(iter(tests))
        extra["selective"] = {method: {"test_set": chosen, **r} for method, r in by_test_set[chosen].items()}
        if len(tests) > 1:
            extra["selective_by_test_set"] = by_test_set
    return accuracies, extra


def run_experiment(config: RunConfig, *, progress: bool = True) -> dict:
    """Run ERM and the chosen finetunes of ``config``'s experiment; write checkpoints and results.

    Returns the results dictionary that is also written to ``config.out_dir / "results.json"``. A
    run killed at any point continues where it stopped when started again with the same settings
    (see :mod:`masktune.runner`); under torchrun it runs on all processes.
    """
    from .runner import run  # the pipeline imports this module's registry

    return run(config, progress=progress)


# The registered experiments live in configs.py, which imports this module: import it last.
from . import configs  # noqa: E402,F401
