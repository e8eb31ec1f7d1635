"""The GPU check: one script, under 5 minutes on one GPU, that prints one table.

1. The default biased-MNIST run on the GPU: accuracies (which must fall within the CPU seed-to-seed
   spread) and the time of each stage.
2. ResNet-50 at 224 px on random images: training images/s in float32 and in bfloat16 autocast,
   and masking images/s of the native path against pytorch-grad-cam's XGradCAM (where installed).
3. A Waterbirds-format run (benchmarks/input_pipeline.py's generated data) on the GPU, through the
   decoded-image cache.
4. A one-process torchrun with NCCL: a collective, then a short biased-MNIST run under torchrun.

    PYTHONPATH=src python benchmarks/gpu_check.py [--device cuda] [--smoke]

MNIST must be in ``$MASKTUNE_HOME`` (the GPU machine reaches no network: carry ``.cache/masktune``).
``--smoke`` runs every section at a tiny size (on the CPU too), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import input_pipeline  # noqa: E402

from masktune import ImageDataset, TrainSettings, compute_masks, resnet50, train_erm  # noqa: E402

# masktune's own 10-seed figures on the CPU (README, "Faithful to the authors"): mean, std
CPU_SPREAD = {("erm", "biased"): (21.32, 3.29), ("masktune", "biased"): (98.29, 0.46),
              ("masktune", "original"): (98.70, 0.23)}
ROWS: list[tuple[str, str, str]] = []


def row(check: str, figure: str, verdict: str = "") -> None:
    ROWS.append((check, figure, verdict))
    print(f"  {check}: {figure} {verdict}", file=sys.stderr, flush=True)


def masktune_cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> tuple[int, str]:
    command = (launcher or [sys.executable, "-m"]) + ["masktune", *args]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return result.returncode, result.stdout + result.stderr


def biased_mnist(device: str, out: Path, smoke: bool) -> None:
    extra = ["--limit", "3000", "--epochs", "1"] if smoke else []
    started = time.perf_counter()
    code, text = masktune_cli("run", "biased-mnist", "--device", device, "--seed", "0", "--out", str(out), "--quiet",
                              "--no-report", *extra)
    if code:
        row("biased MNIST, default run", f"exit {code}", "FAIL: " + text.strip().splitlines()[-1])
        return
    results = json.loads((out / "results.json").read_text())
    for (method, test_set), (mean, std) in CPU_SPREAD.items():
        value = results["accuracy"][method][test_set]["accuracy"]
        inside = abs(value - mean) <= 3 * std
        row(f"biased MNIST {method} {test_set} (%)", f"{value:.2f}",
            f"{'ok' if inside else 'OUTSIDE'} the CPU spread {mean} ± 3 x {std}" + (" (smoke size)" if smoke else ""))
    stages = ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items())
    row("biased MNIST stage times (s)", stages, f"wall {time.perf_counter() - started:.0f} s")


def resnet_throughput(device: str, smoke: bool) -> None:
    n, size = (64, 64) if smoke else (3072, 224)
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                        torch.randint(0, 2, (n,), generator=g))
    for precision in ("float32", "bfloat16"):
        model = resnet50(2, pretrained=False)
        settings = TrainSettings(batch_size=128 if not smoke else 16, device=device, precision=precision,
                                 progress=False, lr=1e-3)
        train_erm(model, data.subset(min(n, 512)), settings=settings, epochs=1)  # warm-up: kernels, allocator
        _sync(device)
        started = time.perf_counter()
        train_erm(model, data, settings=settings, epochs=1)
        _sync(device)
        row(f"ResNet-50 {size} px training, {precision}", f"{n / (time.perf_counter() - started):,.0f} images/s")
    model = resnet50(2, pretrained=False).eval()
    compute_masks(model, data.subset(128), device=device, progress=False)
    _sync(device)
    started = time.perf_counter()
    compute_masks(model, data, device=device, progress=False)
    _sync(device)
    native = n / (time.perf_counter() - started)
    row(f"ResNet-50 {size} px masking, native xGradCAM (auto precision)", f"{native:,.0f} images/s")
    try:
        from pytorch_grad_cam import XGradCAM
    except ImportError:
        row("ResNet-50 masking, pytorch-grad-cam", "not installed", "(carry grad-cam and ttach wheels to compare)")
        return
    layer = model.get_submodule(model.cam_layer)
    with XGradCAM(model=model, target_layers=[layer]) as cam:
        count = min(n, 512)
        started = time.perf_counter()
        for start in range(0, count, 64):
            cam(data.__getitems__(list(range(start, min(start + 64, count))))[0].to(device).float() / 255, targets=None)
        library = count / (time.perf_counter() - started)
    row(f"ResNet-50 {size} px masking, pytorch-grad-cam XGradCAM", f"{library:,.0f} images/s",
        f"native is {native / library:.1f}x")


def waterbirds(device: str, root: Path, smoke: bool) -> None:
    input_pipeline.write_waterbirds(root, 0.02 if smoke else 0.25)
    started = time.perf_counter()
    code, text = masktune_cli("run", "waterbirds", "--data-dir", str(root), "--no-pretrained", "--device", device,
                              "--epochs", "1" if smoke else "3", "--out", str(root.parent / "wb-run"),
                              "--cache-dir", str(root.parent / "cache"), "--quiet", "--no-report",
                              *(["--set", "data.image_size=64"] if smoke else []))
    if code:
        row("Waterbirds-format run", f"exit {code}", "FAIL: " + text.strip().splitlines()[-1])
        return
    results = json.loads((root.parent / "wb-run" / "results.json").read_text())
    test = results["accuracy"]["masktune"]["test"]
    row("Waterbirds-format run (random init, generated data)",
        f"MaskTune test {test['accuracy']:.1f}%, worst group {test['worst_group_accuracy']:.1f}%",
        f"{results['sizes']['train']} training images, wall {time.perf_counter() - started:.0f} s, stages "
        + ", ".join(f"{k} {v:.1f}" for k, v in results["timings_s"].items()))


NCCL_PROBE = ("import os, torch, torch.distributed as dist; torch.cuda.set_device(int(os.environ['LOCAL_RANK'])); "
              "dist.init_process_group('nccl'); x = torch.ones(4, device='cuda'); dist.all_reduce(x); "
              "print('all_reduce', x.tolist()); dist.destroy_process_group()")


def torchrun(device: str, out: Path, smoke: bool) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    if device.startswith("cuda"):
        probe = subprocess.run([*launcher, "-c", NCCL_PROBE], capture_output=True, text=True)
        row("torchrun, 1 process, NCCL all_reduce", "ok" if "all_reduce [1.0" in probe.stdout else "FAIL",
            probe.stderr.strip().splitlines()[-1] if probe.returncode else "")
    code, text = masktune_cli("run", "biased-mnist", "--device", device, "--limit", "3000" if smoke else "12000",
                              "--epochs", "1", "--methods", "erm,masktune", "--out", str(out), "--quiet", "--no-report",
                              launcher=[*launcher, "-m"])
    row("torchrun, 1 process, masktune run biased-mnist", "ok" if code == 0 else f"exit {code}",
        text.strip().splitlines()[-1] if code else "")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    args = parser.parse_args()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="masktune-gpu-check-") as tmp:
        for section in (lambda: biased_mnist(args.device, Path(tmp) / "mnist", args.smoke),
                        lambda: resnet_throughput(args.device, args.smoke),
                        lambda: waterbirds(args.device, Path(tmp) / "waterbirds", args.smoke),
                        lambda: torchrun(args.device, Path(tmp) / "torchrun", args.smoke)):
            try:
                section()
            except Exception as error:  # one broken section must not hide the others' figures
                row("section failed", type(error).__name__, " ".join(str(error).split())[:300])
    print(f"GPU check on {name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s"
          + (" (smoke sizes)" if args.smoke else ""))
    print("| check | figure | verdict |\n|---|---|---|")
    for check, figure, verdict in ROWS:
        print(f"| {check} | {figure} | {verdict} |")


if __name__ == "__main__":
    main()
