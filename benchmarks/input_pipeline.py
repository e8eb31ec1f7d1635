"""The input pipeline at Waterbirds' real scale, on the CPU: the lazy PIL path against the
decoded-image cache, and a Waterbirds-format run end to end through the cache.

It writes a Waterbirds-format dataset into a temporary folder (``metadata.csv`` and JPEGs of
500 x 375 px: 4,795 training, 1,199 validation and 5,794 test images, Waterbirds' real split sizes;
``--scale`` shrinks the counts), then measures, for the training split in the 224-px mask view:
images per second delivered to the training loop (float batches of 128, shuffled) by the lazy PIL
path with 0 and 2 DataLoader workers, the cache's build time (2 workers) and one epoch read from it
(0 and 2 workers), and the peak memory. Last, ``masktune run waterbirds --data-dir <folder>
--no-pretrained --epochs 1`` at a reduced size (``--limit``, a small image size) through the cache.

    python benchmarks/input_pipeline.py [--threads 2] [--scale 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from masktune.data import load_waterbirds, make_loader
from masktune.data.cache import cache_images
from masktune.data.loader import to_device

SPLITS = {0: 4795, 1: 1199, 2: 5794}  # Waterbirds train / val / test


def write_waterbirds(root: Path, scale: float, seed: int = 0) -> None:
    """``metadata.csv`` and one 500 x 375 JPEG per row: colour fields with a few blobs and noise."""
    rng = np.random.default_rng(seed)
    rows, index = [], 0
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32) / 500
    for split, count in SPLITS.items():
        for _ in range(max(2, int(count * scale))):
            y, place = int(rng.integers(2)), int(rng.integers(2))
            a, b, c = rng.random(3)
            image = np.stack([a * 255 * xx + 60 * place, b * 255 * yy + 40, c * 200 * (xx + yy) / 2], -1)
            for _ in range(3):
                cy, cx, r = rng.integers(40, 335), rng.integers(40, 460), rng.integers(15, 60)
                image[(yy * 500 - cy) ** 2 + (xx * 500 - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
            image += rng.normal(0, 12, image.shape)  # texture: JPEGs of a photo's size (about 50 KB)
            name = f"{index // 1000:03d}.class/{index:05d}.jpg"
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / name, quality=90)
            rows.append({"img_id": index, "img_filename": name, "y": y, "split": split, "place": place,
                         "place_filename": name})
            index += 1
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def epoch_rate(dataset, workers: int, convert: bool, batch_size: int = 128) -> float:
    """Images per second of one shuffled epoch as the training loop receives the batches (the lazy
    path's are float, the cache's uint8); with ``convert``, also made float on the device (here the
    CPU, where a GPU would do it)."""
    loader = make_loader(dataset, batch_size, shuffle=True, seed=0, num_workers=workers)
    start, seen = time.perf_counter(), 0
    for images, *_ in loader:
        seen += len(to_device(images, "cpu") if convert else images)
    return seen / (time.perf_counter() - start)


def peak_gb() -> tuple[float, float]:
    """Peak resident memory of this process and of its (finished) children, in GB."""
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="share of Waterbirds' image counts to write")
    parser.add_argument("--keep", type=Path, help="write the dataset here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="masktune-waterbirds-") as tmp:
        root = args.keep or Path(tmp) / "waterbirds"
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if not (root / "metadata.csv").is_file():
            write_waterbirds(root, args.scale)
        print(f"dataset: {root} written in {time.perf_counter() - started:.1f} s")
        train = load_waterbirds(root)["train"]
        print(f"training split: {len(train)} JPEGs of 500 x 375 px, mask view 224 x 224")
        rates = {f"lazy PIL, {w} workers (float batches)": epoch_rate(train, w, False) for w in (0, 2)}
        started = time.perf_counter()
        cached = cache_images(train, Path(tmp) / "cache", workers=2, progress=False)
        build_s = time.perf_counter() - started
        for workers in (0, 2):
            rates[f"cache, {workers} workers (uint8 batches)"] = epoch_rate(cached, workers, False)
            rates[f"cache, {workers} workers, made float on the CPU"] = epoch_rate(cached, workers, True)
        lazy = rates["lazy PIL, 2 workers (float batches)"]
        print("| path | images/s | one epoch (s) |")
        print("|---|---|---|")
        for name, rate in rates.items():
            print(f"| {name} | {rate:,.0f} | {len(train) / rate:.2f} |")
        print(f"| cache build, 2 workers | {len(train) / build_s:,.0f} | {build_s:.2f} |")
        print(f"cache / lazy PIL with 2 workers: {rates['cache, 0 workers (uint8 batches)'] / lazy:.1f}x images per "
              f"second delivered, {rates['cache, 0 workers, made float on the CPU'] / lazy:.1f}x with the float "
              f"conversion on the CPU; cache build / one lazy epoch (2 workers): {build_s * lazy / len(train):.2f}x")
        own, children = peak_gb()
        print(f"peak memory: {own:.2f} GB in this process, {children:.2f} GB in the largest worker")
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "masktune", "run", "waterbirds", "--data-dir", str(root), "--no-pretrained",
                   "--epochs", "1", "--limit", "512", "--set", "data.image_size=64", "--batch-size", "64",
                   "--num-workers", "0", "--cache-dir", str(Path(tmp) / "cache"), "--out", str(out), "--quiet",
                   "--no-report"]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        print(f"$ masktune run waterbirds ... --limit 512 --set data.image_size=64 (exit {result.returncode}, "
              f"{time.perf_counter() - started:.1f} s)")
        print(result.stdout.strip() or result.stderr.strip()[-2000:])


if __name__ == "__main__":
    main()
