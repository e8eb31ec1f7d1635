"""The paper's experiments with the authors' hyperparameters (SPEC.md sections 2 and 3), plus the
ones that run on a CPU here, as :data:`PAPER_EXPERIMENTS`; :mod:`masktune.pipeline` registers them,
and ``masktune run <name>`` runs one.

Hyperparameters are those of the authors' scripts (github.com/aliasgharkhani/Masktune,
``bash_files/``); their learning-rate schedules are never stepped in their code, so the rate is
constant. Where their scripts and the paper differ, the paper's setting is the default and the
authors' is an option (noted at the experiment).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from torch import nn

from ..data import (BatchAugment, BiasedMNISTConfig, MNISTArrays, holdout, load_cats_vs_dogs, load_celeba,
                    load_cifar10, load_fashion_mnist, load_image_csv, load_in9l, load_mnist, load_svhn,
                    load_waterbirds, make_biased_mnist)
from ..errors import DataError
from ..evaluation import bg_gap
from ..models import SmallCNN, resnet32, resnet50
from ..storage import masktune_home
from .config import RunConfig
from .registry import Experiment, ExperimentData

IN9L_MEAN = (0.4717, 0.4499, 0.3837)
IN9L_STD = (0.2600, 0.2516, 0.2575)


def _root(config: RunConfig, folder: str, load: Callable[[Path], dict]) -> dict:
    """``load(--data-dir)``, or ``load($MASKTUNE_HOME/<folder>)`` without one; says which was tried."""
    root = Path(config.data_dir) if config.data_dir else masktune_home() / folder
    try:
        return load(root)
    except DataError as exc:
        where = "" if config.data_dir else f" (no --data-dir was given, so masktune looked in {root})"
        raise DataError(f"{config.experiment}: {exc}{where}") from exc


def _augment(config: RunConfig, augment: BatchAugment) -> BatchAugment | None:
    return augment if config.data["augment"] else None


# --- biased MNIST and biased Fashion-MNIST -------------------------------------------------------

def _biased_data(load: Callable[[str | None], MNISTArrays], name: str) -> Callable[[RunConfig], ExperimentData]:
    def build(config: RunConfig) -> ExperimentData:
        data = make_biased_mnist(load(config.data_dir), BiasedMNISTConfig(**config.data, seed=config.seed), name=name)
        return ExperimentData(data.train, data.val, {"original": data.test_original, "biased": data.test_biased},
                              num_classes=2, feature_region=data.feature_region)
    return build


BIASED_MNIST_OPTIONS = {f.name: f.default for f in dataclasses.fields(BiasedMNISTConfig) if f.name != "seed"}
MNIST_DEFAULTS = {"epochs": 3, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128}
SELECTIVE = {"selective": True, "methods": ("erm", "masktune")}


def _small_cnn(config: RunConfig, num_classes: int) -> nn.Module:
    return SmallCNN(num_classes)


def _biased(name: str, load: Callable[[str | None], MNISTArrays], what: str) -> tuple[Experiment, Experiment]:
    """``name`` and its selective-classification variant ``name-selective``."""
    build = _biased_data(load, name)
    description = f"{what}, a coloured square on 99% of class 0 (SPEC.md section 2)"
    return (Experiment(name, 1, description, build, _small_cnn, MNIST_DEFAULTS, BIASED_MNIST_OPTIONS),
            Experiment(f"{name}-selective", 1, f"{description}; selective classification, ERM vs the MaskTune rule",
                       build, _small_cnn, MNIST_DEFAULTS | SELECTIVE, BIASED_MNIST_OPTIONS))


BIASED = (
    *_biased("biased-mnist", load_mnist, "MNIST, digits 0-4 vs 5-9"),
    *_biased("biased-fashion-mnist", load_fashion_mnist,
             "Fashion-MNIST, classes 0-4 (T-shirt/top, trouser, pullover, dress, coat) vs 5-9 (sandal, shirt, "
             "sneaker, bag, ankle boot)"),
)


# --- Waterbirds, CelebA, the Background Challenge, any grouped image folder (ResNet-50) ----------

def _resnet50(mean: tuple[float, ...] | None = None,
              std: tuple[float, ...] | None = None) -> Callable[[RunConfig, int], nn.Module]:
    def build(config: RunConfig, num_classes: int) -> nn.Module:
        stats = {"mean": mean, "std": std} if mean is not None else {}
        return resnet50(num_classes, pretrained=config.pretrained, **stats)
    return build


def _waterbirds(config: RunConfig) -> ExperimentData:
    sets = _root(config, "waterbirds", lambda root: load_waterbirds(root, config.data["image_size"]))
    augment = BatchAugment(crop_scale=(0.7, 1.0), flip=True)
    return ExperimentData(sets["train"], sets["val"], {"test": sets["test"]}, 2, augment=_augment(config, augment))


def _celeba(config: RunConfig) -> ExperimentData:
    options = config.data
    sets = _root(config, "celeba", lambda root: load_celeba(root, options["target"], options["spurious"],
                                                            options["image_size"]))
    augment = BatchAugment(crop_scale=(0.7, 1.0), crop_ratio=(1.0, 4 / 3), flip=True)
    return ExperimentData(sets["train"], sets["val"], {"test": sets["test"]}, 2, augment=_augment(config, augment))


def _in9l(config: RunConfig) -> ExperimentData:
    sets = _root(config, "in9l", lambda root: load_in9l(root, config.data["image_size"]))
    train, val = sets.pop("train"), sets.pop("val")
    augment = BatchAugment(crop_scale=(0.08, 1.0), flip=True, jitter=0.1, lighting=0.05)
    return ExperimentData(train, val, sets, 9, augment=_augment(config, augment))


def _image_csv(config: RunConfig) -> ExperimentData:
    options = dict(config.data)
    augment = options.pop("augment")
    sets = _root(config, "image-csv", lambda root: load_image_csv(root, **options))
    train, val = sets.pop("train"), sets.pop("val", None)
    if not sets:
        raise DataError(f"{config.experiment}: the CSV file defines no test split (a split other than train and val)")
    num_classes = max(int(d.labels.max()) for d in (train, val, *sets.values()) if d is not None and len(d)) + 1
    return ExperimentData(train, val, sets, num_classes,
                          augment=BatchAugment(crop_scale=(0.7, 1.0), flip=True) if augment else None)


RESNET50_DEFAULTS = {"epochs": 100, "lr": 1e-4, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128,
                     "methods": ("erm", "masktune")}
IMAGE_OPTIONS = {"image_size": 224, "augment": True}

GROUPED = (Experiment(
    "waterbirds", 1,
    "Waterbirds: landbird vs waterbird, place (land/water) spurious; worst-group and average accuracy. ImageNet "
    "weights as in the paper (the authors' script trains from scratch: --no-pretrained)",
    _waterbirds, _resnet50(), RESNET50_DEFAULTS, IMAGE_OPTIONS,
), Experiment(
    "celeba", 1,
    "CelebA: Blond_Hair, with Male spurious; worst-group and average accuracy",
    _celeba, _resnet50(), RESNET50_DEFAULTS | {"epochs": 20, "batch_size": 512},
    {"target": "Blond_Hair", "spurious": "Male", **IMAGE_OPTIONS},
), Experiment(
    "in9l", 1,
    "Background Challenge: train on ImageNet-9L, test on original, mixed_same, mixed_rand, mixed_next; BG-gap = "
    "mixed_same - mixed_rand. ImageNet weights as in the paper (the authors' script: --no-pretrained)",
    _in9l, _resnet50(IN9L_MEAN, IN9L_STD), RESNET50_DEFAULTS, IMAGE_OPTIONS, summarize=bg_gap,
), Experiment(
    "image-csv", 1,
    "any grouped image dataset: --data-dir with a CSV of path, label, split (train/val/others are test sets) and "
    "an optional spurious column; ResNet-50 with the Waterbirds hyperparameters",
    _image_csv, _resnet50(), RESNET50_DEFAULTS,
    {"csv_file": "metadata.csv", "path_column": "path", "label_column": "label", "split_column": "split",
     "spurious_column": "spurious", **IMAGE_OPTIONS},
))


# --- selective classification: CIFAR-10, SVHN, Cats vs Dogs (ResNet-32) --------------------------

def _held_out(config: RunConfig, folder: str, load: Callable[[Path], dict], num_classes: int,
              augment: BatchAugment) -> ExperimentData:
    """Train and test sets of ``load``, with a seeded share ``data.val_fraction`` of train held out."""
    sets = _root(config, folder, load)
    train, val = holdout(sets["train"], config.data["val_fraction"], config.seed)
    return ExperimentData(train, val, {"test": sets["test"]}, num_classes, augment=_augment(config, augment))


def _resnet32(config: RunConfig, num_classes: int) -> nn.Module:
    return resnet32(num_classes)


SELECTIVE_DEFAULTS = {"epochs": 300, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "batch_size": 128, **SELECTIVE}
AFFINE = BatchAugment(flip=True, degrees=15, translate=0.1)

SELECTIVE_CLASSIFICATION = (Experiment(
    "cifar10", 1, "CIFAR-10, selective classification: error at coverage 80-100%, ERM vs the MaskTune rule",
    lambda config: _held_out(config, "cifar10", load_cifar10, 10, AFFINE),
    _resnet32, SELECTIVE_DEFAULTS, {"val_fraction": 0.2, "augment": True},
), Experiment(
    "svhn", 1, "SVHN, selective classification: error at coverage 80-100%, ERM vs the MaskTune rule",
    lambda config: _held_out(config, "svhn", load_svhn, 10, BatchAugment(pad_crop=4)),
    _resnet32, SELECTIVE_DEFAULTS | {"weight_decay": 5e-4}, {"val_fraction": 0.2, "augment": True},
), Experiment(
    "catsvsdogs", 1, "Cats vs Dogs (64 px), selective classification: error at coverage 80-100%, ERM vs MaskTune rule",
    lambda config: _held_out(config, "catsvsdogs", lambda root: load_cats_vs_dogs(root, config.data["image_size"]),
                             2, AFFINE),
    _resnet32, SELECTIVE_DEFAULTS | {"optimizer": "adam", "lr": 1e-3, "epochs": 200},
    {"val_fraction": 0.2, "image_size": 64, "augment": True},
))

PAPER_EXPERIMENTS: tuple[Experiment, ...] = (*BIASED, *GROUPED, *SELECTIVE_CLASSIFICATION)
