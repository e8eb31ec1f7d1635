"""Loaders of the paper's other datasets, each reading the real on-disk format (SPEC.md section 3).

Every loader returns plain :class:`torch.utils.data.Dataset` objects that yield ``(image, label)``:
the image is the deterministic *mask view* (decoded, resized and centre-cropped to the model input,
raw values in [0, 1], no normalisation), so saliency masks are computed and applied in the geometry
the model sees; normalisation lives in the model (:class:`masktune.models.Normalized`) and random
augmentation in the training loop (:class:`masktune.augment.BatchAugment`). Datasets of image files
decode lazily with PIL, one file per item (use DataLoader workers); CIFAR-10 and SVHN are small
enough to hold in memory as uint8. Per-sample ``metadata["spurious"]`` defines the groups.
"""

from __future__ import annotations

import csv
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .data import DataError, ImageDataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IN9L_TESTS = ("original", "mixed_same", "mixed_rand", "mixed_next")
SPLITS = {"0": "train", "1": "val", "2": "test"}  # Waterbirds / CelebA split codes


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded; the message names the file."""


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
    return TF.pil_to_tensor(image).float().div_(255)


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


def holdout(dataset: ImageDataset | ImageFiles, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A seeded random split into (rest, held out), holding out ``floor(fraction * N)`` samples."""
    if not 0 < fraction < 1:
        raise DataError(f"the validation fraction must be in (0, 1), got {fraction}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    cut = int(fraction * len(dataset))
    parts = order[cut:], order[:cut]
    if isinstance(dataset, ImageFiles):
        return dataset.select(parts[0]), dataset.select(parts[1])
    return tuple(ImageDataset(dataset.images[p], dataset.labels[p], {k: v[p] for k, v in dataset.metadata.items()},
                              dataset.name) for p in parts)


def _require(path: Path, what: str, how: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found: expected {path}. {how}")
    return path


def _read_csv(path: Path, required: Sequence[str], how: str) -> list[dict[str, str]]:
    _require(path, path.name, how)
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


def _int_column(rows: list[dict[str, str]], column: str, path: Path) -> Tensor:
    try:
        return torch.tensor([int(row[column]) for row in rows], dtype=torch.long)
    except ValueError as exc:
        raise DataError(f"{path}: column {column!r} must hold integers ({exc})") from exc


def _split_sets(codes: Tensor, path: Path, build: Callable[[str, Tensor], ImageFiles]) -> dict[str, ImageFiles]:
    """``build(split name, row indices)`` for each of the split codes 0/1/2 (train/val/test)."""
    result = {}
    for code, name in SPLITS.items():
        index = (codes == int(code)).nonzero().squeeze(1)
        if not len(index):
            raise DataError(f"{path}: no image has split code {code} ({name}); the file is incomplete")
        result[name] = build(name, index)
    return result


WATERBIRDS_HOW = ("Waterbirds is the folder waterbird_complete95_forest2water2 of the GroupDRO release "
                  "(https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz) or WILDS' "
                  "waterbirds_v1.0; pass the folder holding metadata.csv as --data-dir")


def load_waterbirds(root: str | Path, image_size: int = 224) -> dict[str, ImageFiles]:
    """Waterbirds ``train``/``val``/``test`` from ``root/metadata.csv`` (img_id, img_filename, y, split,
    place, place_filename; split 0/1/2) and the images under ``root``. Label: bird type (1 =
    waterbird); ``metadata["spurious"]``: place (1 = water). View as the authors: resize to
    (256/224 * size) squared, centre crop ``image_size``."""
    root = Path(root)
    path = root / "metadata.csv"
    rows = _read_csv(path, ("img_filename", "y", "split", "place"), WATERBIRDS_HOW)
    resized = int(image_size * 256 / 224)
    view = ImageView((image_size, image_size), resize=(resized, resized))
    labels, places, splits = (_int_column(rows, c, path) for c in ("y", "place", "split"))
    return _split_sets(splits, path, lambda name, index: ImageFiles(
        [root / rows[i]["img_filename"] for i in index.tolist()], labels[index], view,
        {"spurious": places[index].bool()}, f"waterbirds/{name}"))


CELEBA_HOW = ("CelebA needs list_attr_celeba.csv, list_eval_partition.csv and the folder img_align_celeba/ in "
              "--data-dir, as in the Kaggle release (kaggle.com/datasets/jessicali9530/celeba-dataset; the official "
              "site mmlab.ie.cuhk.edu.hk/projects/CelebA.html has the same data as .txt lists)")


def load_celeba(root: str | Path, target: str = "Blond_Hair", spurious: str = "Male",
                image_size: int = 224) -> dict[str, ImageFiles]:
    """CelebA ``train``/``val``/``test`` (list_eval_partition.csv 0/1/2): label = attribute ``target``,
    ``metadata["spurious"]`` = attribute ``spurious`` (attributes -1/1 read as 0/1). Images from
    ``root/img_align_celeba/`` (or the Kaggle layout ``img_align_celeba/img_align_celeba/``). View as the
    authors: centre square crop (178 px), resized to ``image_size``."""
    root = Path(root)
    attr_path, split_path = root / "list_attr_celeba.csv", root / "list_eval_partition.csv"
    attrs = _read_csv(attr_path, ("image_id",), CELEBA_HOW)
    for attribute in (target, spurious):
        if attrs and attribute not in attrs[0]:
            names = ", ".join(k for k in attrs[0] if k != "image_id")
            raise DataError(f"CelebA has no attribute {attribute!r}; attributes: {names}")
    partition_rows = _read_csv(split_path, ("image_id", "partition"), CELEBA_HOW)
    partition = dict(zip((row["image_id"] for row in partition_rows),
                         _int_column(partition_rows, "partition", split_path).tolist()))
    images = _require(root / "img_align_celeba", "CelebA image folder", CELEBA_HOW)
    if (images / "img_align_celeba").is_dir():
        images = images / "img_align_celeba"
    missing = [row["image_id"] for row in attrs if row["image_id"] not in partition]
    if missing:
        raise DataError(f"{split_path} has no partition for {len(missing)} image(s), e.g. {missing[0]}")

    def flags(attribute: str) -> Tensor:
        values = _int_column(attrs, attribute, attr_path)
        if not ((values == 1) | (values == -1)).all():
            raise DataError(f"{attr_path}: attribute {attribute!r} must be -1 or 1 in every row")
        return values == 1

    labels, spurious_flags = flags(target).long(), flags(spurious)
    splits = torch.tensor([partition[row["image_id"]] for row in attrs])
    view = ImageView((image_size, image_size), resize=(image_size, image_size), square_first=True)
    return _split_sets(splits, split_path, lambda name, index: ImageFiles(
        [images / attrs[i]["image_id"] for i in index.tolist()], labels[index], view,
        {"spurious": spurious_flags[index]}, f"celeba/{name}"))


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


IN9L_HOW = ("The Background Challenge (github.com/MadryLab/backgrounds_challenge) provides the test variants "
            "(bg_challenge/<variant>/val/<class>/) and the IN-9L training data; --data-dir must hold train/ and val/ "
            "(class folders such as 00_dog) and the test folders original, mixed_same, mixed_rand, mixed_next, each "
            "with class folders directly, in <variant>/val/, test/<variant>/val/ or bg_challenge/<variant>/val/")


def _first_dir(candidates: Sequence[Path], what: str) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"{what} not found: looked for {', '.join(map(str, candidates))}. {IN9L_HOW}")


def load_in9l(root: str | Path, image_size: int = 224, tests: Sequence[str] = IN9L_TESTS) -> dict[str, ImageFiles]:
    """ImageNet-9L / the Background Challenge: ``train``, ``val`` and the test variants ``tests``
    (class folders, nine classes). View as the authors' test transform: shorter side resized to
    256/224 * ``image_size``, centre crop ``image_size``."""
    root = Path(root)
    view = ImageView((image_size, image_size), resize=int(image_size * 256 / 224))
    paths, labels, classes = scan_class_folders(_first_dir([root / "train"], "IN-9L training folder"))
    result = {"train": ImageFiles(paths, labels, view, name="in9l/train")}
    places = {"val": [root / "val"]}
    places |= {t: [root / t / "val", root / t, root / "test" / t / "val", root / "bg_challenge" / t / "val"] for t in tests}
    for split, candidates in places.items():
        paths, labels, _ = scan_class_folders(_first_dir(candidates, f"IN-9L {split} folder"), classes)
        result[split] = ImageFiles(paths, labels, view, name=f"in9l/{split}")
    return result


CIFAR10_HOW = ("download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and extract it into --data-dir "
               "(or run torchvision.datasets.CIFAR10(DATA_DIR, download=True) where there is internet)")


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only, so a data file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    _require(path, "CIFAR-10 batch", CIFAR10_HOW)
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError) as exc:
        raise DataError(f"cannot read CIFAR-10 batch {path}: {exc}; extract the archive again. {CIFAR10_HOW}") from exc
    if len(labels) != len(data) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels in 0-9; extract the archive again")
    return data, labels


