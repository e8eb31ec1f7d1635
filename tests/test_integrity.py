"""Saved state is trusted only when it checks out: damaged files, runs mixed in one folder, corrupt
JSON state and bad library calls each end in a message that names the file and the fix (exit 2
from the command line), and nothing a later run would trust is left behind."""

import shutil

import numpy as np
import pytest
import torch

from masktune import ImageDataset, MaskSet, TrainSettings, compute_masks, train_erm
from masktune.cli import main
from masktune.errors import ConfigError, DataError, MaskSetError, StorageError
from masktune.storage import load_torch, read_json, save_torch, write_json
from test_data import fake_arrays, write_raw_dir


@pytest.fixture
def copied(tiny_run, reference_run, tmp_path, monkeypatch):
    """A copy of the finished tiny reference run, and a function running the CLI on it."""
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)

    def rerun(*extra):
        return main(tiny_run.args(out, "--no-report", *extra))

    return out, rerun


def error_of(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_damaged_mask_chunk_is_refused_naming_it(copied, capsys):
    out, rerun = copied
    (out / "results.json").unlink()
    (out / "evaluation.json").unlink()
    (out / "checkpoints" / "masktune.pt").unlink()
    chunk = out / "masks" / "masktune" / "000000100-000000200.pt"
    data = bytearray(chunk.read_bytes())
    data[-1000:] = bytes(255 for _ in range(1000))  # every bit set in the last 1,000 bytes
    chunk.write_bytes(bytes(data))
    assert rerun() == 2
    err = error_of(capsys)
    assert "000000100-000000200.pt" in err and "checksum does not match" in err and "delete" in err


def test_removing_config_json_does_not_mix_two_runs(copied, capsys):
    out, rerun = copied
    (out / "config.json").unlink()
    assert rerun("--seed", "5") == 2  # the finished seed-0 results are not shown as seed 5's
    assert "other settings (seed: saved 0, now 5)" in error_of(capsys)
    for name in ("results.json", "evaluation.json"):
        (out / name).unlink()
    assert rerun("--seed", "5") == 2  # nor are seed 0's checkpoints and masks resumed for seed 5
    err = error_of(capsys)
    assert "erm_last.pt was made by a run with other settings or data" in err and "another --out" in err


@pytest.mark.parametrize("name", ["results.json", "config.json", "evaluation.json"])
def test_corrupt_json_state_is_a_message(copied, capsys, name):
    out, rerun = copied
    if name == "evaluation.json":
        (out / "results.json").unlink()  # else the finished results are shown without reading it
    (out / name).write_bytes(b"{not json \xff")
    assert rerun() == 2
    assert f"cannot read {out / name}" in error_of(capsys)


def test_edited_json_state_is_refused_by_its_checksum(copied, capsys):
    out, rerun = copied
    text = (out / "results.json").read_text()
    (out / "results.json").write_text(text.replace('"accuracy": ', '"accuracy":  ', 1).replace("0", "1", 1))
    assert rerun() == 2
    assert "checksum that does not match" in error_of(capsys)


def test_a_non_utf8_metrics_log_is_a_message(copied, capsys):
    out, rerun = copied
    (out / "results.json").unlink()
    (out / "evaluation.json").unlink()
    (out / "metrics.jsonl").write_bytes(b"\xff\xfe\n")
    assert rerun() == 2
    assert "metrics.jsonl" in error_of(capsys)


def test_report_errors_are_messages(copied, capsys):
    out, _ = copied
    if not torch.cuda.is_available():
        assert main(["report", str(out), "--device", "cuda"]) == 2
        assert "not available" in error_of(capsys)
    (out / "checkpoints" / "erm_best.pt").write_bytes((out / "checkpoints" / "erm_best.pt").read_bytes()[:500])
    assert main(["report", str(out)]) == 2
    assert "erm_best.pt" in error_of(capsys)
    write_json({}, out / "results.json")
    assert main(["report", str(out)]) == 2
    assert "lacks config" in error_of(capsys)


def test_an_altered_mnist_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))
    arrays, system = fake_arrays(40, 10, seed=1), tmp_path / "system"
    write_raw_dir(system, arrays)
    from masktune.data import mnist

    spec = mnist._DATASETS["fashion-mnist"]
    monkeypatch.setitem(mnist._DATASETS, "fashion-mnist", type(spec)(**{**vars(spec), "system_dirs": (system,)}))
    mnist.load_fashion_mnist(download=False)  # from the system files, into the cache
    cache = tmp_path / "home" / "fashion-mnist" / "fashion-mnist_uint8.npz"
    with np.load(cache) as npz:
        altered = {key: npz[key] for key in npz.files}
    altered["train_labels"] = (altered["train_labels"] + 1) % 10
    np.savez(cache, **altered)
    loaded = mnist.load_fashion_mnist(download=False)  # the altered cache is passed over and rewritten
    assert np.array_equal(loaded.train_labels, arrays.train_labels)


