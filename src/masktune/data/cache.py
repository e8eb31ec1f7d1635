"""The decoded-image cache: an image-file dataset decoded once, in its mask view, into a uint8
memory-mapped file that every stage of a run, and later runs, read instead of the image files.

The cache of a dataset lives in ``<cache dir>/<dataset name>-<view key>-<image count>.u8`` (the cache dir is
``$MASKTUNE_HOME/images`` unless given) with a JSON file beside it holding the image count and
shape and a fingerprint of the file list (paths, sizes and modification times). It is built in
parallel (DataLoader workers decode, the main process writes), written through a temporary file
and renamed, its JSON file written last; on open the size and the fingerprint are checked, and a
stale, incomplete or damaged cache is rebuilt (the JSON file also holds the data's SHA-256, checked
on open whenever the file's size or modification time is not the one recorded). Processes that open the same cache at once take a file lock:
one builds it, the others wait and then read it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..errors import StorageError
from ..storage import masktune_home, verified, write_json
from .base import ImageDataset, labels_of
from .files import ImageFiles, decode_image

CACHE_FORMAT = "masktune.images/1"


def fingerprint(files: ImageFiles) -> str:
    """SHA-256 of the view and of every file's path, size and modification time, in order."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{files.view!r}\n".encode())
    for path in files.paths:
        stat = os.stat(path) if os.path.exists(path) else None
        digest.update(f"{path}\0{stat.st_size if stat else -1}\0{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 that changes when ``dataset``'s samples change: of the pixels and labels of in-memory
    images, of the file list (:func:`fingerprint`) for image files and their cache, of the base's
    fingerprint and the indices for a ``Subset``; of the length and labels for any other dataset."""
    digest = hashlib.sha256()
    if isinstance(dataset, torch.utils.data.Subset):
        digest.update(data_fingerprint(dataset.dataset).encode())
        digest.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
    elif isinstance(dataset, ImageDataset):
        digest.update(dataset.images.contiguous().numpy().tobytes())
        digest.update(dataset.labels.numpy().tobytes())
    elif isinstance(dataset, (ImageFiles, CachedImages)):
        digest.update(fingerprint(dataset.files if isinstance(dataset, CachedImages) else dataset).encode())
        digest.update(dataset.labels.numpy().tobytes())
    else:
        digest.update(f"{type(dataset).__name__}|{len(dataset)}|".encode())
        digest.update(labels_of(dataset).numpy().tobytes())
    return digest.hexdigest()


class _Decoded(Dataset):
    """The files of an :class:`ImageFiles` decoded to uint8, for the workers that build a cache."""

    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Tensor:
        return decode_image(self.files.paths[index], self.files.view)


class CachedImages(Dataset):
    """An :class:`ImageFiles` dataset read from its decoded-image cache (see :func:`cache_images`).

    Samples are the same as the files' (``image [3, H, W]`` float in [0, 1], label), bit for bit;
    batches (``__getitems__``) are uint8, so they cross the DataLoader as bytes and become float on
    the device. ``labels``, ``metadata``, ``paths``, ``view`` and ``name`` are the files'.
    """

    def __init__(self, files: ImageFiles, array: np.ndarray, rows: Tensor | None = None) -> None:
        self.files = files
        self.array = array
        self.rows = torch.arange(len(files)) if rows is None else rows
        self.labels, self.metadata, self.paths = files.labels, files.metadata, files.paths
        self.view, self.name = files.view, files.name

    def __len__(self) -> int:
        """Number of images."""
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Image ``index`` as (float32 image [3, H, W] in [0, 1], int label)."""
        return torch.from_numpy(np.array(self.array[int(self.rows[index])])).float().div_(255), int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """A batch as (uint8 images [B, 3, H, W], int64 labels [B])."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return torch.from_numpy(self.array[self.rows[index].numpy()]), self.labels[index]

    def select(self, index: Tensor) -> CachedImages:
        """The images at ``index`` (a 1-D index tensor), metadata included."""
        return CachedImages(self.files.select(index), self.array, self.rows[index])

    def subset(self, n: int) -> CachedImages:
        """The first ``n`` images (all of them if ``n >= len(self)``)."""
        return self.select(torch.arange(min(n, len(self))))


def _cache_path(files: ImageFiles, folder: Path) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", files.name or "images")
    # the image count is in the name, so that a run on the first N images (--limit) does not replace
    # the cache of the whole split
    return folder / f"{name}-{hashlib.sha256(repr(files.view).encode()).hexdigest()[:12]}-{len(files)}.u8"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _valid(path: Path, meta_path: Path, shape: list[int], key: str) -> bool:
    """Whether the cache at ``path`` is complete and current: its description matches (format,
    shape, file-list fingerprint) and so does its data: by size, and by checksum unless the file's
    size and modification time are those recorded when it was written."""
    try:
        meta = verified(json.loads(meta_path.read_text()), str(meta_path))
        stat = path.stat()
    except (OSError, ValueError, StorageError):
        return False
    if meta.get("format") != CACHE_FORMAT or meta.get("shape") != shape or meta.get("fingerprint") != key:
        return False
    if stat.st_size != int(np.prod(shape)):
        return False
    return stat.st_mtime_ns == meta.get("mtime_ns") or _file_digest(path) == meta.get("sha256")


def _build(files: ImageFiles, path: Path, shape: list[int], workers: int, progress: bool) -> str:
    """Decode ``files`` into the cache file ``path`` (atomically); returns the data's SHA-256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    try:
        array = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=tuple(shape))
        loader = DataLoader(_Decoded(files), batch_size=64, num_workers=workers)
        start = 0
        with tqdm(total=len(files), desc=f"caching {files.name or 'images'}", unit="image", disable=not progress,
                  leave=False) as bar:
            for batch in loader:
                array[start:start + len(batch)] = batch.numpy()
                digest.update(batch.numpy().tobytes())
                start += len(batch)
                bar.update(len(batch))
        array.flush()
        del array
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


def cache_images(files: ImageFiles, cache_dir: str | Path | None = None, *, workers: int = 2,
                 progress: bool = True) -> CachedImages:
    """``files`` read from their decoded-image cache, built first when missing or stale.

    The cache holds every image in the mask view as uint8 (see the module's description); building
    it decodes each file once with ``workers`` DataLoader worker processes. A file that cannot be
    decoded stops the build with a :class:`~masktune.errors.CorruptImageError` naming it.
    """
    height, width = files.view.size
    if len(files) == 0:
        return CachedImages(files, np.zeros((0, 3, height, width), dtype=np.uint8))
    folder = Path(cache_dir) if cache_dir is not None else masktune_home() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = _cache_path(files, folder)
    meta_path = path.with_name(path.name + ".json")
    shape, key = [len(files), 3, height, width], fingerprint(files)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait here, then find it built
        if not _valid(path, meta_path, shape, key):
            meta_path.unlink(missing_ok=True)
            data_sha256 = _build(files, path, shape, workers, progress)
            write_json({"format": CACHE_FORMAT, "shape": shape, "fingerprint": key, "name": files.name,
                        "sha256": data_sha256, "mtime_ns": path.stat().st_mtime_ns}, meta_path)
    return CachedImages(files, np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(shape)))
