import csv
import io
import json
import math
from pathlib import Path

import pytest

from masktune.pipeline import sweep
from masktune.cli import main
from masktune.errors import MaskTuneError
from masktune.errors import ConfigError


def record(name, setting, values):
    """A runs.jsonl record whose metrics are ``values[(method, test_set, metric)]``."""
    accuracy = {}
    for (method, test_set, metric), value in values.items():
        accuracy.setdefault(method, {}).setdefault(test_set, {"count": 100})[metric] = value
    return {"name": name, "setting": setting, "accuracy": accuracy}


def test_aggregate_against_hand_computed_means_and_stds():
    records = [
        record("a0", {"lr": "0.1"}, {("erm", "biased", "accuracy"): 10.0, ("masktune", "biased", "accuracy"): 90.0}),
        record("a1", {"lr": "0.1"}, {("erm", "biased", "accuracy"): 20.0, ("masktune", "biased", "accuracy"): 94.0}),
        record("a2", {"lr": "0.1"}, {("erm", "biased", "accuracy"): 30.0, ("masktune", "biased", "accuracy"): 98.0}),
        record("b0", {"lr": "0.2"}, {("erm", "biased", "accuracy"): 50.0, ("masktune", "biased", "accuracy"): 70.0}),
    ]
    rows = {(r["setting"], r["method"], r["metric"]): r for r in sweep.aggregate(records)}
    assert set(rows) == {("lr=0.1", "erm", "accuracy"), ("lr=0.1", "masktune", "accuracy"),
                         ("lr=0.2", "erm", "accuracy"), ("lr=0.2", "masktune", "accuracy")}  # "count" is no metric
    # 10, 20, 30: mean 20, sample variance (100 + 0 + 100) / 2 = 100
    assert rows[("lr=0.1", "erm", "accuracy")]["mean"] == pytest.approx(20.0)
    assert rows[("lr=0.1", "erm", "accuracy")]["std"] == pytest.approx(10.0)
    # 90, 94, 98: mean 94, sample variance (16 + 0 + 16) / 2 = 16
    assert rows[("lr=0.1", "masktune", "accuracy")]["mean"] == pytest.approx(94.0)
    assert rows[("lr=0.1", "masktune", "accuracy")]["std"] == pytest.approx(4.0)
    one = rows[("lr=0.2", "erm", "accuracy")]
    assert one["n"] == 1 and one["mean"] == 50.0 and math.isnan(one["std"])

    table = sweep.markdown_table(sweep.aggregate(records)).splitlines()
    assert table[0] == "| setting | method | n | biased accuracy |"
    assert "| lr=0.1 | masktune | 3 | 94.00 ± 4.00 |" in table and "| lr=0.2 | erm | 1 | 50.00 |" in table
    parsed = list(csv.DictReader(io.StringIO(sweep.csv_table(sweep.aggregate(records)))))
    assert parsed[0] == {"setting": "lr=0.1", "method": "erm", "test_set": "biased", "metric": "accuracy",
                         "n": "3", "mean": "20.0", "std": "10.0"}


def test_seeds_and_grid_parsing(tmp_path):
    assert sweep.parse_seeds("0..4") == [0, 1, 2, 3, 4] and sweep.parse_seeds("3,1") == [3, 1]
    with pytest.raises(ConfigError, match="--seeds takes"):
        sweep.parse_seeds("0-4")
    runs = sweep.plan("biased-mnist", [0, 1], ["lr=0.01,0.1", "methods=erm,masktune;masktune",
                                               "data.colour=0,0,255"], {"epochs": "2"}, tmp_path)
    assert len(runs) == 2 * 2 * 2
    assert {(r.config.lr, r.config.methods, r.config.seed) for r in runs} == {
        (lr, methods, seed) for lr in (0.01, 0.1) for methods in (("erm", "masktune"), ("masktune",))
        for seed in (0, 1)}
    assert all(r.config.data["colour"] == (0, 0, 255) and r.config.epochs == 2 for r in runs)
    assert runs[0].setting == {"lr": "0.01", "methods": "erm,masktune"}  # one-value axes are not named
    assert runs[0].config.out_dir == tmp_path / "lr=0.01_methods=erm,masktune_seed0"
    with pytest.raises(ConfigError, match="unknown setting 'bogus'"):
        sweep.plan("biased-mnist", [0], ["bogus=1,2"], {}, tmp_path)
    with pytest.raises(ConfigError, match="use --seeds"):
        sweep.plan("biased-mnist", [0], ["seed=1,2"], {}, tmp_path)


def test_sweep_command_records_runs_skips_finished_ones_and_writes_tables(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    out = tmp_path / "sweep"
    args = ["sweep", "--data-dir", str(tiny_run.data_dir), "--out", str(out), "--seeds", "0..1", "--epochs", "1",
            "--limit", "100", "--val-size", "50", "--methods", "erm", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    lines = (out / "runs.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["name"] for r in records] == ["seed0", "seed1"] and [r["seed"] for r in records] == [0, 1]
    for r in records:
        saved = json.loads((Path(r["out"]) / "results.json").read_text())
        assert r["accuracy"] == saved["accuracy"] and saved["config"]["seed"] == r["seed"]
    biased = [r["accuracy"]["erm"]["biased"]["accuracy"] for r in records]
    mean, std = sum(biased) / 2, abs(biased[0] - biased[1]) / math.sqrt(2)
    assert "| erm | 2 | " in printed and f"{mean:.2f} ± {std:.2f}" in printed
    assert (out / "summary.md").read_text().strip() in printed
    assert (out / "summary.csv").read_text().startswith("setting,method,test_set,metric,n,mean,std\n")

    def no_run(config, **kwargs):
        raise MaskTuneError(f"ran {config.out_dir.name}")

    monkeypatch.setattr(sweep, "run_experiment", no_run)
    assert main(args) == 0
    assert (out / "runs.jsonl").read_text().splitlines() == lines
    assert main([*args, "--seeds", "0..2"]) == 2
    assert "masktune: error: ran seed2" in capsys.readouterr().err  # only the new seed runs
    assert main([*args[:-1], "--epochs", "2", "--quiet"]) == 2
    assert "recorded run seed0 with other settings (epochs: saved 1, now 2)" in capsys.readouterr().err
