"""The biased MNIST benchmark (SPEC.md section 2), from any MNIST-format arrays (MNIST,
Fashion-MNIST): binary labels, and a spurious feature correlated with class 0."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ..errors import DataError
from .base import ImageDataset
from .mnist import MNISTArrays

BIAS_TYPES = ("square", "band", "sparse", "background", "foreground")
POSITIONS = ("corner", "edge", "centre")
SPARSE_STEP, SPARSE_OFFSET = 4, 2  # the sparse pattern: every 4th pixel of every 4th row, from (2, 2)
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
    ``bias_type`` is the feature: a ``"square"`` of side ``square_size`` (the paper's), a
    ``"band"`` of ``square_size`` rows across the whole width, a ``"sparse"`` pattern of single
    pixels spread over the image (every 4th pixel of every 4th row), the ``"background"`` (zero
    pixels) or the ``"foreground"`` (stroke pixels) in ``colour``. ``position`` puts the square in
    the top-left ``"corner"`` (the paper's, on the black background of every digit), the middle of
    the top ``"edge"`` or the ``"centre"`` (where other digits have strokes); a band lies at the
    square's rows (the top rows for corner and edge).
    """

    conflicting_ratio: float = 0.01
    bias_type: str = "square"
    square_size: int = 4
    position: str = "corner"
    colour: tuple[int, int, int] = (255, 0, 0)
    n_squares: int = 1
    second_colour: tuple[int, int, int] = (0, 0, 255)
    val_size: int = 12000
    seed: int = 0
    selection: str = "authors"


class BiasedMNIST(NamedTuple):
    """The biased MNIST splits and the pixels of the spurious feature (square(s), band, sparse
    pattern; None for the background and foreground, whose pixels differ by image).
    ``val_original`` holds the validation images without the feature: a shortcut-free validation
    set, the validation analogue of ``test_original``."""

    train: ImageDataset
    val: ImageDataset
    test_original: ImageDataset
    test_biased: ImageDataset
    feature_region: Tensor | None
    val_original: ImageDataset | None = None


def _validate(config: BiasedMNISTConfig, n_train: int) -> None:
    problems = []
    if not 0.0 <= config.conflicting_ratio <= 1.0:
        problems.append(f"conflicting_ratio must be in [0, 1], got {config.conflicting_ratio}")
    if config.bias_type not in BIAS_TYPES:
        problems.append(f"bias_type must be one of {', '.join(BIAS_TYPES)}, got {config.bias_type!r}")
    if not 1 <= config.square_size <= 14:
        problems.append(f"square_size must be in 1..14, got {config.square_size}")
    if config.position not in POSITIONS:
        problems.append(f"position must be one of {', '.join(POSITIONS)}, got {config.position!r}")
    elif config.position != "corner" and config.n_squares == 2 and config.bias_type == "square":
        problems.append("n_squares=2 puts the squares in the two top corners: it needs position 'corner'")
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


def _square_origin(config: BiasedMNISTConfig, height: int, width: int) -> tuple[int, int]:
    """The top-left pixel of the (first) square: the top-left corner, the middle of the top edge,
    or the image's centre."""
    s = config.square_size
    if config.position == "centre":
        return (height - s) // 2, (width - s) // 2
    return 0, (width - s) // 2 if config.position == "edge" else 0


def _feature_pixels(config: BiasedMNISTConfig, height: int, width: int) -> Tensor | None:
    """The [H, W] pixels the first feature colours, for the bias types with fixed pixels (square,
    band, sparse); None for background and foreground, whose pixels depend on the image."""
    pixels = torch.zeros(height, width, dtype=torch.bool)
    s = config.square_size
    top, left = _square_origin(config, height, width)
    if config.bias_type == "square":
        pixels[top:top + s, left:left + s] = True
    elif config.bias_type == "band":
        pixels[top:top + s, :] = True
    elif config.bias_type == "sparse":
        pixels[SPARSE_OFFSET::SPARSE_STEP, SPARSE_OFFSET::SPARSE_STEP] = True
    else:
        return None
    return pixels


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
    pixels = _feature_pixels(config, *gray.shape[-2:])
    if pixels is None:
        pixels = gray == 0 if config.bias_type == "background" else gray > 0
    rgb.permute(0, 2, 3, 1)[flags.view(-1, 1, 1) & pixels] = colour
    if second is not None:
        s = config.square_size
        rgb[second, :, :s, -s:] = torch.tensor(config.second_colour, dtype=torch.uint8).view(3, 1, 1)
    return rgb


def make_biased_mnist(
    arrays: MNISTArrays, config: BiasedMNISTConfig = BiasedMNISTConfig(), *, name: str = "biased-mnist"
) -> BiasedMNIST:
    """Build biased MNIST: binary labels (digit >= 5), a spurious feature correlated with class 0.

    A seeded split holds out `val_size` training images for validation. Class 0 carries the
    feature on a share 1 - ratio of its images, class 1 on a share ratio (which images: see
    ``BiasedMNISTConfig.selection``). `test_biased` carries it on every class-1 image and no
    class-0 image; `test_original` never. With `n_squares=2` a second, top-right square in
    `second_colour` sits on the same images as the first (as in the authors' code). "band" and
    "sparse" colour fixed pixels like the square; "background" colours the zero pixels,
    "foreground" the non-zero (stroke) pixels of the flagged images.
    Any MNIST-format dataset works (e.g. Fashion-MNIST: classes 0-4 vs 5-9); `name` prefixes the
    split names.
    """
    _validate(config, len(arrays.train_labels))
    generator = torch.Generator().manual_seed(config.seed)
    train_gray = torch.from_numpy(arrays.train_images)
    train_digits = torch.from_numpy(arrays.train_labels).long()
    height, width = train_gray.shape[1:]
    feature_region = _feature_pixels(config, height, width)
    if config.n_squares == 2:
        feature_region[:config.square_size, -config.square_size:] = True

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
    val_index = order[: config.val_size]
    val_original = build("val_original", train_gray[val_index], train_digits[val_index],
                         torch.zeros(len(val_index), dtype=torch.bool), None)

    test_gray = torch.from_numpy(arrays.test_images)
    test_digits = torch.from_numpy(arrays.test_labels).long()
    no_feature = torch.zeros(len(test_digits), dtype=torch.bool)
    test_original = build("test_original", test_gray, test_digits, no_feature, None)
    reversed_flags = test_digits >= 5
    second = reversed_flags if config.n_squares == 2 else None
    test_biased = build("test_biased", test_gray, test_digits, reversed_flags, second)
    return BiasedMNIST(train, val, test_original, test_biased, feature_region, val_original)
