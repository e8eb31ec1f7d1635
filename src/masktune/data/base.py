"""The dataset contract masktune works with, and the helpers every stage uses on any dataset.

A dataset is any :class:`torch.utils.data.Dataset` whose samples are ``(image, label, ...)``: the
image a raw (un-normalised) float tensor ``[C, H, W]``, the label an int. Optional attributes make
it faster or richer, never required: ``labels`` (all labels at once, without reading the images),
``metadata`` (per-sample tensors; ``metadata["spurious"]`` defines the groups of the group
metrics), ``__getitems__`` (a whole batch at once) and ``subset(n)`` (the first ``n`` samples).
:class:`ImageDataset` is masktune's own in-memory dataset with all of them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import DataError


class ImageDataset(Dataset):
    """In-memory image dataset: uint8 images [N,C,H,W], int64 labels [N], and per-sample metadata."""

    def __init__(
        self, images: Tensor, labels: Tensor, metadata: dict[str, Tensor] | None = None, name: str = ""
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"images must be a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise DataError(f"labels must have shape [{len(images)}] to match the images, got {tuple(labels.shape)}")
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if len(value) != len(images):
                raise DataError(f"metadata[{key!r}] has {len(value)} entries for {len(images)} images")
        self.images = images
        self.labels = labels.long()
        self.metadata = metadata
        self.name = name

    @property
    def num_classes(self) -> int:
        """Number of classes, max label + 1 (0 for an empty dataset)."""
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        """Sample `i` as (float32 image [C,H,W] in [0, 1], int label)."""
        return self.images[i].float().div_(255), int(self.labels[i])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """A batch as (float32 images [B,C,H,W] in [0, 1], int64 labels [B]); DataLoader's fast path."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index].float().div_(255), self.labels[index]

    def select(self, index: Tensor) -> ImageDataset:
        """The samples at ``index`` (a 1-D index tensor), metadata included."""
        return ImageDataset(self.images[index], self.labels[index], {k: v[index] for k, v in self.metadata.items()},
                            self.name)

    def subset(self, n: int) -> ImageDataset:
        """The first `n` samples (all of them if `n >= len(self)`), metadata included."""
        if n < 0:
            raise DataError(f"subset size must be >= 0, got {n}")
        metadata = {key: value[:n] for key, value in self.metadata.items()}
        return ImageDataset(self.images[:n], self.labels[:n], metadata, self.name)


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` samples of ``dataset`` (all of it for ``None``)."""
    if limit is None or limit >= len(dataset):
        return dataset
    subset = getattr(dataset, "subset", None)
    return subset(limit) if subset is not None else Subset(dataset, range(limit))


def holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random split into (rest, held out), holding out ``floor(fraction * N)`` samples.

    A dataset with a ``select(index)`` method (:class:`ImageDataset`, ``ImageFiles``) keeps its
    type, labels and metadata; any other becomes two :class:`torch.utils.data.Subset`.
    """
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    cut = int(fraction * len(dataset))
    parts = order[cut:], order[:cut]
    select = getattr(dataset, "select", None)
    if select is None:
        return Subset(dataset, parts[0].tolist()), Subset(dataset, parts[1].tolist())
    return select(parts[0]), select(parts[1])


def labels_of(dataset: Dataset) -> Tensor:
    """All labels of ``dataset``: its ``labels`` attribute when present (also through a ``Subset``
    or a dataset wrapping a ``base``), else read sample by sample."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.long)
    if isinstance(dataset, Subset):
        return labels_of(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if hasattr(dataset, "base"):
        return labels_of(dataset.base)
    return torch.as_tensor([dataset[i][1] for i in range(len(dataset))], dtype=torch.long)


def check_labels(labels: Tensor, num_classes: int, where: str) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (``num_classes``: the model's outputs)."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"the {where} labels range over {int(labels.min())}..{int(labels.max())}, but the model has "
            f"{num_classes} outputs, so labels must lie in 0..{num_classes - 1}; give the model one output "
            f"per class, or map the labels to 0..{num_classes - 1}"
        )
