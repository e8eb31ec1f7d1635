"""Data: the dataset contract, MNIST-format sources and biased MNIST, image-file datasets and the
paper's dataset loaders, batch augmentation, and the loaders every stage reads through."""

from .augment import BatchAugment
from .base import ImageDataset, check_labels, holdout, labels_of, limited
from .benchmarks import (load_cats_vs_dogs, load_celeba, load_cifar10, load_image_csv, load_in9l, load_svhn,
                         load_waterbirds)
from .biased_mnist import BiasedMNIST, BiasedMNISTConfig, make_biased_mnist
from .files import ImageFiles, ImageView, read_image
from .loader import EpochBatches, first_batch, make_loader
from .mnist import MNISTArrays, load_fashion_mnist, load_mnist

__all__ = [
    "BatchAugment", "BiasedMNIST", "BiasedMNISTConfig", "EpochBatches", "ImageDataset", "ImageFiles", "ImageView",
    "MNISTArrays", "check_labels", "first_batch", "holdout", "labels_of", "limited", "load_cats_vs_dogs",
    "load_celeba", "load_cifar10", "load_fashion_mnist", "load_image_csv", "load_in9l", "load_mnist", "load_svhn",
    "load_waterbirds", "make_biased_mnist", "make_loader", "read_image",
]
