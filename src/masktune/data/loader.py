"""Batches: the DataLoader every stage reads through, and the seeded batches of a training epoch."""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from .. import distributed
from ..errors import DataError
from .files import ImageFiles


def _collate(batch: Any) -> Any:
    # A dataset's __getitems__ may already return a batch as a tuple of tensors.
    if isinstance(batch, tuple):
        return batch
    try:
        return default_collate(batch)
    except RuntimeError as error:
        shapes = sorted({tuple(sample[0].shape) for sample in batch if isinstance(sample[0], torch.Tensor)})
        raise DataError(f"the images of one batch differ in size ({', '.join(map(str, shapes[:4]))}): masktune "
                        "batches images of one size; give the dataset a fixed view (resize and crop every image "
                        "to the model's input size)") from error


class EpochBatches(Sampler[list[int]]):
    """The batches of one training epoch: a permutation seeded by ``seed`` cut into batches of
    ``batch_size``. Process ``shard`` of ``shards`` takes its contiguous slice of every batch, so the
    processes of a distributed run together see the same batches as a single process.

    A last batch of one sample, which a model with BatchNorm cannot train on, is folded into the
    batch before it, so every sample is still seen once per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shard: int = 0, shards: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.shard, self.shards = n, batch_size, seed, shard, shards

    def _folds_last(self) -> bool:
        return self.n > self.batch_size and self.n % self.batch_size == 1

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size) - self._folds_last()

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        batches = list(order.split(self.batch_size))
        if self._folds_last():
            batches[-2:] = [torch.cat(batches[-2:])]
        for batch in batches:
            part = batch.tensor_split(self.shards)[self.shard]
            # a last batch smaller than the number of processes: the ones left without a sample
            # repeat one, as DistributedDataParallel needs every process to take each step
            yield (part if len(part) else batch[self.shard % len(batch):][:1]).tolist()


def default_workers(dataset: Dataset) -> int:
    """DataLoader workers for ``dataset``: one per CPU core up to 8 for image files decoded sample
    by sample (:class:`~masktune.data.ImageFiles`, also inside a ``Subset`` or a masked dataset),
    else none (in-memory images and the decoded-image cache serve whole batches, where workers only
    add copies; a dataset of your own gets the ``num_workers`` you give)."""
    while isinstance(dataset, Subset) or hasattr(dataset, "base"):
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.base
    return min(8, os.cpu_count() or 1) if isinstance(dataset, ImageFiles) else 0


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    num_workers: int | None = None,
    device: torch.device | str = "cpu",
) -> DataLoader:
    """A DataLoader that uses a dataset's batched ``__getitems__`` when it has one.

    Shuffling (and the seeds of worker processes) derive from ``seed`` alone, never from the global
    random state, so epoch ``e`` of a run can be replayed from ``seed`` and ``e``; a shuffled
    loader's ``batch_sampler`` is an :class:`EpochBatches` whose ``seed`` can be set for each epoch,
    so one loader (and its worker processes, which persist) serves every epoch. Under torchrun a
    shuffled loader yields this process's slice of each batch. ``num_workers=None`` chooses
    :func:`default_workers`. Memory is pinned for a CUDA ``device``.
    """
    num_workers = default_workers(dataset) if num_workers is None else num_workers
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
        persistent_workers=shuffle and num_workers > 0,
    )


def to_device(images: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A batch of images on ``device`` as float in [0, 1]. A uint8 batch (0..255, e.g. from the
    decoded-image cache) crosses to the device as bytes and becomes float there."""
    images = images.to(device, non_blocking=True)
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def first_batch(dataset: Dataset, device: torch.device | str) -> torch.Tensor:
    """The first image of ``dataset`` as a batch of one, on ``device``."""
    if len(dataset) == 0:
        raise DataError("the dataset is empty; check the data path and any --limit")
    return dataset[0][0].unsqueeze(0).to(device)
