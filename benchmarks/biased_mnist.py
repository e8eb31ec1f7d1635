"""Biased MNIST over several seeds: accuracy mean +- std per method and test set, stage times, peak memory.

Each seed runs `masktune run <experiment>` (default biased-mnist; also biased-fashion-mnist and the
-selective variants) in its own process, so that its peak memory is measured alone. Runs with
selective classification (`--set selective=true`) also get the error at each coverage.

    python benchmarks/biased_mnist.py --seeds 0 1 2 --epochs 3 --out runs/bench
    python benchmarks/biased_mnist.py --experiment biased-fashion-mnist --set selective=true
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run_seed(experiment: str, seed: int, epochs: int, out: Path, extra: list[str]) -> tuple[dict, float, float]:
    """One run in a child process; returns its results, wall time (s) and peak resident memory (GB)."""
    command = [sys.executable, "-m", "masktune", "run", experiment, "--seed", str(seed), "--epochs", str(epochs),
               "--out", str(out / f"seed{seed}"), "--quiet", "--no-report", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"seed {seed} failed: {' '.join(command)}")
    return json.loads((out / f"seed{seed}" / "results.json").read_text()), wall, usage.ru_maxrss / 2**20


def mean_std(values: list[float], standard_error: bool = False) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    text = f"{statistics.mean(values):6.2f} +- {spread:4.2f}"
    return text + f" (se {spread / len(values) ** 0.5:4.2f})" if standard_error else text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", default="biased-mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="default: runs/bench-<experiment>")
    args, extra = parser.parse_known_args()
    out = args.out or Path(f"runs/bench-{args.experiment}")
    runs = [run_seed(args.experiment, seed, args.epochs, out, extra) for seed in args.seeds]
    results = [r for r, _, _ in runs]
    print(f"{args.experiment}, {args.epochs} ERM epochs, seeds {args.seeds} "
          "(accuracy %, mean +- std over seeds, se = standard error of the mean)")
    for method in results[0]["accuracy"]:
        cells = [f"{test_set} {mean_std([r['accuracy'][method][test_set]['accuracy'] for r in results], True)}"
                 for test_set in results[0]["accuracy"][method]]
        print(f"  {method:9s} " + "   ".join(cells))
    if "masktune" in results[0]["masking"]:
        for key in ("region_fully_covered_percent", "aligned_region_fully_covered_percent",
                    "conflicting_region_fully_covered_percent", "masked_inside_region_percent",
                    "masked_pixels_per_image"):
            values = [r["masking"]["masktune"][key] for r in results if key in r["masking"]["masktune"]]
            if values:
                print(f"  masktune masks {key}: {mean_std(values)}")
    if "selective" in results[0]:
        by_test_set = [r.get("selective_by_test_set") or {r["selective"]["erm"]["test_set"]: r["selective"]}
                       for r in results]
        for test_set in by_test_set[0]:
            print(f"selective classification on {test_set}: error % at target coverage (realised coverage %)")
            for method in by_test_set[0][test_set]:
                table = [b[test_set][method] for b in by_test_set]
                cells = [f"{target}%: {mean_std([t['error_at_coverage'][target]['error'] for t in table])} "
                         f"({statistics.mean(t['error_at_coverage'][target]['coverage'] for t in table):.1f})"
                         for target in table[0]["error_at_coverage"]]
                print(f"  {method:9s} " + "  ".join(cells) + f"  AURC {mean_std([t['aurc'] for t in table])}")
    print("stage times (s, mean +- std):")
    for stage in results[0]["timings_s"]:
        print(f"  {stage:18s} {mean_std([r['timings_s'][stage] for r in results])}")
    print(f"  {'process wall':18s} {mean_std([wall for _, wall, _ in runs])}")
    print(f"peak resident memory (GB): {mean_std([peak for _, _, peak in runs])}")


if __name__ == "__main__":
    main()
