"""Datasets of image files: each file decoded into the *mask view*, the deterministic geometry the
model sees (resized and centre-cropped, raw values in [0, 1], no normalisation), so saliency masks
are computed and applied on the same pixels. Normalisation lives in the model
(:class:`masktune.models.Normalized`) and random augmentation in the training loop
(:class:`masktune.data.BatchAugment`). Files decode lazily with PIL, one file per item (use
DataLoader workers); labels and metadata are held in memory.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import CorruptImageError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImageView:
    """How an image file becomes the mask view: optional centre square crop (the shorter side), then
    ``resize`` (an int resizes the shorter side, keeping the aspect ratio; a (height, width) pair
    resizes to exactly that), then a centre crop to ``size`` (height, width)."""

    size: tuple[int, int]
    resize: int | tuple[int, int] | None = None
    square_first: bool = False


def read_image(path: str | Path, view: ImageView) -> Tensor:
    """The image at ``path`` as RGB float32 ``[3, H, W]`` in [0, 1], in the geometry of ``view``.

    Raises :class:`CorruptImageError` naming the file when it is missing, truncated or not an image.
    """
    return decode_image(path, view).float().div_(255)


def decode_image(path: str | Path, view: ImageView) -> Tensor:
    """The image at ``path`` as RGB uint8 ``[3, H, W]`` in the geometry of ``view`` (see :func:`read_image`)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot read image {path}: {exc}. The file is missing, truncated or not an image; restore it from "
            "the original archive, or remove it (and its metadata row) from the dataset"
        ) from exc
    if view.square_first:
        image = TF.center_crop(image, [min(image.size)])
    if view.resize is not None:
        resize = [view.resize] if isinstance(view.resize, int) else list(view.resize)
        image = TF.resize(image, resize, interpolation=TF.InterpolationMode.BILINEAR)
    if (image.height, image.width) != tuple(view.size):
        image = TF.center_crop(image, list(view.size))
    return TF.pil_to_tensor(image)


class ImageFiles(Dataset):
    """Images decoded lazily from files: yields ``(image [3, H, W] in [0, 1], label)``.

    ``labels`` (int64 [N]) and ``metadata`` (per-sample tensors, e.g. ``"spurious"``) are held in
    memory, so labels and groups are known without decoding a single image.
    """

    def __init__(self, paths: Sequence[str | Path], labels: Tensor, view: ImageView,
                 metadata: dict[str, Tensor] | None = None, name: str = "") -> None:
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.view = view
        self.metadata = dict(metadata or {})
        self.name = name
        if len(self.labels) != len(self.paths) or any(len(v) != len(self.paths) for v in self.metadata.values()):
            raise DataError(f"{name}: paths, labels and metadata must have one entry per image")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Image ``index`` as (float32 image [3, H, W] in [0, 1], int label)."""
        return read_image(self.paths[index], self.view), int(self.labels[index])

    def select(self, index: Tensor) -> ImageFiles:
        """The images at ``index`` (a 1-D index tensor), metadata included."""
        return ImageFiles([self.paths[i] for i in index.tolist()], self.labels[index], self.view,
                          {k: v[index] for k, v in self.metadata.items()}, self.name)

    def subset(self, n: int) -> ImageFiles:
        """The first ``n`` images (all of them if ``n >= len(self)``)."""
        return self.select(torch.arange(min(n, len(self))))


def scan_class_folders(folder: Path, classes: Sequence[str] | None = None) -> tuple[list[Path], Tensor, list[str]]:
    """Image files in ``folder/<class>/`` (ImageFolder layout): sorted paths, labels (class index in
    ``classes``, default: the sorted sub-folder names) and the class names. Other files are ignored."""
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    classes = list(classes) if classes is not None else found
    if sorted(classes) != found:
        raise DataError(f"{folder} has class folders {found}, expected {sorted(classes)} (as in the training set)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} in its class folders)")
    return paths, torch.tensor(labels, dtype=torch.long), classes



def require(path: Path, what: str, how: str) -> Path:
    """``path``, which must exist; else a :class:`DataError` naming ``what`` and saying ``how`` to get it."""
    if not path.exists():
        raise DataError(f"{what} not found: expected {path}. {how}")
    return path


def read_csv(path: Path, required: Sequence[str], how: str) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts of stripped strings; the ``required`` columns must be there."""
    require(path, path.name, how)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path} lacks the column(s) {', '.join(missing)}; its columns: {', '.join(columns)}. {how}")
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in rows]


def int_column(rows: list[dict[str, str]], column: str, path: Path) -> Tensor:
    """The integers of ``column`` in ``rows`` (read from ``path``) as an int64 tensor."""
    try:
        return torch.tensor([int(row[column]) for row in rows], dtype=torch.long)
    except ValueError as exc:
        raise DataError(f"{path}: column {column!r} must hold integers ({exc})") from exc

