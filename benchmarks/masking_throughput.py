"""Masking throughput: masktune's native path against pytorch-grad-cam and against the authors' pipeline.

Paths, on the same machine, model and images:
  (a) masktune.compute_masks: native batched xGradCAM, mean + 2 std rule on the device, bit-packed masks;
  (b) pytorch-grad-cam's XGradCAM, then the authors' mean + 2 std rule in numpy (NaN-masked mean/std);
  (c) (b) plus the authors' PNG round trip: each batch's masks go to a new process pool (as the
      authors' code does) that, per image, reads the original PNG, stretches the mask over it and
      writes the masked image as PNG; then every masked PNG is read back.
Workloads: the small CNN on 28 x 28 biased MNIST, and torchvision's ResNet-50 (random weights) at
224 x 224 on random images. Each (workload, path) runs in its own process so that its peak memory
is its own. Needs the `bench` extra (grad-cam, pillow) and MNIST (cached, or fetched as usual).

    python benchmarks/masking_throughput.py                  # CPU
    python benchmarks/masking_throughput.py --device cuda    # GPU (float16 autocast for path a)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from masktune import SmallCNN, compute_masks
from masktune.data import BiasedMNISTConfig, ImageDataset, load_mnist, make_biased_mnist
from masktune.data import make_loader

PATHS = {
    "native": "(a) masktune native",
    "library": "(b) grad-cam + numpy rule",
    "png": "(c) (b) + PNG round trip",
}


def workload(name: str, n: int) -> tuple[torch.nn.Module, str, ImageDataset]:
    """The model, its CAM layer and ``n`` images of a workload (seeded: every process sees the same)."""
    torch.manual_seed(0)
    if name == "mnist":
        data = make_biased_mnist(load_mnist(progress=False), BiasedMNISTConfig())
        if n > len(data.train):
            sys.exit(f"biased MNIST has {len(data.train)} training images; ask for at most that many")
        return SmallCNN(num_classes=2), "block4", data.train.subset(n)
    from torchvision.models import resnet50

    images = torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return resnet50(weights=None), "layer4.2", ImageDataset(images, torch.zeros(n, dtype=torch.long))


def authors_rule(heatmaps: np.ndarray) -> np.ndarray:
    """The authors' mask rule in numpy: True where heat > mean + 2 std of the positive heat (an image
    without positive heat gets a NaN threshold, so no mask)."""
    positive = np.where(heatmaps > 0, heatmaps, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "mean of empty slice" for those images
        threshold = np.nanmean(positive, axis=(1, 2)) + 2 * np.nanstd(positive, axis=(1, 2))
    return heatmaps > threshold[:, None, None]


def write_originals(dataset: ImageDataset, folder: Path) -> None:
    """The dataset as PNG files, as the authors keep it (setup, not timed)."""
    from PIL import Image

    folder.mkdir()
    for i, image in enumerate(dataset.images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i}.png")


def _mask_and_save(mask: np.ndarray, png_dir: Path, i: int) -> None:
    """One image of the authors' PNG step: read the original, stretch the mask over it (OpenCV
    nearest), write the masked image as PNG."""
    import cv2
    from PIL import Image

    original = Image.open(png_dir / "original" / f"{i}.png").convert("RGB")
    keep = cv2.resize((~mask).astype(np.uint8), original.size, interpolation=cv2.INTER_NEAREST)
    Image.fromarray(np.asarray(original) * keep[..., None]).save(png_dir / f"{i}.png")


def library_masks(model: torch.nn.Module, layer: str, dataset: ImageDataset, batch_size: int, device: torch.device,
                  png_dir: Path | None) -> list[np.ndarray]:
    """Path (b); with ``png_dir`` (holding ``original/``), path (c): as the authors' code does, each
    batch's masks go to a new process pool that writes every masked image as PNG
    (:func:`_mask_and_save`); then every masked PNG is read back, as their finetuning loader does."""
    from PIL import Image
    from pytorch_grad_cam import XGradCAM

    masks = []
    cam = XGradCAM(model=model, target_layers=[model.get_submodule(layer)])
    for start, (images, _) in zip(range(0, len(dataset), batch_size), make_loader(dataset, batch_size, device=device)):
        masks.append(authors_rule(cam(images.to(device), targets=None)))
        if png_dir is not None:
            with multiprocessing.Pool() as pool:
                pool.starmap(_mask_and_save, [(mask, png_dir, i) for i, mask in enumerate(masks[-1], start)])
    if png_dir is not None:
        for i in range(len(dataset)):
            with Image.open(png_dir / f"{i}.png") as image:
                np.asarray(image.convert("RGB"))
    return masks


def child(args: argparse.Namespace) -> None:
    """Time one path on one workload; print a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, layer, dataset = workload(args.child[0], args.child[1])
    model.to(device).eval()
    batch_size = args.batch_size or (256 if args.child[0] == "mnist" else 32)
    path = args.child[2]

    png_dir = Path(tempfile.mkdtemp(prefix="masking-throughput-")) if path == "png" else None
    if png_dir is not None:
        write_originals(dataset, png_dir / "original")

    def run(data: ImageDataset) -> None:
        if path == "native":
            compute_masks(model, data, layer, batch_size=batch_size, device=device, num_workers=args.workers,
                          progress=False)
        else:
            library_masks(model, layer, data, batch_size, device, png_dir)

    run(dataset.subset(8))  # warm-up: thread pools, cuDNN autotuning, lazy imports
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run(dataset)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = min(times)
    if png_dir is not None:
        shutil.rmtree(png_dir)
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    print(json.dumps({"images": len(dataset), "seconds": seconds, "gpu_peak_mb": gpu_peak}))


