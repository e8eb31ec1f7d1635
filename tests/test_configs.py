"""A full tiny run through every registered experiment, on fixtures in the real on-disk formats."""

import dataclasses
import json

import pytest

from conftest import write_mnist_raw
from dataset_fixtures import (CATS_VS_DOGS_COUNTS, CELEBA_COUNTS, WATERBIRDS_COUNTS, write_cats_vs_dogs, write_celeba,
                              write_cifar10, write_image, write_image_csv, write_in9l, write_svhn, write_waterbirds)
from masktune.data.augment import BatchAugment
from masktune.cli import main
from masktune.pipeline import EXPERIMENTS, make_config
from masktune.models import CifarResNet, Normalized
from masktune.storage import load_torch

FAST = ["--epochs", "1", "--quiet", "--batch-size", "8", "--num-workers", "0"]
RESNET50_EXPERIMENTS = ("waterbirds", "celeba", "in9l", "image-csv")


@pytest.fixture
def tiny_resnet50_stand_in(monkeypatch):
    """ResNet-50 at a trainable size is too slow for the test suite: the ResNet-50 experiments get a
    randomly initialised depth-8 CIFAR ResNet instead (their own model is tested below and in test_models)."""
    for name in RESNET50_EXPERIMENTS:
        monkeypatch.setitem(EXPERIMENTS, name, dataclasses.replace(
            EXPERIMENTS[name], build_model=lambda config, num_classes: CifarResNet(num_classes, depth=8)))


def run(experiment, data_dir, out, *extra):
    code = main(["run", experiment, "--data-dir", str(data_dir), "--out", str(out), *FAST, *extra])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    saved = json.loads((out / "config.json").read_text())
    assert saved["experiment"] == experiment and saved["version"] == EXPERIMENTS[experiment].version
    return results


def counts(table):
    return {f"y={y},spurious={s}": n for (y, s), n in sorted(table.items())}


def check_groups(results, test_set, expected_counts):
    for metrics in results["accuracy"].values():
        groups = metrics[test_set]["groups"]
        assert {k: g["count"] for k, g in groups.items()} == expected_counts
        assert metrics[test_set]["worst_group_accuracy"] == min(g["accuracy"] for g in groups.values())
        weighted = metrics[test_set]["train_weighted_accuracy"]
        assert weighted is None if metrics[test_set]["empty_groups"] else 0 <= weighted <= 100


def check_selective(results, test_set):
    for method in ("erm", "masktune"):
        selective = results["selective"][method]
        assert selective["test_set"] == test_set
        assert list(selective["error_at_coverage"]) == ["80", "85", "90", "95", "100"]
        assert len(selective["coverage"]) == len(selective["risk"]) >= 1
        assert selective["coverage"][-1] == pytest.approx(100.0)
        assert 0 <= selective["aurc"] <= 100


def test_waterbirds_run(tmp_path, tiny_resnet50_stand_in):
    results = run("waterbirds", write_waterbirds(tmp_path / "wb"), tmp_path / "out", "--set", "data.image_size=16")
    assert results["sizes"] == {"train": 9, "val": 8, "test": 6}
    assert results["train_group_counts"] == counts(WATERBIRDS_COUNTS["train"])
    check_groups(results, "test", counts(WATERBIRDS_COUNTS["test"]))
    assert set(results["accuracy"]) == {"erm", "masktune"}
    assert results["config"]["lr"] == 1e-4 and results["config"]["data"] == {"image_size": 16, "augment": True}


def test_celeba_run_with_attribute_options(tmp_path, tiny_resnet50_stand_in):
    results = run("celeba", write_celeba(tmp_path / "celeba"), tmp_path / "out", "--set", "data.image_size=16",
                  "--set", "data.spurious=Male", "--methods", "erm")
    assert results["train_group_counts"] == counts(CELEBA_COUNTS[0])
    check_groups(results, "test", counts(CELEBA_COUNTS[2]))
    assert results["config"]["batch_size"] == 8 and results["config"]["epochs"] == 1


def test_in9l_run_reports_bg_gap(tmp_path, tiny_resnet50_stand_in):
    results = run("in9l", write_in9l(tmp_path / "in9l"), tmp_path / "out", "--set", "data.image_size=16")
    assert results["sizes"] == {"train": 18, "val": 9, "original": 9, "mixed_same": 9, "mixed_rand": 9,
                                "mixed_next": 9}
    for method in ("erm", "masktune"):
        accuracy = results["accuracy"][method]
        assert results["summary"][method]["bg_gap"] == pytest.approx(
            accuracy["mixed_same"]["accuracy"] - accuracy["mixed_rand"]["accuracy"])


def test_image_csv_run_with_two_test_sets(tmp_path, tiny_resnet50_stand_in):
    results = run("image-csv", write_image_csv(tmp_path / "csv"), tmp_path / "out", "--set", "data.image_size=16",
                  "--set", "selective=true")
    assert results["sizes"] == {"train": 6, "val": 2, "test": 3, "test_ood": 2}
    check_groups(results, "test_ood", {"y=0,spurious=0": 1, "y=1,spurious=1": 1})
    check_selective(results, "test")
    assert set(results["selective_by_test_set"]) == {"test", "test_ood"}


