"""Sweeps: one experiment over several seeds and a grid of settings, with mean and std tables.

Each run writes into ``SWEEP_DIR/<name>`` and, once finished, appends one JSON line to
``SWEEP_DIR/runs.jsonl``; a sweep started again skips the runs recorded there and resumes an
interrupted one where it stopped. The tables (``summary.md``, ``summary.csv``) give the mean and
the sample standard deviation (n - 1) of every metric per setting, method and test set.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import statistics
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from .. import distributed
from ..errors import ConfigError, RunDirError
from ..storage import atomic_write_bytes, verified, with_checksum
from .config import RunConfig, parse_overrides
from .registry import get_experiment, make_config
from .results import saved_config
from .rundir import RunLock, config_differences
from .runner import check_config, run_experiment


@dataclass
class SweepRun:
    """One run of a sweep: its name (also its folder), seed, grid setting and configuration."""

    name: str
    seed: int
    setting: dict[str, str]
    config: RunConfig


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0..4"`` (inclusive range), ``"0,3,7"`` or ``"5"``."""
    try:
        if ".." in text:
            first, last = (int(part) for part in text.split(".."))
            seeds = list(range(first, last + 1))
        else:
            seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds takes a range like 0..4 or a list like 0,3,7, got {text!r}") from None
    if not seeds:
        raise ConfigError(f"--seeds {text!r} is an empty range; write the smaller seed first, e.g. 1..3")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds must name distinct seeds, got {text!r}")
    return seeds


def grid_values(experiment: str, key: str, text: str) -> list[str]:
    """The values of one ``--set key=...`` axis: split at ``;`` when there is one, else at ``,``
    except for list-valued settings (``methods``, ``data.colour``), whose own values hold commas."""
    if ";" in text:
        return [value.strip() for value in text.split(";") if value.strip()]
    defaults = make_config(experiment)
    value = defaults.data.get(key[len("data."):]) if key.startswith("data.") else getattr(defaults, key, None)
    return [text] if isinstance(value, tuple) else [value.strip() for value in text.split(",")]


def _folder_name(setting: dict[str, str], seed: int) -> str:
    parts = [f"{key}={value}" for key, value in setting.items()] + [f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", "_".join(parts))


def plan(experiment: str, seeds: list[int], grid: list[str], fixed: dict[str, Any], out: Path) -> list[SweepRun]:
    """Every run of the sweep, each setting of the grid (``["key=v1,v2", ...]``) with every seed.

    ``fixed`` holds overrides shared by all runs (typed values or text). Every configuration is
    checked before any runs.
    """
    axes = {key: grid_values(experiment, key, text) for key, text in parse_overrides(grid).items()}
    for key in ("seed", "out"):
        if key in axes or key in fixed:
            raise ConfigError(f"a sweep sets {key} itself; use --seeds and --out")
    varying = [key for key, values in axes.items() if len(values) > 1]
    runs = []
    for point in itertools.product(*axes.values()):
        values = dict(zip(axes, point))
        setting = {key: values[key] for key in varying}
        for seed in seeds:
            name = _folder_name(setting, seed)
            config = make_config(experiment, fixed | values | {"seed": seed, "out": str(out / name)})
            check_config(config)
            runs.append(SweepRun(name, seed, setting, config))
    return runs


def read_records(path: Path) -> dict[str, dict]:
    """The finished runs recorded in ``runs.jsonl``, by name; each line's checksum is checked."""
    if not path.is_file():
        return {}
    fix = f"delete {path} to run the sweep's runs again (each finished run folder shows its results at once)"
    try:
        records = [verified(json.loads(line), f"{path}, line {i}", RunDirError, fix)
                   for i, line in enumerate(path.read_bytes().decode("utf-8").splitlines(), 1)]
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RunDirError(f"cannot read {path} ({' '.join(str(error).split())[:200]}); {fix}") from None
    return {record["name"]: record for record in records}


def run_sweep(runs: list[SweepRun], out: Path, *, progress: bool = True) -> list[dict]:
    """Run every run of ``runs`` not yet recorded in ``out/runs.jsonl``, record each as it finishes,
    and write the tables; returns the records of all ``runs`` in order."""
    log = out / "runs.jsonl"
    with distributed.session(runs[0].config.device):
        with RunLock(out) if distributed.is_main() else nullcontext():
            records = read_records(log)
            for run in runs:
                expected = saved_config(get_experiment(run.config.experiment), run.config)
                if run.name in records:
                    differences = config_differences(records[run.name]["config"], expected)
                    if differences:
                        raise RunDirError(
                            f"{out} recorded run {run.name} with other settings ({'; '.join(differences)}); "
                            "repeat the sweep's earlier command, or pass another --out"
                        )
                    distributed.note(f"sweep: {run.name} finished before; skipped", progress)
                    continue
                distributed.note(f"sweep: run {run.name}", progress)
                results = run_experiment(run.config, progress=progress)
                records[run.name] = {"name": run.name, "seed": run.seed, "setting": run.setting,
                                     "out": str(run.config.out_dir), "config": expected,
                                     "accuracy": results["accuracy"]}
                if distributed.is_main():
                    lines = "".join(json.dumps(with_checksum(record)) + "\n" for record in records.values())
                    atomic_write_bytes(log, lines.encode())
            finished = [records[run.name] for run in runs]
            if distributed.is_main():
                rows = aggregate(finished)
                atomic_write_bytes(out / "summary.md", (markdown_table(rows) + "\n").encode())
                atomic_write_bytes(out / "summary.csv", csv_table(rows).encode())
    return finished


def _setting_label(setting: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in setting.items())


def aggregate(records: list[dict]) -> list[dict]:
    """Mean and sample std (n - 1; NaN for one run) of every metric over the records of each
    setting, per method and test set. Rows keep the order in which the records name them."""
    values: dict[tuple[str, str, str, str], list[float]] = defaultdict(list)
    for record in records:
        for method, per_set in record["accuracy"].items():
            for test_set, metrics in per_set.items():
                for metric, value in metrics.items():
                    if metric != "count" and isinstance(value, (int, float)):
                        values[(_setting_label(record["setting"]), method, test_set, metric)].append(float(value))
    return [{"setting": setting, "method": method, "test_set": test_set, "metric": metric, "n": len(v),
             "mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else math.nan}
            for (setting, method, test_set, metric), v in values.items()]


def markdown_table(rows: list[dict]) -> str:
    """One line per setting and method, one column per test set and metric: ``mean ± std`` (n runs)."""
    columns = list(dict.fromkeys((row["test_set"], row["metric"]) for row in rows))
    cells: dict[tuple[str, str], dict] = defaultdict(dict)
    runs: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["setting"], row["method"])
        spread = "" if math.isnan(row["std"]) else f" ± {row['std']:.2f}"
        cells[key][(row["test_set"], row["metric"])] = f"{row['mean']:.2f}{spread}"
        runs[key] = max(runs.get(key, 0), row["n"])
    with_setting = any(setting for setting, _ in cells)
    header = (["setting"] if with_setting else []) + ["method", "n"] + [f"{t} {m}" for t, m in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (setting, method), row in cells.items():
        first = ([setting] if with_setting else []) + [method, str(runs[(setting, method)])]
        lines.append("| " + " | ".join(first + [row.get(column, "") for column in columns]) + " |")
    return "\n".join(lines)


def csv_table(rows: list[dict]) -> str:
    """The rows as CSV: setting, method, test_set, metric, n, mean, std."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["setting", "method", "test_set", "metric", "n", "mean", "std"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
