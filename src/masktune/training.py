"""ERM training, the one-epoch MaskTune finetune, prediction, and the data loaders they share."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate
from tqdm.auto import tqdm

from ._io import save_torch
from .errors import MaskTuneError
from .models import eval_mode


class TrainingError(MaskTuneError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _collate(batch: Any) -> Any:
    # A dataset's __getitems__ may already return a batch as a tuple of tensors.
    return batch if isinstance(batch, tuple) else default_collate(batch)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> DataLoader:
    """A DataLoader that uses a dataset's batched ``__getitems__`` when it has one; shuffling is
    seeded by ``seed`` alone, so epoch ``e`` of a run can be replayed from ``seed`` and ``e``."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
    )


def first_batch(dataset: Dataset, device: torch.device | str) -> torch.Tensor:
    """The first image of ``dataset`` as a batch of one, on ``device``."""
    if len(dataset) == 0:
        raise MaskTuneError("the dataset is empty; check the data path and any --limit")
    return dataset[0][0].unsqueeze(0).to(device)


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


def sgd(model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4) -> torch.optim.SGD:
    """The authors' optimizer: SGD with momentum and weight decay."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 1e-4) -> torch.optim.Optimizer:
    """``"sgd"`` (:func:`sgd`) or ``"adam"`` (Adam with ``weight_decay``; ``momentum`` unused), as the authors."""
    if name == "sgd":
        return sgd(model, lr, momentum, weight_decay)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    raise MaskTuneError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def continued_optimizer(
    name: str, model: nn.Module, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
    state: dict | None = None,
) -> torch.optim.Optimizer:
    """:func:`make_optimizer` continuing an optimizer ``state`` dict (when given), with learning rate
    ``lr``. ``state`` is copied: loading alone would share its tensors, and training would change them."""
    optimizer = make_optimizer(name, model, lr, momentum, weight_decay)
    if state is not None:
        optimizer.load_state_dict(copy.deepcopy(state))
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass of cross-entropy training; returns the mean loss and accuracy (%) over the epoch.

    ``augment``, when given, transforms each batch of images on ``device`` before the forward pass.
    """
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels, *_ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        labels = torch.as_tensor(labels).to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        logits = model(images)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    mean_loss = total_loss.item() / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"the training loss became {mean_loss} during {desc}; lower the learning rate or check the inputs "
            "for NaN values (the last good checkpoint was kept)"
        )
    return {"loss": mean_loss, "accuracy": 100.0 * correct.item() / max(seen, 1)}


@torch.inference_mode()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: torch.device | str | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for every sample of ``dataset``, as a CPU tensor [N, classes]."""
    device = torch.device(device) if device is not None else model_device(model)
    outputs = []
    with eval_mode(model):
        for images, *_ in make_loader(dataset, batch_size, num_workers=num_workers, device=device):
            outputs.append(model(images.to(device, non_blocking=True)).float().cpu())
    return torch.cat(outputs)


def labels_of(dataset: Dataset) -> torch.Tensor:
    """All labels of ``dataset``: its ``labels`` attribute when present, else read sample by sample."""
    labels = getattr(dataset, "labels", None)
    if labels is None and hasattr(dataset, "base"):
        return labels_of(dataset.base)
    if labels is None:
        labels = [dataset[i][1] for i in range(len(dataset))]
    return torch.as_tensor(labels, dtype=torch.long)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy in percent."""
    return 100.0 * (logits.argmax(1) == labels).float().mean().item()


def train_erm(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None = None,
    *,
    epochs: int = 100,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    optimizer: str = "sgd",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ERMResult:
    """Train ``model`` by ordinary ERM (the authors' SGD defaults) and keep the best and last checkpoints.

    "Best" is by plain validation accuracy (the last epoch when no ``val_set`` is given). With
    ``checkpoint_dir``, ``erm_best.pt`` and ``erm_last.pt`` are written there atomically each epoch.
    ``on_epoch`` receives each epoch's metrics. ``optimizer`` is ``"sgd"`` or ``"adam"``
    (:func:`make_optimizer`); ``augment`` transforms each training batch (see :func:`train_epoch`).
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    optimizer = make_optimizer(optimizer, model, lr, momentum, weight_decay)
    result: ERMResult | None = None
    history: list[dict] = []
    bar = tqdm(range(epochs), desc="ERM", unit="epoch", disable=not progress)
    for epoch in bar:
        loader = make_loader(train_set, batch_size, shuffle=True, seed=seed * 100_003 + epoch,
                             num_workers=num_workers, device=device)
        metrics = {"stage": "erm", "epoch": epoch + 1, **train_epoch(model, loader, optimizer, device,
                                                                      f"ERM epoch {epoch + 1}", progress, augment)}
        if val_set is not None:
            metrics["val_accuracy"] = accuracy(predict(model, val_set, device=device), labels_of(val_set))
        last = Checkpoint(snapshot(model), snapshot(optimizer), epoch + 1, metrics.get("val_accuracy"))
        improved = result is None or val_set is None or last.val_accuracy > result.best.val_accuracy
        result = ERMResult(best=last if improved else result.best, last=last, history=history)
        history.append(metrics)
        if checkpoint_dir is not None:
            if improved:
                save_torch(vars(last), Path(checkpoint_dir) / "erm_best.pt")
            save_torch(vars(last), Path(checkpoint_dir) / "erm_last.pt")
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "accuracy", "val_accuracy")})
        if on_epoch is not None:
            on_epoch(metrics)
    if result is None:
        raise MaskTuneError("epochs must be at least 1")
    return result


def finetune(
    model: nn.Module,
    train_set: Dataset,
    *,
    optimizer_state: dict | None = None,
    lr: float = 0.01,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    epochs: int = 1,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "finetune",
    optimizer: str | torch.optim.Optimizer = "sgd",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[dict]:
    """Finetune ``model`` in place on ``train_set`` (e.g. a :class:`~masktune.MaskedDataset`).

    MaskTune finetunes the *last* ERM checkpoint for one epoch, continuing its optimizer
    (``optimizer_state``, e.g. ``ERMResult.last.optimizer``) with learning rate ``lr``.
    ``optimizer`` names the optimizer the state belongs to (``"sgd"`` or ``"adam"``), or is an
    optimizer to use as it is (it keeps its state for a later call); ``augment`` transforms each
    batch after masking. Returns the metrics of each epoch.
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    if isinstance(optimizer, str):
        optimizer = continued_optimizer(optimizer, model, lr, momentum, weight_decay, optimizer_state)
    history = []
    for epoch in range(epochs):
        loader = make_loader(train_set, batch_size, shuffle=True, seed=seed * 100_003 + 50_000 + epoch,
                             num_workers=num_workers, device=device)
        history.append({"stage": desc, "epoch": epoch + 1,
                        **train_epoch(model, loader, optimizer, device, f"{desc} epoch {epoch + 1}", progress,
                                     augment)})
    return history
