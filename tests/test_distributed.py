"""Several processes through torch.distributed (gloo on the CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from masktune import compute_masks
from masktune.cli import main
from masktune.pipeline import EXPERIMENTS, Experiment, get_experiment, make_config
from masktune.pipeline.rundir import MaskStore
from masktune.data.loader import EpochBatches
from masktune.storage import load_torch

# Accuracy points by which a 2-process run may differ from a 1-process one. With BatchNorm each
# process normalises its half of every batch and keeps rank 0's running statistics; without it the
# runs differ only in the order of float sums, and at most one test image (0.5 points) may flip.
TOLERANCE = 3.0

# Runs inside each torchrun process: the two runs below in one process group, through the CLI.
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_distributed import plain_experiment
from masktune import distributed
from masktune.cli import main
from masktune.pipeline import register
register(plain_experiment())
with distributed.session():
    sys.exit(max(main(argv) for argv in {runs!r}))
"""


def plain_cnn(config, num_classes):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 5 * 5, num_classes))


def plain_experiment():
    """"plain-mnist": biased MNIST with a CNN without BatchNorm, which 2 processes train as 1 does
    (each takes half of every batch of 20 and DDP averages the gradients)."""
    biased = EXPERIMENTS["biased-mnist"]
    return Experiment("plain-mnist", 1, "biased MNIST, CNN without BatchNorm", biased.build_data, plain_cnn,
                      biased.defaults, biased.data_options)


def test_shards_of_each_batch_make_up_the_single_process_batch():
    single = list(EpochBatches(10, 4, seed=3))
    assert sorted(i for batch in single for i in batch) == list(range(10)) and [len(b) for b in single] == [4, 4, 2]
    for shards in (2, 3):
        parts = [list(EpochBatches(10, 4, seed=3, shard=s, shards=shards)) for s in range(shards)]
        for step, batch in enumerate(single):
            pieces = [part[step] for part in parts]
            assert all(pieces)  # every process takes every step
            if len(batch) >= shards:
                assert sum(pieces, []) == batch
            else:  # fewer samples than processes: the ones left over repeat a sample of the batch
                assert set(sum(pieces, [])) == set(batch)
    assert list(EpochBatches(10, 4, seed=3)) != list(EpochBatches(10, 4, seed=4))


def load(out, name):
    return load_torch(out / "checkpoints" / f"{name}.pt")["model"]


def assert_masks_are_the_single_process_masks(out, model, tiny_run):
    """Each process masked its shard of each chunk: gathered, they equal one process masking all."""
    config = make_config("biased-mnist", {"data_dir": str(tiny_run.data_dir), "data.val_size": "100"})
    train = get_experiment("biased-mnist").build_data(config).train.subset(300)
    model.load_state_dict(load(out, "erm_best"))
    assert torch.equal(MaskStore(out / "masks" / "masktune").load_all().unpack(),
                       compute_masks(model, train, progress=False).unpack())


def test_two_gloo_processes_match_one_process(tiny_run, reference_run, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    monkeypatch.setitem(EXPERIMENTS, "plain-mnist", plain_experiment())
    assert main(tiny_run.args(tmp_path / "plain", experiment="plain-mnist")) == 0

    runs = [tiny_run.args(tmp_path / "ddp-plain", experiment="plain-mnist"), tiny_run.args(tmp_path / "ddp")]
    script = tmp_path / "two_runs.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), runs=runs))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    launched = subprocess.run(command, env=tiny_run.env(), capture_output=True, text=True, timeout=600)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("results:") == 2  # rank 0 prints, the other rank does not

    for single, ddp in ((tmp_path / "plain", tmp_path / "ddp-plain"), (reference_run, tmp_path / "ddp")):
        a, b = (json.loads((out / "results.json").read_text()) for out in (single, ddp))
        assert (a["environment"]["world_size"], b["environment"]["world_size"]) == ("1", "2")
        assert a["sizes"] == b["sizes"]
        model = get_experiment(a["config"]["experiment"]).build_model(make_config(a["config"]["experiment"]), 2)
        assert_masks_are_the_single_process_masks(ddp, model, tiny_run)
        exact = single.name == "plain"
        for method, per_set in a["accuracy"].items():
            for test_set, metrics in per_set.items():
                gap = abs(b["accuracy"][method][test_set]["accuracy"] - metrics["accuracy"])
                assert gap <= (0.5 if exact else TOLERANCE), (single, method, test_set)
        assert min(a["accuracy"]["masktune"][t]["accuracy"] for t in ("original", "biased")) > 90  # both learnt
    # without BatchNorm, 2 processes compute the same steps as 1, up to the order of float sums
    for name in ("erm_last", "masktune", "randmask"):
        a, b = load(tmp_path / "plain", name), load(tmp_path / "ddp-plain", name)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
