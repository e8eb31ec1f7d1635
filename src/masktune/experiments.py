"""The biased-MNIST experiment, end to end: data, ERM, masks, finetunes, evaluation, results file."""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from . import __version__
from ._io import save_torch, write_json
from .data import BiasedMNISTConfig, load_mnist, make_biased_mnist
from .errors import MaskTuneError
from .evaluation import evaluate, mask_diagnostics
from .masking import compute_masks, make_rule, masktune_finetune, random_square_masks
from .masksets import MaskSet
from .models import SmallCNN, resolve_cam_layer
from .saliency import get_method
from .training import train_erm

METHODS = ("erm", "randmask", "masktune")


@dataclass
class RunConfig:
    """Every setting of a biased-MNIST run; the defaults are the authors' except ``epochs``."""

    experiment: str = "biased-mnist"
    epochs: int = 3
    seed: int = 0
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
    data: BiasedMNISTConfig = field(default_factory=BiasedMNISTConfig)

    @property
    def out_dir(self) -> Path:
        """Where the run writes: ``out``, or ``runs/<experiment>-seed<seed>``."""
        return Path(self.out) if self.out else Path("runs") / f"{self.experiment}-seed{self.seed}"

    def validate(self) -> None:
        """Refuse settings that cannot work, saying which and why."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise MaskTuneError(f"unknown method(s) {unknown or '(none given)'}; choose from {', '.join(METHODS)}")
        if self.epochs < 1:
            raise MaskTuneError(f"--epochs must be at least 1, got {self.epochs}")
        if self.limit is not None and self.limit < 1:
            raise MaskTuneError(f"--limit must be a positive number of images, got {self.limit}")
        if self.iterations < 1:
            raise MaskTuneError(f"--iterations must be at least 1, got {self.iterations}")
        make_rule(self.mask_rule, self.mask_param)
        get_method(self.cam_method)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise MaskTuneError(f"device {self.device!r} is not available (no CUDA GPU visible); use --device cpu")


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


def run_biased_mnist(config: RunConfig, *, progress: bool = True) -> dict:
    """Run ERM and the chosen finetunes on biased MNIST; write checkpoints and ``results.json``.

    Returns the results dictionary that is also written to ``config.out_dir / "results.json"``.
    """
    config.validate()
    out = config.out_dir
    timer = StageTimer()
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    with timer("data"):
        data = make_biased_mnist(load_mnist(config.data_dir), config.data)
        train = data.train.subset(config.limit) if config.limit else data.train
        val = data.val.subset(config.limit) if config.limit else data.val
        tests = {name: data_set.subset(config.limit) if config.limit else data_set
                 for name, data_set in (("original", data.test_original), ("biased", data.test_biased))}
    train_args = dict(momentum=config.momentum, weight_decay=config.weight_decay, batch_size=config.batch_size,
                      seed=config.seed, device=config.device, num_workers=config.num_workers, progress=progress)

    model = SmallCNN(num_classes=2)
    layer, _ = resolve_cam_layer(model, config.cam_layer, train[0][0].unsqueeze(0))  # fail before training
    mask_settings = dict(layer=layer, method=config.cam_method, rule=make_rule(config.mask_rule, config.mask_param))
    reused = None
    if config.masks and "masktune" in config.methods:
        expected = {"cam_method": get_method(config.cam_method).name, "layer": layer,
                    "rule": repr(mask_settings["rule"])}
        reused = MaskSet.load(config.masks, dataset=train, expect=expected)
    with timer("erm"):
        erm = train_erm(model, train, val, epochs=config.epochs, lr=config.lr,
                        checkpoint_dir=out / "checkpoints", **train_args)
    model.load_state_dict(erm.best.model)
    models = {"erm": model}
    diagnostics = {}
    finetune_lr = config.finetune_lr if config.finetune_lr is not None else config.lr

    def finetuned(name: str, masks: MaskSet | torch.Tensor, **iterate) -> tuple[SmallCNN, list]:
        tuned = SmallCNN(num_classes=2)
        tuned.load_state_dict(erm.last.model)
        with timer(f"finetune_{name}"):
            result = masktune_finetune(tuned, train, masks, optimizer_state=erm.last.optimizer, lr=finetune_lr,
                                       desc=name, **iterate, **train_args)
        erm.history.extend(result.history)
        save_torch(tuned.state_dict(), out / "checkpoints" / f"{name}.pt")
        return tuned, result.masks

    if "randmask" in config.methods:
        generator = torch.Generator().manual_seed(config.seed)
        masks = random_square_masks(len(train), *train.images.shape[-2:], generator=generator)
        diagnostics["randmask"] = mask_diagnostics(masks, train.metadata["spurious"], data.feature_region)
        models["randmask"], _ = finetuned("randmask", masks)
    if "masktune" in config.methods:
        with timer("masking"):
            if reused is not None:
                reused.check(model=model, source=config.masks)
                masks = reused
            else:
                masks = compute_masks(model, train, device=config.device, num_workers=config.num_workers,
                                      progress=progress, **mask_settings)
        models["masktune"], iterations = finetuned(
            "masktune", masks, iterations=config.iterations, accumulate=config.accumulate, **mask_settings)
        for i, masks in enumerate(iterations, 1):
            masks.save(out / "masks" / ("masktune.pt" if i == 1 else f"masktune_iteration{i}.pt"))
            key = "masktune" if i == 1 else f"masktune_iteration{i}"
            diagnostics[key] = mask_diagnostics(masks.unpack(), train.metadata["spurious"], data.feature_region)

    with timer("evaluation"):
        accuracies = {method: evaluate(models[method], tests, device=config.device)
                      for method in METHODS if method in models and method in config.methods}
    timer.seconds["total"] = round(time.perf_counter() - started, 3)
    config_dict = asdict(config)
    config_dict.update(out=str(out), finetune_lr=finetune_lr, methods=list(config.methods))
    results = {
        "config": config_dict,
        "environment": environment(config.device),
        "sizes": {"train": len(train), "val": len(val), **{k: len(v) for k, v in tests.items()}},
        "accuracy": accuracies,
        "masking": diagnostics,
        "erm_best_epoch": erm.best.epoch,
        "history": erm.history,
        "timings_s": timer.seconds,
    }
    write_json(results, out / "results.json")
    return results