def load_cifar10(root: str | Path) -> dict[str, ImageDataset]:
    """CIFAR-10 ``train`` (50,000) and ``test`` (10,000) from torchvision's layout,
    ``root/cifar-10-batches-py/{data_batch_1..5, test_batch}`` (or those files in ``root``)."""
    root = Path(root)
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    result = {}
    for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
        data, labels = zip(*(_cifar_batch(folder / name) for name in names))
        result[split] = ImageDataset(torch.from_numpy(np.concatenate(data)), torch.from_numpy(np.concatenate(labels)),
                                     name=f"cifar10/{split}")
    return result


SVHN_HOW = ("download http://ufldl.stanford.edu/housenumbers/train_32x32.mat and test_32x32.mat into --data-dir "
            "(torchvision's SVHN layout)")


def load_svhn(root: str | Path) -> dict[str, ImageDataset]:
    """SVHN ``train`` and ``test`` from ``root/{train,test}_32x32.mat`` (read with scipy); label 10
    (the digit 0) becomes 0, as in torchvision."""
    try:
        from scipy.io import loadmat
    except ImportError as exc:
        raise DataError("reading SVHN's .mat files needs scipy: pip install scipy (or masktune[datasets])") from exc
    result = {}
    for split in ("train", "test"):
        path = _require(Path(root) / f"{split}_32x32.mat", f"SVHN {split} file", SVHN_HOW)
        try:
            mat = loadmat(path)
            images = torch.from_numpy(np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 2, 0, 1)))
            labels = torch.from_numpy(np.asarray(mat["y"], dtype=np.int64).reshape(-1) % 10)
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
            raise DataError(f"cannot read SVHN file {path}: {exc}; download it again. {SVHN_HOW}") from exc
        if images.shape[1:] != (3, 32, 32) or len(images) != len(labels):
            raise DataError(f"{path}: expected X [32, 32, 3, N] and y [N, 1], got {tuple(mat['X'].shape)}, "
                            f"{tuple(mat['y'].shape)}")
        result[split] = ImageDataset(images, labels, name=f"svhn/{split}")
    return result


