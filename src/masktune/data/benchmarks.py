"""Loaders of the paper's other datasets, each reading the real on-disk format (SPEC.md section 3):
Waterbirds, CelebA, ImageNet-9L / the Background Challenge, CIFAR-10, SVHN, Cats vs Dogs, and any
grouped image dataset described by a CSV file.

Each returns plain datasets yielding ``(image, label)`` in the mask view: :class:`ImageFiles` for
image files, :class:`ImageDataset` (uint8 in memory) for CIFAR-10 and SVHN. Per-sample
``metadata["spurious"]`` defines the groups.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError
from .base import ImageDataset
from .files import ImageFiles, ImageView, int_column, read_csv, require, scan_class_folders

IN9L_TESTS = ("original", "mixed_same", "mixed_rand", "mixed_next")
SPLITS = {"0": "train", "1": "val", "2": "test"}  # Waterbirds / CelebA split codes


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
    rows = read_csv(path, ("img_filename", "y", "split", "place"), WATERBIRDS_HOW)
    resized = int(image_size * 256 / 224)
    view = ImageView((image_size, image_size), resize=(resized, resized))
    labels, places, splits = (int_column(rows, c, path) for c in ("y", "place", "split"))
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
    attrs = read_csv(attr_path, ("image_id",), CELEBA_HOW)
    for attribute in (target, spurious):
        if attrs and attribute not in attrs[0]:
            names = ", ".join(k for k in attrs[0] if k != "image_id")
            raise DataError(f"CelebA has no attribute {attribute!r}; attributes: {names}")
    partition_rows = read_csv(split_path, ("image_id", "partition"), CELEBA_HOW)
    partition = dict(zip((row["image_id"] for row in partition_rows),
                         int_column(partition_rows, "partition", split_path).tolist()))
    images = require(root / "img_align_celeba", "CelebA image folder", CELEBA_HOW)
    if (images / "img_align_celeba").is_dir():
        images = images / "img_align_celeba"
    missing = [row["image_id"] for row in attrs if row["image_id"] not in partition]
    if missing:
        raise DataError(f"{split_path} has no partition for {len(missing)} image(s), e.g. {missing[0]}")

    def flags(attribute: str) -> Tensor:
        values = int_column(attrs, attribute, attr_path)
        if not ((values == 1) | (values == -1)).all():
            raise DataError(f"{attr_path}: attribute {attribute!r} must be -1 or 1 in every row")
        return values == 1

    labels, spurious_flags = flags(target).long(), flags(spurious)
    splits = torch.tensor([partition[row["image_id"]] for row in attrs])
    view = ImageView((image_size, image_size), resize=(image_size, image_size), square_first=True)
    return _split_sets(splits, split_path, lambda name, index: ImageFiles(
        [images / attrs[i]["image_id"] for i in index.tolist()], labels[index], view,
        {"spurious": spurious_flags[index]}, f"celeba/{name}"))



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
    require(path, "CIFAR-10 batch", CIFAR10_HOW)
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
        path = require(Path(root) / f"{split}_32x32.mat", f"SVHN {split} file", SVHN_HOW)
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
        require(root / split, f"Cats vs Dogs {split} folder", CATS_VS_DOGS_HOW)
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
    rows = read_csv(path, (path_column, label_column, split_column), how)
    if not rows:
        raise DataError(f"{path} has no rows")
    raw_labels = [row[label_column] for row in rows]
    if all(v.lstrip("-").isdigit() for v in raw_labels):
        labels = torch.tensor([int(v) for v in raw_labels])
    else:
        names = sorted(set(raw_labels))
        labels = torch.tensor([names.index(v) for v in raw_labels])
    metadata = {"spurious": int_column(rows, spurious_column, path)} if spurious_column in rows[0] else {}
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
