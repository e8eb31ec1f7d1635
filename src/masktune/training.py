"""Training: ordinary ERM with its best and last checkpoints, finetuning, and prediction.

:class:`TrainSettings` holds what every training function shares (learning rate, optimizer,
batches, seed, device, augmentation); ERM and the finetunes of one run differ only in it and in
their number of epochs. Every function here puts the model on ``settings.device`` (or the device
given) itself and moves each batch there.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed
from .data.base import check_labels, labels_of
from .data.loader import make_loader, to_device
from .errors import ConfigError, DataError, RunDirError, TrainingError
from .models import autocast, autocast_dtype, eval_mode, fastest_memory_format, place
from .storage import load_torch, save_torch

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainSettings:
    """The settings every training function shares; the defaults are the authors' (SPEC.md section 2).

    ``optimizer`` is ``"sgd"`` (SGD with ``momentum`` and ``weight_decay``) or ``"adam"`` (Adam with
    ``weight_decay``). ``seed`` fixes the order of the batches. ``device`` is where the model
    trains (``None``: where it is). ``num_workers``: DataLoader workers (``None``: none for
    in-memory and cached data, one per core up to 8 for image files). ``augment`` transforms each
    training batch ``[B, C, H, W]`` on the device, after masking (e.g. a
    :class:`~masktune.BatchAugment`); it must keep the batch's shape. ``precision``: ``"auto"``
    (bfloat16 autocast on CUDA, float32 elsewhere), ``"float32"``, ``"bfloat16"`` or ``"float16"``
    (with a gradient scaler). ``compile`` trains a ``torch.compile``-d model. ``progress`` shows
    progress bars.
    """

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 128
    optimizer: str = "sgd"
    seed: int = 0
    device: torch.device | str | None = None
    num_workers: int | None = None
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    precision: str = "auto"
    compile: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a whole number of at least 1, got {self.batch_size!r}")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ConfigError(f"num_workers must be None or a whole number >= 0, got {self.num_workers!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        autocast_dtype(self.precision, "cpu")  # refuses an unknown precision


def make_optimizer(model: nn.Module, settings: TrainSettings, state: dict | None = None) -> torch.optim.Optimizer:
    """The optimizer ``settings.optimizer`` over ``model``'s parameters at ``settings.lr``, continuing
    an optimizer ``state`` dict when given (copied: loading alone would share its tensors, and
    training would change them)."""
    if settings.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum,
                                    weight_decay=settings.weight_decay)
    elif settings.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    else:
        raise ConfigError(f"unknown optimizer {settings.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if state is not None:
        optimizer.load_state_dict(copy.deepcopy(state))
        for group in optimizer.param_groups:
            group["lr"] = settings.lr
    return optimizer


def snapshot(module: nn.Module | torch.optim.Optimizer) -> dict:
    """A detached deep copy of a module's or optimizer's state dict."""
    return copy.deepcopy(module.state_dict())


@dataclass
class Checkpoint:
    """Model and optimizer state at the end of an epoch."""

    model: dict
    optimizer: dict
    epoch: int
    val_accuracy: float | None = None


@dataclass
class ERMResult:
    """The outcome of :func:`train_erm`: the best-by-validation and the last checkpoint."""

    best: Checkpoint
    last: Checkpoint
    history: list[dict] = field(default_factory=list)


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> dict[str, float]:
    """One pass of cross-entropy training of ``model`` (already on ``device``); returns the mean loss
    and accuracy (%) over the epoch (over all processes' batches under torchrun).

    ``augment``, when given, transforms each batch of images on ``device`` before the forward pass.
    ``dtype`` is the autocast dtype of the forward pass (None: float32); ``scaler`` scales the loss
    (float16).
    """
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    memory_format = None
    for images, labels, *_ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images = to_device(images, device)
        if augment is not None:
            images = _augmented(augment, images)
        if memory_format is None:
            memory_format = fastest_memory_format(distributed.unwrap(model), images[:1])
        with autocast(device, dtype):
            logits = model(images.contiguous(memory_format=memory_format))
        labels = torch.as_tensor(labels)
        check_labels(labels, logits.shape[1], "training")  # on the host: no device sync
        labels = labels.to(device, non_blocking=True)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    total_loss, correct, seen = distributed.all_reduce_sum(
        torch.stack([total_loss, correct.double(), torch.tensor(seen, dtype=torch.float64, device=device)])).tolist()
    mean_loss = total_loss / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the training loss became {mean_loss} during {desc}; lower the learning rate or check the inputs "
            "for NaN values"
        )
    return {"loss": mean_loss, "accuracy": 100.0 * correct / max(seen, 1)}


def _augmented(augment: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    out = augment(images)
    if not isinstance(out, torch.Tensor) or out.shape != images.shape:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"augment must return a batch of the shape it was given, {tuple(images.shape)}, got "
                          f"{shape}; it transforms whole batches [B, C, H, W] on the device")
    return out


@torch.inference_mode()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: torch.device | str | None = None,
    num_workers: int | None = None, precision: str = "auto",
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode, on ``device``; default: where it is) for every sample of
    ``dataset``, as a float32 CPU tensor [N, classes]; ``precision`` as in :class:`TrainSettings`."""
    device = place(model, device)
    dtype = autocast_dtype(precision, device)
    outputs = []
    memory_format = None
    with eval_mode(model):
        for images, *_ in make_loader(dataset, batch_size, num_workers=num_workers, device=device):
            images = to_device(images, device)
            if memory_format is None:
                memory_format = fastest_memory_format(model, images[:1])
            with autocast(device, dtype):
                outputs.append(model(images.contiguous(memory_format=memory_format)).float().cpu())
    return torch.cat(outputs)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _checkpoint(saved: dict) -> Checkpoint:
    return Checkpoint(saved["model"], saved["optimizer"], saved["epoch"], saved["val_accuracy"])


def _resume(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            epochs: int, identity: str | None) -> ERMResult:
    """The ERM run saved in ``folder``, loaded into ``model``, ``optimizer`` and the random state."""
    last, best = folder / "erm_last.pt", folder / "erm_best.pt"
    if not best.is_file():
        raise TrainingError(f"{folder} holds {last.name} without {best.name}, which is written before it; delete "
                            f"{last} to train ERM again from the start")
    saved = load_torch(last, fix=f"delete it (and {best.name}) to train ERM again from the start")
    if identity is not None and saved.get("identity") != identity:
        raise RunDirError(f"{last} was made by a run with other settings or data than this one; to continue that "
                          "run, run its command again; for a new run, pass another --out (or delete the folder)")
    if saved["epoch"] > epochs:
        raise TrainingError(f"{last} holds epoch {saved['epoch']}, more than the {epochs} epochs asked for; ask "
                            "for at least as many epochs, or use a new checkpoint folder")
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    _set_rng_state(saved["rng_state"], device)
    return ERMResult(best=_checkpoint(load_torch(best, fix=f"delete it and {last.name} to train ERM again")),
                     last=_checkpoint(saved), history=saved["history"])


@dataclass
class _Loop:
    """What a training run keeps over its epochs: the model it steps (in DistributedDataParallel under
    torchrun, compiled when asked), one loader (its workers persist), the autocast dtype and the
    gradient scaler (float16)."""

    trainer: nn.Module
    loader: DataLoader
    device: torch.device
    settings: TrainSettings
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None
    progress: bool

    @classmethod
    def start(cls, model: nn.Module, train_set: Dataset, settings: TrainSettings, device: torch.device) -> _Loop:
        trainer = distributed.wrap(model, device)
        trainer = torch.compile(trainer) if settings.compile else trainer
        dtype = autocast_dtype(settings.precision, device)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        loader = make_loader(train_set, settings.batch_size, shuffle=True, seed=settings.seed,
                             num_workers=settings.num_workers, device=device)
        return cls(trainer, loader, device, settings, dtype, scaler, settings.progress and distributed.is_main())

    def epoch(self, optimizer: torch.optim.Optimizer, seed: int, desc: str) -> dict[str, float]:
        """One epoch whose batches come from ``seed`` (see :class:`~masktune.data.EpochBatches`)."""
        self.loader.batch_sampler.seed = seed
        return train_epoch(self.trainer, self.loader, optimizer, self.device, desc, self.progress,
                           self.settings.augment, self.dtype, self.scaler)


def _epoch_seed(seed: int, epoch: int, finetune: bool = False) -> int:
    """The seed of the batches of one epoch: ERM and finetunes never share an order."""
    return seed * 100_003 + (50_000 if finetune else 0) + epoch


def train_erm(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    settings: TrainSettings = TrainSettings(),
    *,
    epochs: int = 100,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict], None] | None = None,
    identity: str | None = None,
) -> ERMResult:
    """Train ``model`` by ordinary ERM for ``epochs`` and keep the best and last checkpoints.

    "Best" is by plain validation accuracy (the last epoch when no ``val_set`` is given). With
    ``checkpoint_dir``, ``erm_best.pt`` and ``erm_last.pt`` are written there atomically each epoch;
    ``erm_last.pt`` also holds the history and the random state, and with ``resume`` training
    continues after the epoch it holds, with the same result as an uninterrupted run. Under
    torchrun the model trains in DistributedDataParallel, each process on its slice of every batch;
    rank 0 writes the checkpoints and receives ``on_epoch`` (each epoch's metrics). ``identity``
    (e.g. a run's settings and data, hashed) is saved in the checkpoints, and resuming from
    checkpoints saved with another one is refused.
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    if len(train_set) == 0:
        raise DataError("the training set is empty; check the data and any limit")
    if val_set is not None and len(val_set) == 0:
        raise DataError("the validation set is empty; pass val_set=None to train without one (the last epoch is "
                        "then the best)")
    device = place(model, settings.device)
    optimizer = make_optimizer(model, settings)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    resumed = resume and folder is not None and (folder / "erm_last.pt").is_file()
    result = _resume(folder, model, optimizer, device, epochs, identity) if resumed else None
    history = result.history if result is not None else []
    start = result.last.epoch if result is not None else 0
    loop = _Loop.start(model, train_set, settings, device)
    bar = tqdm(range(start, epochs), desc="ERM", unit="epoch", disable=not loop.progress, initial=start, total=epochs)
    for epoch in bar:
        try:
            metrics = loop.epoch(optimizer, _epoch_seed(settings.seed, epoch), f"ERM epoch {epoch + 1}")
        except TrainingError as error:
            kept = (f"{folder / 'erm_last.pt'} (epoch {epoch}) is the last good checkpoint"
                    if folder is not None and epoch > 0 else "no checkpoint was written")
            raise TrainingError(f"{error}; {kept}") from None
        distributed.broadcast_buffers(model)
        metrics = {"stage": "erm", "epoch": epoch + 1, **metrics}
        if val_set is not None:
            logits = distributed.map_shards(lambda part: predict(model, part, device=device, precision=settings.precision,
                                                                 num_workers=settings.num_workers), val_set)
            metrics["val_accuracy"] = accuracy(logits, labels_of(val_set))
        history.append(metrics)
        result = _next_result(result, model, optimizer, metrics, history, val_set is not None)
        if folder is not None and distributed.is_main():
            _save_epoch(folder, result, history, device, identity)
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "accuracy", "val_accuracy")})
        if on_epoch is not None and distributed.is_main():
            on_epoch(metrics)
    return result


def _next_result(result: ERMResult | None, model: nn.Module, optimizer: torch.optim.Optimizer, metrics: dict,
                 history: list[dict], validated: bool) -> ERMResult:
    last = Checkpoint(snapshot(model), snapshot(optimizer), metrics["epoch"], metrics.get("val_accuracy"))
    improved = result is None or not validated or last.val_accuracy > result.best.val_accuracy
    return ERMResult(best=last if improved else result.best, last=last, history=history)


def _save_epoch(folder: Path, result: ERMResult, history: list[dict], device: torch.device,
                identity: str | None) -> None:
    # best before last: a kill between the two writes replays this epoch, which improves on nothing
    # then and leaves the best checkpoint as it is
    if result.best is result.last:
        save_torch({**vars(result.last), "identity": identity}, folder / "erm_best.pt")
    save_torch({**vars(result.last), "history": history, "rng_state": _rng_state(device), "identity": identity},
               folder / "erm_last.pt")


def finetune(
    model: nn.Module,
    train_set: Dataset,
    settings: TrainSettings = TrainSettings(),
    *,
    epochs: int = 1,
    optimizer_state: dict | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "finetune",
) -> list[dict]:
    """Finetune ``model`` in place on ``train_set`` (e.g. a :class:`~masktune.MaskedDataset`).

    MaskTune finetunes the *last* ERM checkpoint for one epoch, continuing its optimizer
    (``optimizer_state``, e.g. ``ERMResult.last.optimizer``, of the kind ``settings.optimizer``)
    with learning rate ``settings.lr``. ``optimizer``, when given, is used as it is instead (it
    keeps its state for a later call). Returns the metrics of each epoch. Under torchrun it trains
    in DistributedDataParallel.
    """
    device = place(model, settings.device)
    if optimizer is None:
        optimizer = make_optimizer(model, settings, optimizer_state)
    loop = _Loop.start(model, train_set, settings, device)
    history = []
    for epoch in range(epochs):
        metrics = loop.epoch(optimizer, _epoch_seed(settings.seed, epoch, finetune=True), f"{desc} epoch {epoch + 1}")
        history.append({"stage": desc, "epoch": epoch + 1, **metrics})
        distributed.broadcast_buffers(model)
    return history