def test_torch_and_json_files_carry_checksums(tmp_path):
    save_torch({"x": torch.arange(3)}, tmp_path / "a.pt")
    assert torch.equal(load_torch(tmp_path / "a.pt")["x"], torch.arange(3))
    data = bytearray((tmp_path / "a.pt").read_bytes())
    data[-20] ^= 1
    (tmp_path / "a.pt").write_bytes(bytes(data))
    with pytest.raises(StorageError, match="checksum does not match"):
        load_torch(tmp_path / "a.pt")
    torch.save({"x": 1}, tmp_path / "plain.pt")
    with pytest.raises(StorageError, match="not written by masktune"):
        load_torch(tmp_path / "plain.pt")
    write_json({"a": 1, "b": [1, 2]}, tmp_path / "s.json")
    assert read_json(tmp_path / "s.json")["b"] == [1, 2]
    (tmp_path / "s.json").write_text((tmp_path / "s.json").read_text().replace("2", "3"))
    with pytest.raises(StorageError, match="checksum that does not match"):
        read_json(tmp_path / "s.json")


def test_library_calls_refuse_bad_input_with_a_message(tmp_path):
    mixed = [(torch.rand(3, 8, 8), 0), (torch.rand(3, 9, 9), 1)]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    with pytest.raises(DataError, match=r"differ in size \(\(3, 8, 8\), \(3, 9, 9\)\)"):
        compute_masks(model, mixed, progress=False)
    empty = ImageDataset(torch.zeros(0, 3, 8, 8, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    some = ImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4) % 2)
    with pytest.raises(DataError, match="training set is empty"):
        train_erm(model, empty, epochs=1)
    with pytest.raises(DataError, match="validation set is empty; pass val_set=None"):
        train_erm(model, some, empty, epochs=1)
    with pytest.raises(ConfigError, match="lr must be a finite number >= 0, got nan"):
        TrainSettings(lr=float("nan"))
    save_torch({"format": "masktune.maskset", "version": 1, "height": 2, "width": 2, "meta": "x",
                "packed": torch.zeros(1, 1, dtype=torch.uint8)}, tmp_path / "m.pt")
    with pytest.raises(MaskSetError, match="incomplete or malformed mask set"):
        MaskSet.load(tmp_path / "m.pt")


def test_a_full_disk_is_a_message_and_the_run_resumes(tiny_run, tmp_path, capsys, monkeypatch):
    import errno

    import masktune.storage as storage

    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    original, writes = storage.atomic_write_bytes, []

    def full_after_three(path, data):
        writes.append(path)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        original(path, data)

    monkeypatch.setattr(storage, "atomic_write_bytes", full_after_three)
    out = tmp_path / "run"
    assert main(tiny_run.args(out, "--no-report")) == 2
    err = error_of(capsys)
    assert "No space left on device" in err and "run the same command again" in err
    monkeypatch.setattr(storage, "atomic_write_bytes", original)
    assert main(tiny_run.args(out, "--no-report")) == 0


def test_a_corrupt_sweep_record_is_a_message(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "runs.jsonl").write_text('{"name": "seed0"}\n')
    args = ["sweep", "--data-dir", str(tiny_run.data_dir), "--seeds", "0", "--out", str(tmp_path / "sweep"),
            "--epochs", "1", "--limit", "100", "--val-size", "50", "--quiet"]
    assert main(args) == 2
    assert "runs.jsonl, line 1 has no checksum" in error_of(capsys)


def test_a_garbage_masks_file_says_what_it_is(tiny_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    (tmp_path / "garbage.pt").write_bytes(b"e" * 101)
    out = tmp_path / "run"
    assert main(tiny_run.args(out, "--no-report", "--masks", str(tmp_path / "garbage.pt"))) == 2
    err = error_of(capsys)
    assert "garbage.pt" in err and "not written by masktune" in err and "(101)" not in err
    assert not (out / "checkpoints").exists()  # refused before training