def test_cifar10_run(tmp_path):
    results = run("cifar10", write_cifar10(tmp_path / "c10", per_batch=20), tmp_path / "out")
    assert results["sizes"] == {"train": 80, "val": 20, "test": 20}
    check_selective(results, "test")
    assert results["config"]["lr"] == 0.1 and results["config"]["weight_decay"] == 1e-4


def test_svhn_run(tmp_path):
    results = run("svhn", write_svhn(tmp_path / "svhn"), tmp_path / "out", "--set", "coverages=50,100")
    assert results["sizes"] == {"train": 16, "val": 4, "test": 10}
    assert list(results["selective"]["masktune"]["error_at_coverage"]) == ["50", "100"]
    assert results["config"]["weight_decay"] == 5e-4


def test_cats_vs_dogs_run_uses_adam(tmp_path):
    results = run("catsvsdogs", write_cats_vs_dogs(tmp_path / "cvd"), tmp_path / "out", "--set", "data.image_size=16")
    assert results["sizes"] == {"train": 8, "val": 2, "test": sum(CATS_VS_DOGS_COUNTS["test"].values())}
    check_selective(results, "test")
    assert results["config"]["optimizer"] == "adam" and results["config"]["lr"] == 1e-3
    optimizer = load_torch(tmp_path / "out" / "checkpoints" / "erm_last.pt")["optimizer"]
    assert "exp_avg_sq" in next(iter(optimizer["state"].values()))  # Adam's state


@pytest.mark.parametrize("experiment", ["biased-fashion-mnist", "biased-fashion-mnist-selective"])
def test_biased_fashion_mnist_runs(tmp_path, monkeypatch, experiment):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    write_mnist_raw(tmp_path / "FashionMNIST" / "raw")
    results = run(experiment, tmp_path, tmp_path / "out", "--limit", "200", "--val-size", "100")
    assert results["sizes"] == {"train": 200, "val": 100, "original": 200, "biased": 200}
    assert results["masking"]["masktune"]["region_coverage_percent"] >= 0
    if experiment.endswith("selective"):
        check_selective(results, "original")
        assert set(results["selective_by_test_set"]) == {"original", "biased"}
    else:
        assert "selective" not in results and set(results["accuracy"]) == {"erm", "randmask", "masktune"}


def test_biased_mnist_selective_run(tmp_path, mnist_dir):
    results = run("biased-mnist-selective", mnist_dir, tmp_path / "out", "--limit", "200", "--val-size", "100",
                  "--set", "selective_test=biased")
    check_selective(results, "biased")


def test_resnet50_experiments_build_their_own_model():
    for name in RESNET50_EXPERIMENTS[:3]:
        model = EXPERIMENTS[name].build_model(make_config(name, {"pretrained": "false"}), 2)
        assert isinstance(model, Normalized) and model.cam_layer == "model.layer4.2"
    assert model.mean.flatten().tolist() == pytest.approx([0.4717, 0.4499, 0.3837])  # in9l's own statistics


def test_augmentation_option(tmp_path):
    root = write_waterbirds(tmp_path)
    for value, expected in (("true", BatchAugment), ("false", type(None))):
        config = make_config("waterbirds", {"data_dir": str(root), "data.augment": value, "data.image_size": "8"})
        assert isinstance(EXPERIMENTS["waterbirds"].build_data(config).augment, expected)


@pytest.mark.parametrize("experiment, words", [
    ("waterbirds", ["metadata.csv", "nlp.stanford.edu"]),
    ("celeba", ["list_attr_celeba.csv"]),
    ("in9l", ["train", "backgrounds_challenge"]),
    ("image-csv", ["metadata.csv"]),
    ("cifar10", ["data_batch_1"]),
    ("svhn", ["train_32x32.mat"]),
    ("catsvsdogs", ["train"]),
    ("biased-fashion-mnist", ["Fashion-MNIST", "train-images-idx3-ubyte"]),
])
def test_absent_data_exits_2_saying_what_and_where(tmp_path, capsys, experiment, words):
    assert main(["run", experiment, "--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("masktune: error:") and str(tmp_path / "none") in err
    assert all(word in err for word in words)


def test_default_data_location_is_reported(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path))
    assert main(["run", "celeba", "--out", str(tmp_path / "o"), *FAST]) == 2
    assert f"no --data-dir was given, so masktune looked in {tmp_path / 'celeba'}" in capsys.readouterr().err


def test_corrupt_image_in_a_run_exits_2_naming_it(tmp_path, capsys):
    root = write_cats_vs_dogs(tmp_path / "cvd")
    bad = root / "train" / "dog" / "dog.1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    assert main(["run", "catsvsdogs", "--data-dir", str(root), "--out", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert err.startswith("masktune: error: cannot read image") and str(bad) in err


def test_selective_needs_both_models(tmp_path, capsys):
    write_image(tmp_path / "x.png", 0)
    assert main(["run", "cifar10", "--data-dir", str(tmp_path), "--methods", "erm", *FAST]) == 2
    assert "methods must include erm and masktune" in capsys.readouterr().err
