import json

import pytest
import torch

from masktune import MaskSet
from masktune.cli import main
from masktune.storage import load_torch

FAST = ["--epochs", "1", "--val-size", "100", "--quiet", "--batch-size", "64", "--no-report"]


def run(mnist_dir, out, *extra):
    return main(["run", "biased-mnist", "--data-dir", str(mnist_dir.parent.parent), "--out", str(out), *FAST, *extra])


def test_end_to_end_run_writes_results_and_checkpoints(mnist_dir, tmp_path, capsys):
    assert run(mnist_dir, tmp_path / "a", "--limit", "300") == 0
    printed = capsys.readouterr().out
    assert "masktune" in printed and "results:" in printed
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["sizes"] == {"train": 300, "val": 100, "original": 200, "biased": 200}
    assert set(results["accuracy"]) == {"erm", "randmask", "masktune"}
    for method in results["accuracy"].values():
        for test_set in ("original", "biased"):
            metrics = method[test_set]
            assert 0 <= metrics["accuracy"] <= 100
            assert sum(g["count"] for g in metrics["groups"].values()) == 200
            weighted = sum(g["accuracy"] * g["count"] for g in metrics["groups"].values()) / 200
            assert weighted == pytest.approx(metrics["accuracy"], abs=1e-3)
    assert set(results["masking"]) == {"masktune", "randmask"}
    assert 0 < results["masking"]["masktune"]["masked_percent"] < 100
    assert {"data", "erm", "masking", "finetune_masktune", "finetune_randmask", "evaluation", "total"} <= set(
        results["timings_s"])
    assert results["config"]["finetune_lr"] == results["config"]["lr"] == 0.01
    for name in ("erm_best", "erm_last", "masktune", "randmask"):
        assert (tmp_path / "a" / "checkpoints" / f"{name}.pt").is_file()
    masks = MaskSet.load(tmp_path / "a" / "masks" / "masktune.pt")
    assert masks.shape == (300, 28, 28)
    assert masks.meta["cam_method"] == "xgradcam" and masks.meta["rule"] == "mean-std(k=2)"
    assert masks.meta["layer"] == "block4"


def test_saved_masks_are_reused_and_mismatches_refused(mnist_dir, tmp_path, capsys):
    common = ("--limit", "200", "--methods", "masktune")
    assert run(mnist_dir, tmp_path / "a", *common) == 0
    saved = tmp_path / "a" / "masks" / "masktune.pt"
    assert run(mnist_dir, tmp_path / "b", *common, "--masks", str(saved)) == 0
    a, b = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("a", "b"))
    assert a["accuracy"] == b["accuracy"] and a["masking"] == b["masking"]
    assert MaskSet.load(tmp_path / "b" / "masks" / "masktune.pt") == MaskSet.load(saved)
    capsys.readouterr()
    for extra, words in ((("--seed", "1"), "weights differ"), (("--cam-method", "gradcam"), "cam_method"),
                         (("--limit", "150"), "holds 200 masks but the dataset has 150")):
        assert run(mnist_dir, tmp_path / ("c" + "_".join(extra)), *common, "--masks", str(saved), *extra) == 2
        assert words in capsys.readouterr().err


def test_iterations_with_accumulated_masks(mnist_dir, tmp_path):
    out = tmp_path / "it"
    assert run(mnist_dir, out, "--limit", "200", "--methods", "masktune", "--iterations", "2", "--accumulate") == 0
    first = MaskSet.load(out / "masks" / "masktune.pt").unpack()
    second = MaskSet.load(out / "masks" / "masktune_iteration2.pt").unpack()
    assert (second >= first).all() and second.sum() > first.sum()
    results = json.loads((out / "results.json").read_text())
    assert [h["iteration"] for h in results["history"] if h["stage"] == "masktune"] == [1, 2]
    assert set(results["masking"]) == {"masktune", "masktune_iteration2"}


