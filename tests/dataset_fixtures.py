"""Tiny datasets written in the real on-disk formats (SPEC.md section 3), for the loader and wiring tests.

Each image is a solid colour that encodes its label (red channel) and spurious attribute (green
channel), so a test can check that every file ends up with the right label and group.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def colour(label: int, spurious: int = 0) -> tuple[int, int, int]:
    """The fixture colour of an image with this label and attribute."""
    return (40 + 20 * label, 60 + 120 * spurious, 90)


def write_image(path: Path, label: int, spurious: int = 0, size: tuple[int, int] = (12, 10)) -> None:
    """A solid-colour image (``size`` = width, height), format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(label, spurious)).save(path, quality=100)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# (y, place) -> images per split: train is unbalanced like the real Waterbirds, val and test are not
WATERBIRDS_COUNTS = {"train": {(0, 0): 4, (0, 1): 1, (1, 0): 1, (1, 1): 3},
                     "val": {(0, 0): 2, (0, 1): 2, (1, 0): 2, (1, 1): 2},
                     "test": {(0, 0): 2, (0, 1): 1, (1, 0): 1, (1, 1): 2}}


def write_waterbirds(root: Path) -> Path:
    """``metadata.csv`` (img_id, img_filename, y, split, place, place_filename) and JPEGs in species folders."""
    rows = []
    for code, split in enumerate(("train", "val", "test")):
        for (y, place), n in WATERBIRDS_COUNTS[split].items():
            for _ in range(n):
                img_id = len(rows) + 1
                filename = f"{10 * y + 1:03d}.Species_{y}/Bird_{img_id:04d}.jpg"
                write_image(root / filename, y, place)
                rows.append([img_id, filename, y, code, place, f"{'bw'[place]}/place_{img_id}.jpg"])
    write_csv(root / "metadata.csv", ["img_id", "img_filename", "y", "split", "place", "place_filename"], rows)
    return root


# (Blond_Hair, Male) -> images per partition
CELEBA_COUNTS = {0: {(0, 0): 3, (0, 1): 3, (1, 0): 2, (1, 1): 1}, 1: {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1},
                 2: {(0, 0): 2, (0, 1): 1, (1, 0): 1, (1, 1): 1}}


def write_celeba(root: Path, kaggle_layout: bool = False) -> Path:
    """``list_attr_celeba.csv`` (-1/1 attributes), ``list_eval_partition.csv`` and ``img_align_celeba/``.
    Smiling is 1 exactly on the odd-numbered images."""
    folder = root / "img_align_celeba" / ("img_align_celeba" if kaggle_layout else "")
    attrs, parts = [], []
    for partition, counts in CELEBA_COUNTS.items():
        for (blond, male), n in counts.items():
            for _ in range(n):
                image_id = f"{len(attrs) + 1:06d}.jpg"
                write_image(folder / image_id, blond, male, size=(18, 22))
                sign = [1 if v else -1 for v in (blond, male, (len(attrs) + 1) % 2)]
                attrs.append([image_id, -1, sign[0], sign[1], sign[2]])
                parts.append([image_id, partition])
    write_csv(root / "list_attr_celeba.csv", ["image_id", "5_o_Clock_Shadow", "Blond_Hair", "Male", "Smiling"], attrs)
    write_csv(root / "list_eval_partition.csv", ["image_id", "partition"], parts)
    return root


IN9L_CLASSES = ["00_dog", "01_bird", "02_wheeled vehicle", "03_reptile", "04_carnivore", "05_insect",
                "06_musical instrument", "07_primate", "08_fish"]


def write_in9l(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """``train/`` and ``val/`` class folders; test variants in the release layout ``bg_challenge/<v>/val/``,
    except ``original``, written directly as ``original/<class>/``. PNG and JPEG mixed, plus a stray file."""
    per_class = per_class or {"train": 2, "val": 1, "original": 1, "mixed_same": 1, "mixed_rand": 1, "mixed_next": 1}
    for split, n in per_class.items():
        folder = root / split if split in ("train", "val", "original") else root / "bg_challenge" / split / "val"
        for label, name in enumerate(IN9L_CLASSES):
            for i in range(n):
                write_image(folder / name / f"n0{label}_{i}.{'JPEG' if i % 2 else 'png'}", label)
        (folder / IN9L_CLASSES[0] / "README.txt").write_text("not an image")
    return root


def _cifar_batch(path: Path, labels: np.ndarray) -> None:
    data = np.zeros((len(labels), 3, 32, 32), np.uint8)
    data[:, 0] = (40 + 20 * labels)[:, None, None]
    data[:, 1, :16] = 200  # top half green: checks the row-major CHW layout
    batch = {"batch_label": "fixture batch", "labels": labels.tolist(), "data": data.reshape(len(labels), -1),
             "filenames": [f"img_{i}.png" for i in range(len(labels))]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_cifar10(root: Path, per_batch: int = 10) -> Path:
    """torchvision's ``cifar-10-batches-py/`` with five small training batches and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _cifar_batch(folder / f"data_batch_{i}", np.arange(per_batch) % 10)
    _cifar_batch(folder / "test_batch", np.arange(per_batch) % 10)
    return root


def write_svhn(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """``train_32x32.mat`` and ``test_32x32.mat``: X [32, 32, 3, N] uint8, y [N, 1] with 10 for the digit 0."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        digits = np.arange(n) % 10
        x = np.zeros((32, 32, 3, n), np.uint8)
        x[:, :, 0, :] = 40 + 20 * digits
        x[:16, :, 1, :] = 200
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": np.where(digits == 0, 10, digits).reshape(-1, 1)})
    return root


CATS_VS_DOGS_COUNTS = {"train": {"cat": 6, "dog": 4}, "test": {"cat": 2, "dog": 3}}


def write_cats_vs_dogs(root: Path) -> Path:
    """``train/{cat,dog}`` and ``test/{cat,dog}`` JPEGs of different sizes, plus a Thumbs.db to ignore."""
    for split, counts in CATS_VS_DOGS_COUNTS.items():
        for label, (name, n) in enumerate(counts.items()):
            for i in range(n):
                write_image(root / split / name / f"{name}.{i}.jpg", label, size=(20 + i, 16))
        (root / split / "cat" / "Thumbs.db").write_bytes(b"\0" * 10)
    return root


def write_image_csv(root: Path) -> Path:
    """A generic dataset: ``metadata.csv`` (path, label names, split, spurious) with two test splits."""
    rows = []
    layout = {"train": [("cow", 0), ("cow", 0), ("cow", 1), ("camel", 1), ("camel", 1), ("camel", 0)],
              "val": [("cow", 0), ("camel", 1)],
              "test": [("cow", 1), ("camel", 0), ("cow", 0)],
              "test_ood": [("cow", 1), ("camel", 0)]}
    for split, items in layout.items():
        for i, (name, spurious) in enumerate(items):
            path = f"images/{split}/{name}_{i}.png"
            write_image(root / path, ["camel", "cow"].index(name), spurious)
            rows.append([path, name, split, spurious])
    write_csv(root / "metadata.csv", ["path", "label", "split", "spurious"], rows)
    return root
