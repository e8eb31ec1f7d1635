"""What a run records about itself: the configuration as saved, the wall time of each stage, the
versions and hardware, and the results dictionary written as ``results.json``."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator

import torch

from .. import distributed
from ..masks.rules import make_rule
from ..storage import checksum
from ..version import __version__
from .config import RunConfig
from .registry import Experiment
from .rundir import RESUMABLE_CHANGES


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


def environment(device: torch.device) -> dict[str, str]:
    """Versions and hardware, for the results file."""
    return {
        "masktune": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": str(torch.get_num_threads()),
    }


def saved_config(spec: Experiment, config: RunConfig) -> dict:
    """The configuration as ``config.json`` records it (a resumed run must match it), normalised: the
    mask rule's parameter and the finetune learning rate as used, so that giving a default
    explicitly matches a run that left it out."""
    return {"experiment": spec.name, "version": spec.version,
            **asdict(config) | {"mask_param": make_rule(config.mask_rule, config.mask_param).value,
                                "finetune_lr": config.tuning_lr},
            "world_size": distributed.launched_world_size()}


def run_key(spec: Experiment, config: RunConfig, fingerprints: dict[str, str]) -> str:
    """The identity of a run's results: SHA-256 of its settings (those that change results) and of
    its data's fingerprints. Every saved stage output carries it; a run refuses one that differs."""
    settings = {k: v for k, v in saved_config(spec, config).items() if k not in RESUMABLE_CHANGES}
    return checksum({"settings": settings, "data": fingerprints})


def results_record(spec: Experiment, config: RunConfig, device: torch.device, sizes: dict[str, int],
                   outcome: dict, timer: StageTimer, resumed: bool) -> dict:
    """The dictionary written as ``results.json``; ``outcome`` holds ``accuracy`` and the other
    figures of the evaluation, ``masking``, ``erm_best_epoch`` and ``history``. Its ``config`` is
    the configuration as ``config.json`` records it, with the run directory."""
    timer.seconds["total"] = round(sum(timer.seconds.values()), 3)
    recorded = saved_config(spec, config) | {"out": str(config.out_dir)}
    return {
        "config": recorded,
        "environment": {**environment(device), "world_size": str(distributed.world_size())},
        "sizes": sizes,
        **outcome,
        "timings_s": timer.seconds,
        "resumed": resumed,
    }
