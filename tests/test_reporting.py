import base64
import contextlib
import io
import json
import re
import shutil
import statistics
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import write_mnist_raw
from matplotlib.image import imread
from torch import nn

from masktune import saliency_maps, threshold_masks
from masktune.cli import main
from masktune.masks import make_rule
from masktune.data import ImageDataset
from masktune.report.figures import (accuracy_figure, png_bytes, risk_coverage_figure, saliency_grid, saliency_panels,
                              training_figure)
from masktune.models import SmallCNN
from masktune.errors import ReportError
from masktune.report.report import load_run, training_groups, write_report
from masktune.pipeline.rundir import MetricsLog
from masktune.storage import write_json

FIGURES = ("attention", "accuracy", "training")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKTUNE_HOME", str(tmp_path / "home"))  # never cache the fake MNIST in the user's home


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-epoch run on 300 fake MNIST images, report included; returns (run dir, stdout)."""
    root = tmp_path_factory.mktemp("tiny")
    data_dir = write_mnist_raw(root / "MNIST" / "raw")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        patch.setenv("MASKTUNE_HOME", str(root / "home"))
        code = main(["run", "--data-dir", str(data_dir), "--out", str(root / "run"), "--epochs", "2", "--limit", "300",
                     "--val-size", "100", "--batch-size", "64", "--quiet"])
    assert code == 0
    return root / "run", printed.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_run_prints_report_path_and_logs_every_epoch(tiny_run):
    out, printed = tiny_run
    assert printed.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert (out / "report.html").is_file()
    history = json.loads((out / "results.json").read_text())["history"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [("erm", 1), ("erm", 2), ("randmask", 1), ("masktune", 1)]
    assert [{k: v for k, v in r.items() if k != "elapsed_s"} for r in lines] == history
    elapsed = [r["elapsed_s"] for r in lines]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


def test_report_figures_are_real_non_blank_images(tiny_run):
    out, _ = tiny_run
    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        width, height = png_size(data)
        pixels = imread(out / f"{name}.png")[..., :3]
        assert pixels.shape == (height, width, 3)
        assert 600 <= width <= 3000 and 300 <= height <= 1500, name
        non_white = (pixels < 0.95).any(-1).mean()
        assert non_white > 0.05 and pixels.std() > 0.1, f"{name}.png looks blank"
    # the grid: up to 3 images of each training group in columns, 5 rows, cells of 1.1 inch at 100 dpi
    columns = sum(min(3, len(members)) for members in training_groups(load_run(out).train).values())
    assert columns >= 8  # the fake data has all four (class, square) groups
    width, height = png_size((out / "attention.png").read_bytes())
    assert width >= columns * 110 and height >= 5 * 110 and width > height
    colours = np.unique((imread(out / "attention.png")[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500  # heatmap overlays, not flat fills


def test_png_bytes_renders_the_whole_figure_at_the_given_dpi():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3, 2))
    figure.subplots().plot([0, 1], [1, 0])
    assert png_size(png_bytes(figure, dpi=50)) == (150, 100)


def test_report_is_self_contained(tiny_run):
    out, _ = tiny_run
    page = (out / "report.html").read_text()
    sources = re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)
    assert len(sources) == len(FIGURES) == page.count("<img")
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page
    files = {base64.b64encode((out / f"{name}.png").read_bytes()).decode() for name in FIGURES}
    assert {src[len("data:image/png;base64,"):] for src in sources} == files  # the PNGs next to the report
    results = json.loads((out / "results.json").read_text())
    masktune_biased = results["accuracy"]["masktune"]["biased"]["accuracy"]
    assert f"<td>{masktune_biased:.2f}</td>" in page
    assert "Where the models look" in page and "Training curves" in page and "Stage timings" in page
    assert "Selective classification" not in page  # the run has no selective section


def two_models():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))  # a user's model: no cam_layer attribute, found automatically
    return {"cnn": SmallCNN(2), "plain": plain}


def random_images(n=10, seed=1):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 28, 28), dtype=torch.uint8, generator=generator)
    return ImageDataset(images, torch.arange(n) % 2)


def test_saliency_panels_agree_with_the_primitives():
    models, dataset = two_models(), random_images()
    indices = [7, 2, 5]
    panels = saliency_panels(models, dataset, indices, rule=make_rule("mean-std", 1.5))
    images = dataset.images[indices].float() / 255
    assert torch.equal(panels.images, images) and panels.labels.tolist() == [1, 0, 1]
    for name, layer in (("cnn", models["cnn"].block4), ("plain", models["plain"][1])):
        model = models[name].eval()
        with torch.no_grad():
            probabilities = model(images).softmax(1)
        heat, _ = saliency_maps(model, images, layer)
        assert torch.allclose(panels.heatmaps[name], heat, atol=1e-6)
        assert torch.equal(panels.predictions[name], probabilities.argmax(1))
        assert torch.allclose(panels.confidences[name], probabilities.max(1).values)
    assert torch.equal(panels.masks, threshold_masks(panels.heatmaps["cnn"], 1.5))  # masks of the first model
    expected = np.where(panels.masks.numpy()[:, None], 0.0, images.numpy())
    np.testing.assert_array_equal(panels.masked.numpy(), expected)
    assert panels.masks.any()


def test_saliency_grid_draws_every_image_of_every_row():
    models, dataset = two_models(), random_images()
    groups = {"first group": [0, 1, 2], "second group": [3, 4]}
    figure = saliency_grid(models["cnn"], dataset, groups, finetuned={"Plain": models["plain"]}, class_names=["a", "b"])
    panels = [ax for sub in figure.subfigs for ax in sub.axes if ax.images]
    assert len(panels) == (4 + 1) * 5
    assert [sub.get_suptitle() for sub in figure.subfigs[:2]] == list(groups)
    titles = [ax.get_title() for ax in panels if ax.get_title()]
    assert titles == [f"label {'ab'[i % 2]}" for i in (0, 1, 2, 3, 4)]
    assert len(png_bytes(figure, dpi=30)) > 1000


def synthetic_results(shift=0.0, seed=0):
    def metrics(overall, groups):
        return {"accuracy": overall + shift, "count": 100, "worst_group_accuracy": min(groups.values()) + shift,
                "groups": {k: {"accuracy": v + shift, "count": 50} for k, v in groups.items()}}

    return {
        "config": {"experiment": "biased-mnist", "seed": seed, "epochs": 2, "data": {"bias_type": "square"}},
        "accuracy": {m: {"original": metrics(60 + i * 15, {"y=0,spurious=0": 20 + i * 30, "y=1,spurious=0": 99.0}),
                         "biased": metrics(20 + i * 35, {"y=0,spurious=0": 20 + i * 30, "y=1,spurious=1": 10 + i * 40})}
                     for i, m in enumerate(("erm", "masktune"))},
        "history": [{"stage": "erm", "epoch": 1, "loss": 0.6 + shift / 100, "accuracy": 80.0, "val_accuracy": 85.0},
                    {"stage": "erm", "epoch": 2, "loss": 0.3 + shift / 100, "accuracy": 90.0, "val_accuracy": 88.0},
                    {"stage": "masktune", "epoch": 1, "loss": 0.5 + shift / 100, "accuracy": 84.0 + shift}],
    }


def test_accuracy_bars_are_seed_means_with_std_error_bars():
    runs = [synthetic_results(shift, seed) for seed, shift in enumerate((0.0, 4.0, -2.0))]
    figure = accuracy_figure(runs, "square")
    original, biased = figure.axes
    bars = [c for c in biased.containers if type(c).__name__ == "BarContainer"]
    assert [b.get_label() for b in bars] == ["ERM", "MaskTune"]
    for bar, method in zip(bars, ("erm", "masktune")):
        per_seed = [[r["accuracy"][method]["biased"]["accuracy"] for r in runs],
                    *([r["accuracy"][method]["biased"]["groups"][g]["accuracy"] for r in runs]
                      for g in ("y=0,spurious=0", "y=1,spurious=1"))]
        assert [p.get_height() for p in bar.patches] == pytest.approx([statistics.mean(v) for v in per_seed])
        segments = bar.errorbar.lines[2][0].get_segments()
        assert [s[1, 1] - s[0, 1] for s in segments] == pytest.approx([2 * statistics.stdev(v) for v in per_seed])
    labels = [t.get_text() for t in biased.get_xticklabels()]
    assert labels == ["all\n(n=100)", "class 0\nno square\n(n=50)", "class 1\nwith square\n(n=50)"]
    assert "3 seeds" in figure.get_suptitle()
    single = accuracy_figure(runs[:1])
    assert all(c.errorbar is None for c in single.axes[0].containers if type(c).__name__ == "BarContainer")


def test_training_curves_place_the_finetune_after_erm():
    runs = [synthetic_results(shift) for shift in (0.0, 6.0)]
    figure = training_figure([r["history"] for r in runs])
    loss_ax, accuracy_ax = figure.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    erm = lines["ERM (training)"]
    assert list(erm.get_xdata()) == [1, 2]
    assert list(erm.get_ydata()) == pytest.approx([0.63, 0.33])  # mean over the two seeds
    tuned = lines["MaskTune finetune (masked training images)"]
    assert list(tuned.get_xdata()) == [2, 3] and list(tuned.get_ydata()) == pytest.approx([0.33, 0.53])
    accuracy_lines = {line.get_label(): line for line in accuracy_ax.get_lines()}
    assert list(accuracy_lines["ERM (validation)"].get_ydata()) == [85.0, 88.0]
    assert list(accuracy_lines["MaskTune finetune (masked training images)"].get_ydata()) == pytest.approx([90, 87])
    assert len(loss_ax.collections) == 2  # the std bands of two seeds


SELECTIVE = {"erm": {"coverage": [100.0, 80.0, 90.0], "risk": [20.0, 9.0, 14.0], "aurc": 11.25},
             "masktune": {"coverage": [100.0, 90.0, 80.0], "risk": [8.0, 4.0, 2.5]}}


def test_risk_coverage_curve_per_method():
    figure = risk_coverage_figure([SELECTIVE])
    lines = {line.get_label(): line for line in figure.axes[0].get_lines()}
    assert set(lines) == {"ERM (AURC 11.25)", "MaskTune"}
    assert list(lines["ERM (AURC 11.25)"].get_xdata()) == [80, 90, 100]
    assert list(lines["ERM (AURC 11.25)"].get_ydata()) == [9, 14, 20]
    assert list(lines["MaskTune"].get_ydata()) == [2.5, 4, 8]


def copy_run(tiny_run, destination, **changes):
    shutil.copytree(tiny_run[0], destination)
    results = json.loads((destination / "results.json").read_text())
    results.update(changes)
    write_json(results, destination / "results.json")  # with its checksum, as masktune writes it
    return results


def test_report_command_over_several_seeds_shows_mean_std_and_the_selective_curve(tiny_run, tmp_path, capsys):
    first = copy_run(tiny_run, tmp_path / "seeds" / "seed0", selective=SELECTIVE)
    second = json.loads(json.dumps(first))
    second["config"]["seed"] = 1
    for per_set in second["accuracy"].values():
        for metrics in per_set.values():
            metrics["accuracy"] = metrics["accuracy"] / 2
    copy_run(tiny_run, tmp_path / "seeds" / "seed1", config=second["config"], accuracy=second["accuracy"])
    assert main(["report", str(tmp_path / "seeds"), "--samples", "1"]) == 0
    report = tmp_path / "seeds" / "report.html"
    assert capsys.readouterr().out.strip() == f"report: {report}"
    page = report.read_text()
    values = [first["accuracy"]["erm"]["original"]["accuracy"], second["accuracy"]["erm"]["original"]["accuracy"]]
    assert f"<td>{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}</td>" in page
    assert "Seeds 0, 1" in page and "over 2 runs" in page and "Models of the run in seed0" in page
    assert "Selective classification" in page and page.count("<img") == len(FIGURES) + 1
    for name in (*FIGURES, "risk_coverage"):
        assert png_size((tmp_path / "seeds" / f"{name}.png").read_bytes())[0] > 500


def test_report_command_errors(tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no results.json" in capsys.readouterr().err
    copy_run(tiny_run, tmp_path / "bad", selective={"erm": {"coverage": [90.0, 100.0], "risk": [3.0]}})
    with pytest.raises(ReportError, match="coverage"):
        write_report(tmp_path / "bad")
    copy_run(tiny_run, tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "masktune.pt").unlink()
    assert main(["report", str(tmp_path / "run")]) == 2
    assert "masktune.pt is missing" in capsys.readouterr().err


def test_metrics_log_is_rewritten_whole_and_a_resumed_log_appends(tmp_path):
    log = MetricsLog(tmp_path)
    log({"stage": "erm", "epoch": 1, "loss": 0.5})
    log({"stage": "erm", "epoch": 2, "loss": 0.25})
    log.close()
    assert [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0.5, 0.25]
    resumed = MetricsLog(tmp_path)
    resumed({"stage": "masktune", "epoch": 1, "loss": 0.125})
    resumed.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["stage"], line["loss"]) for line in lines] == [("erm", 0.5), ("erm", 0.25), ("masktune", 0.125)]


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path, tensorboard=True)
    for epoch, loss in ((1, 0.5), (2, 0.25)):
        log({"stage": "erm", "epoch": epoch, "loss": loss, "accuracy": 90.0 + epoch})
    log({"stage": "masktune", "epoch": 1, "loss": 0.75, "accuracy": 80.0})
    log.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(s.step, s.value) for s in events.Scalars("erm/loss")] == [(1, 0.5), (2, 0.25)]
    assert [(s.step, s.value) for s in events.Scalars("masktune/accuracy")] == [(1, 80.0)]


def test_tensorboard_flag_without_the_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert main(["run", "--out", str(tmp_path / "run"), "--tensorboard", "--quiet"]) == 2
    assert "pip install 'masktune[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "results.json").exists()


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium(profile, *args):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no headless browser: install Debian's chromium (apt-get install chromium); CI's .ci/run does")
    command = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_opens_in_a_headless_browser(tiny_run, tmp_path):
    out, _ = tiny_run
    page = (out / "report.html").read_text()
    # The probe page is the report plus a broken image (a control that must not load) and a script that
    # writes "<images>:<loaded>" into the DOM once the page has loaded.
    probe = page.replace("</body>", '<img id="control" src="data:image/png;base64,AAAA"><script>'
                         'addEventListener("load", () => { const all = [...document.images]; '
                         'document.body.dataset.images = all.length + ":" + '
                         'all.filter(i => i.complete && i.naturalWidth > 0).length; });</script></body>')
    (tmp_path / "probe.html").write_text(probe)
    dom = chromium(tmp_path / "profile", "--dump-dom", (tmp_path / "probe.html").as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<body[^>]*data-images="(\d+):(\d+)"', dom.stdout)
    assert found, "the page's script did not run"
    assert (int(found[1]), int(found[2])) == (len(FIGURES) + 1, len(FIGURES))
    shot = tmp_path / "report.png"
    result = chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2400",
                      (out / "report.html").as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    assert png_size(shot.read_bytes()) == (1400, 2400)
    pixels = imread(shot)[..., :3]
    assert pixels.std() > 0.1 and (pixels < 0.5).any(-1).mean() > 0.02  # text and figures, not an empty page