CATS_VS_DOGS_HOW = ("--data-dir must hold train/cat, train/dog, test/cat and test/dog (images of the Kaggle dogs-vs-cats "
                    "training set, kaggle.com/c/dogs-vs-cats, or Microsoft's PetImages, sorted into these folders)")


def load_cats_vs_dogs(root: str | Path, image_size: int = 64) -> dict[str, ImageFiles]:
    """Cats vs Dogs ``train`` and ``test`` from class folders ``root/{train,test}/<class>/``
    (classes sorted: cat = 0, dog = 1); images resized to ``image_size`` squared, as the authors."""
    root = Path(root)
    view = ImageView((image_size, image_size), resize=(image_size, image_size))
    for split in ("train", "test"):
        _require(root / split, f"Cats vs Dogs {split} folder", CATS_VS_DOGS_HOW)
    paths, labels, classes = scan_class_folders(root / "train")
    test_paths, test_labels, _ = scan_class_folders(root / "test", classes)
    return {"train": ImageFiles(paths, labels, view, name="catsvsdogs/train"),
            "test": ImageFiles(test_paths, test_labels, view, name="catsvsdogs/test")}


def load_image_csv(root: str | Path, csv_file: str = "metadata.csv", *, path_column: str = "path",
                   label_column: str = "label", split_column: str = "split", spurious_column: str = "spurious",
                   image_size: int = 224) -> dict[str, ImageFiles]:
    """Any grouped image dataset described by a CSV file: one row per image with its ``path_column``
    (relative to ``root``), ``label_column`` (integers, or names numbered in sorted order),
    ``split_column`` (``train``, ``val``, any other name is a test set, in order of first appearance;
    0/1/2 mean train/val/test) and,
    optionally, ``spurious_column`` (integers: the attribute that defines the groups with the label).
    View: shorter side resized to 256/224 * ``image_size``, centre crop ``image_size``."""
    root = Path(root)
    path = root / csv_file
    how = (f"write {path} with columns {path_column}, {label_column}, {split_column} and optionally "
           f"{spurious_column}; the column names are options (data.path_column, ...)")
    rows = _read_csv(path, (path_column, label_column, split_column), how)
    if not rows:
        raise DataError(f"{path} has no rows")
    raw_labels = [row[label_column] for row in rows]
    if all(v.lstrip("-").isdigit() for v in raw_labels):
        labels = torch.tensor([int(v) for v in raw_labels])
    else:
        names = sorted(set(raw_labels))
        labels = torch.tensor([names.index(v) for v in raw_labels])
    metadata = {"spurious": _int_column(rows, spurious_column, path)} if spurious_column in rows[0] else {}
    splits = [SPLITS.get(row[split_column], row[split_column]) for row in rows]
    if "train" not in splits:
        raise DataError(f"{path}: no row has {split_column} = train (or 0); found {sorted(set(splits))}")
    view = ImageView((image_size, image_size), resize=int(image_size * 256 / 224))
    result = {}
    for split in sorted(dict.fromkeys(splits), key=lambda s: ("train", "val").index(s) if s in ("train", "val") else 2):
        index = torch.tensor([i for i, s in enumerate(splits) if s == split])
        result[split] = ImageFiles([root / rows[i][path_column] for i in index.tolist()], labels[index], view,
                                   {k: v[index] for k, v in metadata.items()}, f"{csv_file}/{split}")
    return result