def measure(args: argparse.Namespace, name: str, n: int, path: str) -> dict:
    """Run one child process; its JSON result plus its peak resident memory."""
    command = [sys.executable, __file__, "--child", name, str(n), path, "--device", args.device,
               "--workers", str(args.workers), "--repeat", str(args.repeat), "--threads", str(args.threads)]
    command += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}")
    return {**json.loads(output.strip().splitlines()[-1]), "rss_peak_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mnist-images", type=int, default=10_000)
    parser.add_argument("--resnet-images", type=int, default=256)
    parser.add_argument("--workloads", nargs="+", default=["mnist", "resnet50"], choices=["mnist", "resnet50"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--batch-size", type=int, help="default: 256 for MNIST, 32 for ResNet-50")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers of path (a)")
    parser.add_argument("--repeat", type=int, default=1, help="time each path this many times, keep the fastest")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child[1] = int(args.child[1])
        return child(args)

    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else platform.processor()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.device} ({device or 'cpu'}), {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cpus, load average {os.getloadavg()[0]:.1f}, fastest of {args.repeat}")
    print(f"{'workload':20s} {'path':28s} {'images':>7s} {'seconds':>8s} {'images/s':>9s} {'peak RSS MB':>12s}"
          + ("  peak GPU MB" if args.device.startswith("cuda") else ""))
    for name in args.workloads:
        n = args.mnist_images if name == "mnist" else args.resnet_images
        results = {}
        for path in args.paths:
            r = results[path] = measure(args, name, n, path)
            gpu = f"  {r['gpu_peak_mb']:11.0f}" if r["gpu_peak_mb"] is not None else ""
            print(f"{name + ' ' + ('28x28' if name == 'mnist' else '224x224'):20s} {PATHS[path]:28s} "
                  f"{r['images']:7d} {r['seconds']:8.2f} {r['images'] / r['seconds']:9.1f} {r['rss_peak_mb']:12.0f}"
                  f"{gpu}", flush=True)
        if "native" in results:
            ratios = [f"(a)/{PATHS[path][:3]} = {results[path]['seconds'] / results['native']['seconds']:.1f}x"
                      for path in ("library", "png") if path in results]
            print(f"{'':20s} speed-up of (a): {', '.join(ratios)}")


if __name__ == "__main__":
    main()
