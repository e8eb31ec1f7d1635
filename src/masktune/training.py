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
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from tqdm.auto import tqdm

from . import distributed
from ._io import load_torch, save_torch
from .data import DataError
from .errors import MaskTuneError
from .models import eval_mode, fastest_memory_format


class TrainingError(MaskTuneError, RuntimeError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _collate(batch: Any) -> Any:
    # A dataset's __getitems__ may already return a batch as a tuple of tensors.
    return batch if isinstance(batch, tuple) else default_collate(batch)


class EpochBatches(Sampler[list[int]]):
    """The batches of one training epoch: a permutation seeded by ``seed`` cut into batches of
    ``batch_size``. Process ``shard`` of ``shards`` takes its contiguous slice of every batch, so the
    processes of a distributed run together see the same batches as a single process."""

    def __init__(self, n: int, batch_size: int, seed: int, shard: int = 0, shards: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shard, self.shards = n, batch_size, seed, shard, shards

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        for batch in order.split(self.batch_size):
            part = batch.tensor_split(self.shards)[self.shard]
            # a last batch smaller than the number of processes: the ones left without a sample
            # repeat one, as DistributedDataParallel needs every process to take each step
            yield (part if len(part) else batch[self.shard % len(batch):][:1]).tolist()


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> DataLoader:
    """A DataLoader that uses a dataset's batched ``__getitems__`` when it has one.

    Shuffling (and the seeds of worker processes) derive from ``seed`` alone, never from the global
    random state, so epoch ``e`` of a run can be replayed from ``seed`` and ``e``. Under torchrun a
    shuffled loader yields this process's slice of each batch (:class:`EpochBatches`).
    """
    if shuffle:
        batching = {"batch_sampler": EpochBatches(len(dataset), batch_size, seed, distributed.rank(),
                                                  distributed.world_size())}
    else:
        batching = {"batch_size": batch_size}
    return DataLoader(
        dataset,
        **batching,
        generator=torch.Generator().manual_seed(seed),
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


def check_labels(labels: torch.Tensor, num_classes: int, where: str) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (``num_classes``: the model's outputs)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"the {where} labels range over {int(labels.min())}..{int(labels.max())}, but the model has "
            f"{num_classes} outputs, so labels must lie in 0..{num_classes - 1}; give the model one output "
            f"per class, or map the labels to 0..{num_classes - 1}"
        )


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    desc: str = "train",
    progress: bool = True,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """One pass of cross-entropy training; returns the mean loss and accuracy (%) over the epoch
    (over all processes' batches under torchrun).

    ``augment``, when given, transforms each batch of images on ``device`` before the forward pass.
    """
    model.train()
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    memory_format = None
    for images, labels, *_ in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
        images = images.to(device, non_blocking=True)
        if augment is not None:
            images = augment(images)
        if memory_format is None:
            memory_format = fastest_memory_format(distributed.unwrap(model), images[:1])
        logits = model(images.contiguous(memory_format=memory_format))
        labels = torch.as_tensor(labels)
        check_labels(labels, logits.shape[1], "training")  # on the host: no device sync
        labels = labels.to(device, non_blocking=True)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
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


@torch.inference_mode()
def predict(
    model: nn.Module, dataset: Dataset, *, batch_size: int = 512, device: torch.device | str | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Logits of ``model`` (in eval mode) for every sample of ``dataset``, as a CPU tensor [N, classes]."""
    device = torch.device(device) if device is not None else model_device(model)
    outputs = []
    memory_format = None
    with eval_mode(model):
        for images, *_ in make_loader(dataset, batch_size, num_workers=num_workers, device=device):
            images = images.to(device, non_blocking=True)
            if memory_format is None:
                memory_format = fastest_memory_format(model, images[:1])
            outputs.append(model(images.contiguous(memory_format=memory_format)).float().cpu())
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
    resume: bool = False,
    progress: bool = True,
    on_epoch: Callable[[dict], None] | None = None,
    optimizer: str = "sgd",
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> ERMResult:
    """Train ``model`` by ordinary ERM (the authors' SGD defaults) and keep the best and last checkpoints.

    "Best" is by plain validation accuracy (the last epoch when no ``val_set`` is given). With
    ``checkpoint_dir``, ``erm_best.pt`` and ``erm_last.pt`` are written there atomically each epoch;
    ``erm_last.pt`` also holds the history and the random state, and with ``resume`` training
    continues after the epoch it holds, with the same result as an uninterrupted run. Under
    torchrun the model trains in DistributedDataParallel, each process on its slice of every batch;
    rank 0 writes the checkpoints and receives ``on_epoch`` (each epoch's metrics). ``optimizer`` is
    ``"sgd"`` or ``"adam"`` (:func:`make_optimizer`); ``augment`` transforms each training batch
    (see :func:`train_epoch`).
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    optimizer = make_optimizer(optimizer, model, lr, momentum, weight_decay)
    folder = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result: ERMResult | None = None
    if resume and folder is not None and (folder / "erm_last.pt").is_file():
        saved = load_torch(folder / "erm_last.pt")
        if saved["epoch"] > epochs:
            raise TrainingError(f"{folder / 'erm_last.pt'} holds epoch {saved['epoch']}, more than the {epochs} "
                                "epochs asked for; ask for at least as many epochs, or use a new checkpoint folder")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        _set_rng_state(saved["rng_state"], device)
        result = ERMResult(best=_checkpoint(load_torch(folder / "erm_best.pt")), last=_checkpoint(saved),
                           history=saved["history"])
    history = result.history if result is not None else []
    start = result.last.epoch if result is not None else 0
    trainer = distributed.wrap(model, device)
    progress = progress and distributed.is_main()
    bar = tqdm(range(start, epochs), desc="ERM", unit="epoch", disable=not progress, initial=start, total=epochs)
    for epoch in bar:
        loader = make_loader(train_set, batch_size, shuffle=True, seed=seed * 100_003 + epoch,
                             num_workers=num_workers, device=device)
        try:
            metrics = train_epoch(trainer, loader, optimizer, device, f"ERM epoch {epoch + 1}", progress, augment)
        except TrainingError as error:
            kept = (f"{folder / 'erm_last.pt'} (epoch {epoch}) is the last good checkpoint"
                    if folder is not None and epoch > 0 else "no checkpoint was written")
            raise TrainingError(f"{error}; {kept}") from None
        distributed.broadcast_buffers(model)
        metrics = {"stage": "erm", "epoch": epoch + 1, **metrics}
        if val_set is not None:
            logits = distributed.map_shards(lambda part: predict(model, part, device=device), val_set)
            metrics["val_accuracy"] = accuracy(logits, labels_of(val_set))
        history.append(metrics)
        last = Checkpoint(snapshot(model), snapshot(optimizer), epoch + 1, metrics.get("val_accuracy"))
        improved = result is None or val_set is None or last.val_accuracy > result.best.val_accuracy
        result = ERMResult(best=last if improved else result.best, last=last, history=history)
        if folder is not None and distributed.is_main():
            # best before last: a kill between the two writes replays this epoch, which improves
            # on nothing then and leaves the best checkpoint as it is
            if improved:
                save_torch(vars(last), folder / "erm_best.pt")
            save_torch({**vars(last), "history": history, "rng_state": _rng_state(device)}, folder / "erm_last.pt")
        bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k in ("loss", "accuracy", "val_accuracy")})
        if on_epoch is not None and distributed.is_main():
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
    batch after masking. Returns the metrics of each epoch. Under torchrun it trains in
    DistributedDataParallel.
    """
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    if isinstance(optimizer, str):
        optimizer = continued_optimizer(optimizer, model, lr, momentum, weight_decay, optimizer_state)
    trainer = distributed.wrap(model, device)
    progress = progress and distributed.is_main()
    history = []
    for epoch in range(epochs):
        loader = make_loader(train_set, batch_size, shuffle=True, seed=seed * 100_003 + 50_000 + epoch,
                             num_workers=num_workers, device=device)
        history.append({"stage": desc, "epoch": epoch + 1,
                        **train_epoch(trainer, loader, optimizer, device, f"{desc} epoch {epoch + 1}", progress,
                                     augment)})
        distributed.broadcast_buffers(model)
    return history
