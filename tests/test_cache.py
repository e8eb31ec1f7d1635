"""The decoded-image cache (bit-identical to the lazy PIL path, rebuilt when stale, a corrupt file
named, one builder among concurrent processes), uint8 batches, packed RandMask masks, masking
prepared once, mixed precision settings and the default worker counts."""

import multiprocessing
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import Subset

import masktune.data.cache as cache
from masktune import (ImageFiles, ImageView, MaskedDataset, MaskSet, TrainSettings, compute_masks,
                      random_square_masks, train_erm)
from masktune.data import make_loader
from masktune.data.cache import cache_images
from masktune.data.loader import default_workers, to_device
from masktune.errors import ConfigError, CorruptImageError
from masktune.masks import prepare_masking, random_square_maskset
from masktune.models import autocast_dtype


def write_files(folder, n=7, seed=0):
    """``n`` noisy JPEG and PNG images of different sizes; returns their ImageFiles (16 x 16 view)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = (20 + 3 * i, 17 + 2 * i)  # height, width
        path = folder / f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    labels = torch.arange(n) % 2
    return ImageFiles(paths, labels, ImageView((16, 16), resize=18), {"spurious": torch.arange(n) % 3 == 0}, "tiny/train")


def test_cached_images_equal_the_lazy_path_bit_for_bit(tmp_path):
    files = write_files(tmp_path / "images")
    cached = cache_images(files, tmp_path / "cache", workers=0, progress=False)
    assert len(cached) == len(files) and torch.equal(cached.labels, files.labels)
    lazy = torch.stack([files[i][0] for i in range(len(files))])
    assert all(torch.equal(cached[i][0], lazy[i]) and cached[i][1] == files[i][1] for i in range(len(files)))
    batch, labels = cached.__getitems__([4, 1, 6])
    assert batch.dtype == torch.uint8 and torch.equal(to_device(batch, "cpu"), lazy[[4, 1, 6]])
    picked = cached.select(torch.tensor([5, 2]))
    assert torch.equal(picked[1][0], lazy[2]) and torch.equal(picked.metadata["spurious"], files.metadata["spurious"][[5, 2]])
    assert torch.equal(cached.subset(3)[2][0], lazy[2])
    # through a DataLoader and a masked dataset, as training reads it
    masks = torch.zeros(len(files), 16, 16, dtype=torch.bool)
    masks[:, :4, :4] = True
    images, _ = next(iter(make_loader(MaskedDataset(cached, masks), 8)))
    assert torch.equal(to_device(images, "cpu"), lazy.masked_fill(masks[:, None], 0.0))
    reopened = cache_images(files, tmp_path / "cache", workers=0, progress=False)
    assert np.array_equal(reopened.array, cached.array)


def test_a_changed_file_list_or_file_rebuilds_the_cache(tmp_path):
    files = write_files(tmp_path / "images")
    first = cache_images(files, tmp_path / "cache", workers=0, progress=False)
    before = first[3][0]
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(files.paths[3])  # new content, size, time
    os.utime(files.paths[3], ns=(1, 1))
    rebuilt = cache_images(files, tmp_path / "cache", workers=0, progress=False)
    assert not torch.equal(rebuilt[3][0], before) and torch.equal(rebuilt[3][0], files[3][0])
    fewer = files.select(torch.arange(5))
    assert torch.equal(cache_images(fewer, tmp_path / "cache", workers=0, progress=False)[4][0], files[4][0])
    truncated = cache._cache_path(files, tmp_path / "cache")
    cache_images(files, tmp_path / "cache", workers=0, progress=False)
    truncated.write_bytes(truncated.read_bytes()[:100])  # a damaged cache is found by its size and rebuilt
    assert torch.equal(cache_images(files, tmp_path / "cache", workers=0, progress=False)[6][0], files[6][0])
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_a_corrupt_image_stops_the_build_naming_the_file(tmp_path):
    files = write_files(tmp_path / "images")
    with open(files.paths[2], "wb") as f:
        f.write(b"not an image")
    with pytest.raises(CorruptImageError, match=r"cannot read image .*2\.jpg"):
        cache_images(files, tmp_path / "cache", workers=0, progress=False)
    assert not list((tmp_path / "cache").glob("*.json")) and not list((tmp_path / "cache").glob("*.tmp"))


def _build_in_process(files, folder, barrier, log):
    original = cache._build

    def counted(*args):
        with open(log, "a") as f:
            f.write("built\n")
        return original(*args)

    cache._build = counted
    barrier.wait()
    cached = cache_images(files, folder, workers=0, progress=False)
    np.save(f"{log}.{os.getpid()}.npy", np.asarray(cached.array))


def test_concurrent_builders_build_once_and_read_the_same_cache(tmp_path):
    files = write_files(tmp_path / "images", n=40)
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(3)
    log = tmp_path / "builds.log"
    workers = [context.Process(target=_build_in_process, args=(files, tmp_path / "cache", barrier, log))
               for _ in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0, 0, 0]
    assert log.read_text() == "built\n"
    arrays = [np.load(path) for path in tmp_path.glob("builds.log.*.npy")]
    assert len(arrays) == 3 and all(np.array_equal(a, arrays[0]) for a in arrays)


def test_randmask_masks_are_packed_and_the_same_masks():
    packed = random_square_maskset(10, 12, 9, generator=torch.Generator().manual_seed(4), chunk=3)
    full = random_square_masks(10, 12, 9, generator=torch.Generator().manual_seed(4))
    assert isinstance(packed, MaskSet) and torch.equal(packed.unpack(), full)
    assert packed.packed.shape == (10, 14) and packed.packed.dtype == torch.uint8  # ceil(12 * 9 / 8) bytes a mask


def test_masking_prepared_once_streams_chunks_to_the_masks_of_the_whole_set():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 3, 10, 10, generator=g)
    data = torch.utils.data.TensorDataset(images, torch.arange(20) % 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    model.eval()
    whole = compute_masks(model, data, progress=False)
    masker = prepare_masking(model, images[:1])
    parts = [masker(Subset(data, range(start, min(start + 7, 20))), progress=False) for start in range(0, 20, 7)]
    assert MaskSet.concatenate(parts) == whole


def test_precision_names_and_mixed_precision_training_on_the_cpu():
    assert autocast_dtype("auto", "cpu") is None and autocast_dtype("float32", "cuda") is None
    assert autocast_dtype("auto", "cuda") == torch.bfloat16 and autocast_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ConfigError, match="unknown precision 'half'"):
        autocast_dtype("half", "cpu")
    data = torch.utils.data.TensorDataset(torch.rand(32, 3, 6, 6), torch.arange(32) % 2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    result = train_erm(model, data, settings=TrainSettings(batch_size=8, precision="bfloat16", progress=False),
                       epochs=1)
    assert np.isfinite(result.history[0]["loss"]) and all(p.dtype == torch.float32 for p in model.parameters())


def test_file_datasets_get_workers_by_default_and_batched_data_none(tmp_path):
    files = write_files(tmp_path / "images", n=3)
    cached = cache_images(files, tmp_path / "cache", workers=0, progress=False)
    assert default_workers(files) == default_workers(Subset(files, [0])) == min(8, os.cpu_count() or 1)
    assert default_workers(MaskedDataset(files, torch.zeros(3, 16, 16, dtype=torch.bool))) > 0
    assert default_workers(cached) == 0 and default_workers(torch.utils.data.TensorDataset(torch.zeros(2))) == 0
