import gzip
import struct
from pathlib import Path

import numpy as np
import pytest


def write_mnist_raw(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """Tiny MNIST-like data in torchvision's raw IDX layout: a bright blob whose position gives the digit."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = (rng.random((n, 28, 28)) * 40).astype(np.uint8)
        for digit in range(10):
            rows = labels == digit
            r, c = 6 + 2 * (digit // 5) * 5, 4 + 4 * (digit % 5)
            images[rows, r : r + 6, c : c + 4] = 255
        return images, labels

    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images, labels = split(n)
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (directory / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return directory


@pytest.fixture
def mnist_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    return write_mnist_raw(tmp_path / "MNIST" / "raw")
