"""The API as a new user meets it: the README's example, one augmentation contract, a lone last
batch, group metrics that say when they are missing, and typed settings from the command line."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import masktune
from masktune import BatchAugment, ImageDataset, TrainSettings, evaluate, train_erm
from masktune.cli import main
from masktune.data import EpochBatches
from masktune.errors import ConfigError
from test_data import fake_arrays

README = Path(__file__).parents[1] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    return re.search(r"<!-- example: own model and data -->\n```python\n(.*?)```", text, re.S).group(1)


def test_the_readme_example_runs_as_written(monkeypatch, tmp_path, capsys):
    make = masktune.make_biased_mnist
    monkeypatch.setattr(masktune, "load_mnist", lambda: fake_arrays())  # 2,000 training images instead of 60,000
    monkeypatch.setattr(masktune, "make_biased_mnist",
                        lambda arrays, config: make(arrays, dataclasses.replace(config, val_size=200)))
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert printed.startswith("ERM {'original': {'accuracy'") and "\nMaskTune {'original'" in printed
    assert "worst_group_accuracy" in printed
    assert masktune.MaskSet.load(tmp_path / "masks.pt").meta["layer"] == "5"


def test_batch_augment_is_for_batches_and_says_so():
    with pytest.raises(ConfigError, match=r"transforms a batch \[B, C, H, W\].*got a tensor of shape \(3, 8, 8\)"):
        BatchAugment(flip=True)(torch.rand(3, 8, 8))
    assert BatchAugment(flip=True)(torch.rand(2, 3, 8, 8)).shape == (2, 3, 8, 8)


def test_an_augment_that_changes_the_batch_shape_is_refused():
    data = ImageDataset(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.arange(8) % 2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ConfigError, match=r"augment must return a batch of the shape it was given, \(4, 1, 4, 4\)"):
        train_erm(model, data, settings=TrainSettings(batch_size=4, augment=lambda b: b[0], progress=False), epochs=1)


def test_a_lone_last_image_joins_the_batch_before_it():
    assert [len(b) for b in EpochBatches(129, 128, seed=0)] == [129]
    assert [len(b) for b in EpochBatches(257, 128, seed=0)] == [128, 129]
    assert [len(b) for b in EpochBatches(130, 128, seed=0)] == [128, 2]
    assert sorted(sum(EpochBatches(257, 128, seed=0), [])) == list(range(257))
    assert len(EpochBatches(257, 128, seed=0)) == 2


def test_a_run_whose_last_batch_is_one_image_trains(mnist_dir, tmp_path, capsys):
    # 600 fixture images, 471 of them training after the validation split, limited to 129 = 128 + 1
    args = ["run", "--data-dir", str(mnist_dir), "--limit", "129", "--val-size", "129", "--epochs", "1", "--quiet",
            "--no-report", "--methods", "erm,masktune", "--out", str(tmp_path / "run")]
    assert main(args) == 0, capsys.readouterr().err


def test_evaluate_says_when_a_dataset_has_no_groups():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    plain = ImageDataset(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6) % 2)
    grouped = ImageDataset(plain.images, plain.labels, {"spurious": torch.arange(6) % 3 == 0})
    results = evaluate(model, {"plain": plain, "grouped": grouped})
    assert "metadata['spurious']" in results["plain"]["groups_unavailable"]
    assert "worst_group_accuracy" not in results["plain"]
    assert "groups_unavailable" not in results["grouped"] and "worst_group_accuracy" in results["grouped"]


def test_command_line_values_reach_the_configuration_typed(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_code:
        main(["run", "--epochs", "1.5", "--out", str(tmp_path / "a"), "--quiet"])
    assert exit_code.value.code == 2 and "epochs must be a whole number, got '1.5'" in capsys.readouterr().err
    assert main(["run", "--set", "iterations=2.5", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "iterations must be a whole number, got '2.5'" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    config = masktune.make_config("biased-mnist", {"methods": ("erm", "masktune"), "data.colour": (0, 255, 0),
                                                   "lr": 1, "mask_param": "2"})
    assert config.methods == ("erm", "masktune") and config.data["colour"] == (0, 255, 0)
    assert config.lr == 1.0 and isinstance(config.lr, float) and config.mask_param == 2.0
