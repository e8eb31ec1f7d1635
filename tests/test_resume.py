"""Kill-and-resume, the run lock, and refusing to mix settings in one run directory."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

from masktune import TrainSettings, train_erm
from masktune.pipeline import runner
from masktune.cli import main
from masktune.masks import MaskSet
from masktune.errors import RunDirError
from masktune.pipeline.rundir import MaskStore, RunLock
from masktune.storage import load_torch

# Runs masktune's CLI and SIGKILLs itself at the point named by KILL_AT: "train:<epoch description>"
# kills after two batches of that epoch, "masking" when the second mask chunk starts.
KILLER = r"""
import os, signal, sys
import masktune.masks.compute as compute, masktune.training as training

point = os.environ["KILL_AT"]

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("train:"):
    original_epoch = training.train_epoch

    def train_epoch(model, loader, optimizer, device, desc="train", *args):
        def batches():
            for i, batch in enumerate(loader):
                if i == 2:
                    kill()
                yield batch
        return original_epoch(model, batches() if desc == point[6:] else loader, optimizer, device, desc, *args)

    training.train_epoch = train_epoch
else:
    original_masks, calls = compute.Masker.__call__, []

    def masks_of(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            kill()
        return original_masks(*args, **kwargs)

    compute.Masker.__call__ = masks_of

from masktune.cli import main
sys.exit(main(sys.argv[1:]))
"""

SAME = ("accuracy", "masking", "history", "erm_best_epoch", "sizes")


def results(out):
    return json.loads((out / "results.json").read_text())


def assert_same_run(out, reference):
    a, b = results(out), results(reference)
    assert {key: a[key] for key in SAME} == {key: b[key] for key in SAME}
    for name in ("erm_best", "erm_last", "randmask", "masktune"):
        sa, sb = (load_torch(d / "checkpoints" / f"{name}.pt") for d in (out, reference))
        sa, sb = (s["model"] for s in (sa, sb))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert MaskStore(out / "masks" / "masktune").load_all() == MaskStore(reference / "masks" / "masktune").load_all()


@pytest.mark.parametrize("point", ["train:ERM epoch 2", "masking", "train:masktune epoch 1"])
def test_sigkill_then_rerun_gives_the_uninterrupted_results(point, tiny_run, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLER, *tiny_run.args(out)], env={**tiny_run.env(), "KILL_AT": point},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "results.json").exists()
    assert (out / "run.lock").exists()  # left behind by the killed process: must not block the resume
    chunks = sorted(p.name for p in (out / "masks" / "masktune").glob("*.pt"))
    if point == "train:ERM epoch 2":
        assert load_torch(out / "checkpoints" / "erm_last.pt")["epoch"] == 1 and not chunks
    elif point == "masking":
        assert chunks == ["000000000-000000100.pt"] and not (out / "checkpoints" / "masktune.pt").exists()
    else:
        assert len(chunks) == 3 and (out / "checkpoints" / "randmask.pt").exists()
        assert not (out / "checkpoints" / "masktune.pt").exists()
    assert not list(out.rglob("*.tmp"))

    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    assert main(tiny_run.args(out)) == 0
    assert results(out)["resumed"] and not results(reference_run)["resumed"]
    assert_same_run(out, reference_run)
    assert not (out / "run.lock").exists()


def test_finished_run_is_reloaded_not_rerun(tiny_run, reference_run, monkeypatch, capsys):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    before = (reference_run / "results.json").read_text()

    def no_rerun(*args, **kwargs):
        raise AssertionError("a finished run was run again")

    monkeypatch.setattr(runner, "_run", no_rerun)
    assert main(tiny_run.args(reference_run)) == 0
    printed = capsys.readouterr().out
    assert "masktune" in printed and f"{results(reference_run)['accuracy']['masktune']['biased']['accuracy']:.2f}" in printed
    assert (reference_run / "results.json").read_text() == before


def test_other_settings_in_the_same_run_directory_are_refused(tiny_run, reference_run, monkeypatch, capsys):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    before = {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")}
    assert main(tiny_run.args(reference_run, "--lr", "0.05")) == 2
    err = capsys.readouterr().err
    assert "other settings (" in err and "lr: saved 0.01, now 0.05)" in err and "another --out" in err
    assert {p: p.stat().st_mtime_ns for p in reference_run.rglob("*")} == before
    # settings that do not change results may differ
    assert main(tiny_run.args(reference_run, "--num-workers", "1")) == 0


def test_a_second_writer_is_refused_and_a_dead_holder_does_not_block(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    out = tmp_path / "run"
    quick = ("--methods", "erm", "--epochs", "1", "--limit", "60")
    with RunLock(out):
        assert main(tiny_run.args(out, *quick)) == 2
        err = capsys.readouterr().err
        assert f"being written by another masktune run (pid {os.getpid()}" in err
        assert not (out / "config.json").exists()
    assert not out.exists()  # the lock made the folder and nothing else was written there
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out.mkdir()
    (out / "run.lock").write_text(f"pid {dead.pid} on this host\n")
    assert main(tiny_run.args(out, *quick)) == 0


class Bright(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(n)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.images = torch.rand(n, 1, 6, 6, generator=g) + self.labels.view(-1, 1, 1, 1).float()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def dropout_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 2))


def test_train_erm_resumes_epoch_by_epoch_with_the_random_state(tmp_path):
    """Dropout draws from the global random state: a resumed run must replay the same draws."""
    settings = TrainSettings(lr=0.05, batch_size=16, progress=False)
    full = train_erm(dropout_model(), Bright(96), Bright(32), settings, epochs=4, checkpoint_dir=tmp_path / "full")
    torch.manual_seed(123)
    train_erm(dropout_model(), Bright(96), Bright(32), settings, epochs=2, checkpoint_dir=tmp_path / "part")
    torch.manual_seed(456)  # whatever happens in between
    resumed = train_erm(dropout_model(), Bright(96), Bright(32), settings, epochs=4, checkpoint_dir=tmp_path / "part",
                        resume=True)
    assert resumed.history == full.history
    assert resumed.best.epoch == full.best.epoch and resumed.last.epoch == 4
    assert all(torch.equal(resumed.last.model[k], full.last.model[k]) for k in full.last.model)
    assert all(torch.equal(resumed.best.model[k], full.best.model[k]) for k in full.best.model)


def test_mask_chunks_round_trip_bit_packed(tmp_path):
    masks = torch.rand(10, 5, 13) > 0.5  # 65 pixels: not a multiple of 8
    store = MaskStore(tmp_path)
    assert store.load(0, 6) is None
    store.save(0, 6, MaskSet.from_bool(masks[:6], layer="block4"))
    store.save(6, 10, MaskSet.from_bool(masks[6:], layer="block4"))
    assert torch.equal(store.load(6, 10).unpack(), masks[6:])
    whole = store.load_all()
    assert torch.equal(whole.unpack(), masks) and whole.meta == {"layer": "block4"}
    assert load_torch(tmp_path / "000000000-000000006.pt")["packed"].shape == (6, 9)  # ceil(65 / 8) bytes a mask


def test_mask_chunk_of_other_settings_or_damaged_is_refused(tmp_path):
    store = MaskStore(tmp_path)
    store.save(0, 4, MaskSet.from_bool(torch.rand(4, 5, 5) > 0.5, model_fingerprint="a"))
    assert store.load(0, 4, expect={"model_fingerprint": "a"}) is not None
    with pytest.raises(RunDirError, match="delete that folder"):
        store.load(0, 4, expect={"model_fingerprint": "b"})
    (tmp_path / "000000004-000000008.pt").write_bytes(b"half a file")
    with pytest.raises(RunDirError, match="damaged"):
        store.load(4, 8)


def test_unwritable_run_directory_is_explained(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert main(["run", "--out", str(tmp_path / "file" / "run"), "--quiet"]) == 2
    assert "cannot write into" in capsys.readouterr().err