def test_same_seed_gives_identical_results(mnist_dir, tmp_path):
    for out in ("a", "b"):
        assert run(mnist_dir, tmp_path / out, "--limit", "200", "--methods", "masktune") == 0
    a, b = (json.loads((tmp_path / out / "results.json").read_text()) for out in ("a", "b"))
    assert a["accuracy"] == b["accuracy"] and a["masking"] == b["masking"] and a["history"] == b["history"]
    sa = load_torch(tmp_path / "a" / "checkpoints" / "masktune.pt")["model"]
    sb = load_torch(tmp_path / "b" / "checkpoints" / "masktune.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_run_without_experiment_name_runs_biased_mnist(mnist_dir, tmp_path):
    out = tmp_path / "c"
    code = main(["run", "--data-dir", str(mnist_dir), "--out", str(out), "--limit", "100", "--methods", "erm", *FAST])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["config"]["experiment"] == "biased-mnist"


@pytest.mark.parametrize("args, words", [
    (["--methods", "erm,jtt"], "unknown method"),
    (["--epochs", "0"], "at least 1"),
    (["--device", "cuda:7"], "not available"),
    (["--cam-layer", "block9"], "no layer named 'block9'"),
    (["--cam-method", "nosuchcam"], "unknown CAM method 'nosuchcam'"),
    (["--mask-rule", "top-percent", "--mask-param", "0"], "0 < p <= 100"),
    (["--iterations", "0"], "iterations must be at least 1"),
    (["--masks", "nowhere.pt"], "does not exist"),
])
def test_user_errors_exit_2_with_a_message(mnist_dir, tmp_path, capsys, args, words):
    if "cuda" in args[-1] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert run(mnist_dir, tmp_path / "d", "--limit", "100", *args) == 2
    err = capsys.readouterr().err
    assert err.startswith("masktune: error:") and words in err
    assert not (tmp_path / "d" / "results.json").exists()


def test_missing_data_dir_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    assert main(["run", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "e"), *FAST]) == 2
    assert "train-images-idx3-ubyte" in capsys.readouterr().err


def test_config_overrides_are_typed_and_unknown_keys_refused():
    from masktune.errors import ConfigError
    from masktune.pipeline import make_config

    config = make_config("biased-mnist", {"lr": "0.05", "methods": "erm,masktune", "data.colour": "0,255,0",
                                          "data.conflicting_ratio": "0.1", "limit": "50"})
    assert config.lr == 0.05 and config.methods == ("erm", "masktune") and config.limit == 50
    assert config.data["colour"] == (0, 255, 0) and config.data["conflicting_ratio"] == 0.1
    assert config.epochs == 3 and config.data["square_size"] == 4  # experiment defaults kept
    with pytest.raises(ConfigError, match="unknown setting 'learning_rate'"):
        make_config("biased-mnist", {"learning_rate": "0.1"})
    with pytest.raises(ConfigError, match="unknown option 'data.size'.*data.square_size"):
        make_config("biased-mnist", {"data.size": "3"})
    with pytest.raises(ConfigError, match="must be a number"):
        make_config("biased-mnist", {"lr": "fast"})


def test_set_flag_and_data_flags_reach_the_run(mnist_dir, tmp_path):
    out = tmp_path / "f"
    code = run(mnist_dir, out, "--limit", "100", "--methods", "erm", "--square-size", "6",
               "--set", "weight_decay=0.0", "--set", "data.colour=0,0,255")
    assert code == 0
    config = json.loads((out / "results.json").read_text())["config"]
    assert config["weight_decay"] == 0.0
    assert config["data"]["square_size"] == 6 and config["data"]["colour"] == [0, 0, 255]
    assert json.loads((out / "config.json").read_text())["version"] == 1


def test_unknown_set_key_exits_2(mnist_dir, tmp_path, capsys):
    assert run(mnist_dir, tmp_path / "g", "--set", "bogus=1") == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err
