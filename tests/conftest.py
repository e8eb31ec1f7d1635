import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import masktune


def write_mnist_raw(directory: Path, n_train: int = 600, n_test: int = 200, seed: int = 0, digits: int = 10) -> Path:
    """Tiny MNIST-like data in torchvision's raw IDX layout: a bright blob whose position gives the digit
    (digits ``0 .. digits - 1`` only)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, digits, n).astype(np.uint8)
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


TINY_RUN = ["--epochs", "2", "--limit", "300", "--val-size", "100", "--batch-size", "20", "--quiet",
            "--set", "mask_chunk=100"]


@dataclass
class TinyRun:
    """A small biased-MNIST run (fixture data, 2 epochs of 15 batches, 3 mask chunks)."""

    data_dir: Path
    home: Path

    def args(self, out: Path, *extra: str, experiment: str = "biased-mnist") -> list[str]:
        """``masktune`` arguments of the run into ``out``."""
        return ["run", experiment, "--data-dir", str(self.data_dir), "--out", str(out), *TINY_RUN, *extra]

    def env(self) -> dict[str, str]:
        """Environment for a child process running this worktree's masktune."""
        path = [str(Path(masktune.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "MASKTUNE_HOME": str(self.home), "PYTHONPATH": os.pathsep.join(filter(None, path))}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return TinyRun(write_mnist_raw(root / "MNIST" / "raw"), root / "home")


@pytest.fixture(scope="session")
def reference_run(tiny_run, tmp_path_factory):
    """The tiny run, run once without interruption; returns its run directory."""
    from masktune.cli import main

    out = tmp_path_factory.mktemp("reference") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MASKTUNE_HOME", str(tiny_run.home))
        assert main(tiny_run.args(out)) == 0
    return out
