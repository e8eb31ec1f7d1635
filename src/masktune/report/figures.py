"""Figures: where a model looks (heatmaps and masks), accuracy per method and group, training
curves and risk-coverage curves.

Every function returns a :class:`matplotlib.figure.Figure` built with matplotlib's object-oriented
API (no pyplot, no global state, no display needed); :func:`png_bytes` renders one with the Agg
backend. In a notebook, a returned figure shows itself::

    from masktune.figures import saliency_grid
    saliency_grid(erm_model, train_set, {"squared": [0, 1, 2], "plain": [7, 9, 11]},
                  finetuned={"MaskTune": masktune_model})
"""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from ..masks import MaskRule, make_rule
from ..models import eval_mode, model_device, resolve_cam_layer
from ..saliency import CAM, saliency_maps

HEAT_CMAP = "jet"
HEAT_ALPHA = 0.5
METHOD_STYLES = {"erm": ("ERM", "#6e6e6e"), "randmask": ("RandMask", "#e08a2c"), "masktune": ("MaskTune", "#1f6fb4")}
_SPARE_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def method_style(method: str) -> tuple[str, str]:
    """Display name and colour of a method, the same in every figure."""
    if method in METHOD_STYLES:
        return METHOD_STYLES[method]
    return method, _SPARE_COLOURS[sum(map(ord, method)) % len(_SPARE_COLOURS)]


def png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    """``figure`` rendered as PNG by the Agg backend; the image is figure size (inches) x ``dpi`` pixels."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    return buffer.getvalue()


@dataclass
class SaliencyPanels:
    """What :func:`saliency_grid` draws, as CPU tensors; models are keyed by their display name."""

    images: torch.Tensor  # [N, C, H, W], as the dataset yields them
    labels: torch.Tensor  # [N]
    heatmaps: dict[str, torch.Tensor]  # [N, H, W] in [0, 1], for each model's predicted class
    predictions: dict[str, torch.Tensor]  # [N]
    confidences: dict[str, torch.Tensor]  # [N], softmax probability of the prediction
    masks: torch.Tensor  # [N, H, W] bool, from the first model's heatmaps (True = masked)
    masked: torch.Tensor  # the images with masked pixels set to 0 in every channel


def saliency_panels(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    indices: Sequence[int],
    layer: str | None = None,
    *,
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
) -> SaliencyPanels:
    """Heatmaps of each model (for its predicted class) on ``dataset[indices]``, and MaskTune's
    mask (by the mask ``rule``, default heat > mean + 2 std) from the first model's heatmaps.

    ``layer`` is a dotted module name found in every model (``None``: each model's own CAM layer);
    each model runs on its own device, in eval mode.
    """
    if not models:
        raise ValueError("saliency_panels needs at least one model")
    samples = [dataset[i] for i in indices]  # a handful of images, for display
    images = torch.stack([sample[0] for sample in samples])
    labels = torch.as_tensor([int(sample[1]) for sample in samples])
    heatmaps, predictions, confidences = {}, {}, {}
    for name, model in models.items():
        x = images.to(model_device(model))
        _, cam_layer = resolve_cam_layer(model, layer, x[:1])
        with eval_mode(model), torch.no_grad():
            confidence, prediction = model(x).softmax(1).max(1)
        heat, _ = saliency_maps(model, x, cam_layer, method=method, targets=prediction)
        heatmaps[name], predictions[name], confidences[name] = heat.cpu(), prediction.cpu(), confidence.cpu()
    masks = make_rule(rule)(next(iter(heatmaps.values())))
    masked = images.masked_fill(masks.unsqueeze(1), 0.0)
    return SaliencyPanels(images, labels, heatmaps, predictions, confidences, masks, masked)


def _displayable(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] as an array for ``imshow``: RGB for 3 channels, else the first channel; values
    outside [0, 1] (a normalised image) are min-max scaled into it."""
    image = image.detach().float().cpu()
    if image.min() < 0 or image.max() > 1:
        image = (image - image.min()) / (image.max() - image.min() + 1e-7)
    return image.permute(1, 2, 0).numpy() if image.shape[0] == 3 else image[0].numpy()


def _show(ax: Axes, image: torch.Tensor, heat: torch.Tensor | None = None) -> None:
    """Draw ``image``; with ``heat``, over a grey copy of it, so that every colour is heat."""
    shown = _displayable(image)
    if heat is not None and shown.ndim == 3:
        shown = shown @ np.array([0.299, 0.587, 0.114])  # luminance
    ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if heat is not None:
        ax.imshow(heat.numpy(), cmap=HEAT_CMAP, alpha=HEAT_ALPHA, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def saliency_grid(
    model: nn.Module,
    dataset: Dataset,
    indices: Sequence[int] | Mapping[str, Sequence[int]],
    layer: str | None = None,
    *,
    finetuned: Mapping[str, nn.Module] | None = None,
    model_name: str = "ERM",
    method: str | CAM = "xgradcam",
    rule: str | MaskRule = "mean-std",
    class_names: Sequence[str] | None = None,
    cell_inches: float = 1.1,
) -> Figure:
    """The heatmap / mask grid for any model, CAM layer and dataset: one column per image, rows
    image, ``model``'s heatmap overlay, its mask (by ``rule``), the masked image, then
    the heatmap of each ``finetuned`` model (e.g. ``{"MaskTune": tuned}``) on the original image.

    ``indices`` picks the images; a mapping ``{group title: indices}`` draws titled column groups.
    Under each heatmap: the model's predicted class and its probability (green when correct).
    The dataset yields ``(image [C, H, W], label, ...)``; see :func:`saliency_panels` for ``layer``.
    """
    groups = dict(indices) if isinstance(indices, Mapping) else {"": list(indices)}
    groups = {title: list(members) for title, members in groups.items() if len(members)}
    if not groups:
        raise ValueError("saliency_grid needs at least one image index")
    models = {model_name: model, **(finetuned or {})}
    panels = saliency_panels(models, dataset, [i for members in groups.values() for i in members], layer,
                             method=method, rule=rule)
    name = (lambda c: class_names[c]) if class_names is not None else str
    rows = ["image", f"{model_name}\nheatmap", f"{model_name} mask\n{make_rule(rule)!r}", "masked\nimage",
            *(f"{tuned}\nheatmap" for tuned in finetuned or {})]
    counts = [len(members) for members in groups.values()]
    has_titles = any(groups)
    colourbar_inches = 0.9
    label_cells = 0.55  # the first group also holds the row labels
    figure = Figure(figsize=(cell_inches * (sum(counts) + label_cells) + colourbar_inches + 0.15 * len(groups),
                             (cell_inches + 0.3) * len(rows) + 0.35 * has_titles + 0.2), layout="constrained")
    subfigures = figure.subfigures(1, len(groups) + 1, wspace=0.05,
                                   width_ratios=[counts[0] + label_cells, *counts[1:], colourbar_inches / cell_inches])
    start = 0
    for g, (title, count) in enumerate(zip(groups, counts)):
        sub = subfigures[g]
        if title:
            sub.suptitle(title, fontsize=10)
        axes = sub.subplots(len(rows), count, squeeze=False)
        for j in range(count):
            _draw_column(axes[:, j], panels, start + j, [model_name, *(finetuned or {})], name)
        if g == 0:
            for row, label in enumerate(rows):
                axes[row, 0].set_ylabel(label, fontsize=9)
        start += count
    colourbar_axes = subfigures[-1].add_axes((0.2, 0.25, 0.18, 0.5))  # placed by hand, outside the layout
    colourbar = subfigures[-1].colorbar(ScalarMappable(Normalize(0, 1), HEAT_CMAP), cax=colourbar_axes)
    colourbar.set_label("heat", fontsize=8)
    colourbar_axes.tick_params(labelsize=7)
    return figure


def _draw_column(axes: Sequence[Axes], panels: SaliencyPanels, i: int, models: Sequence[str],
                 name: Callable[[int], str]) -> None:
    """Image ``i``'s column: the image, the first model's heatmap, its mask, the masked image, then
    each later model's heatmap; under each heatmap the prediction (green when correct)."""
    _show(axes[0], panels.images[i])
    axes[0].set_title(f"label {name(int(panels.labels[i]))}", fontsize=9)
    _show(axes[2], panels.masks[i][None].float())
    _show(axes[3], panels.masked[i])
    for row, shown in zip((1, *range(4, 4 + len(models) - 1)), models):
        _show(axes[row], panels.images[i], panels.heatmaps[shown][i])
        predicted = int(panels.predictions[shown][i])
        axes[row].set_xlabel(f"pred {name(predicted)} ({panels.confidences[shown][i]:.0%})", fontsize=8,
                             color="#1a7f37" if predicted == int(panels.labels[i]) else "#c62828")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def group_label(key: str, feature: str = "feature") -> str:
    """``"y=0,spurious=1"`` (a group key of :func:`~masktune.group_metrics`) as ``"class 0, with <feature>"``."""
    parts = dict(part.split("=", 1) for part in key.split(","))
    if set(parts) != {"y", "spurious"}:
        return key
    return f"class {parts['y']}, {'with' if parts['spurious'] == '1' else 'no'} {feature}"


def accuracy_figure(runs: Sequence[Mapping], feature: str = "feature") -> Figure:
    """Bar chart of accuracy per method on each test set, overall and per group, from the
    ``accuracy`` section of one ``results.json`` per seed (mean with std error bars for several)."""
    accuracy = runs[0]["accuracy"]
    methods = list(accuracy)
    test_sets = list(next(iter(accuracy.values())))
    categories = {t: ["all", *accuracy[methods[0]][t].get("groups", {})] for t in test_sets}
    classes = {key.split(",")[0] for t in test_sets for key in categories[t][1:]}
    width = 0.8 / len(methods)
    figure = Figure(figsize=(2.0 + 1.55 * sum(map(len, categories.values())), 4.9), layout="constrained")
    axes = figure.subplots(1, len(test_sets), sharey=True, squeeze=False,
                           width_ratios=[len(categories[t]) for t in test_sets])[0]
    for ax, test_set in zip(axes, test_sets):
        for m, method in enumerate(methods):
            means, stds = [], []
            for category in categories[test_set]:
                metrics = [run["accuracy"][method][test_set] for run in runs]
                values = [x["accuracy"] if category == "all" else x["groups"][category]["accuracy"] for x in metrics]
                mean, std = _mean_std(values)
                means.append(mean)
                stds.append(std)
            label, colour = method_style(method)
            x = np.arange(len(means)) + (m - (len(methods) - 1) / 2) * width
            ax.bar(x, means, width * 0.92, yerr=stds if len(runs) > 1 else None, capsize=3, color=colour,
                   label=label, error_kw={"elinewidth": 1})
            for xi, mean, std in zip(x, means, stds):
                ax.text(xi, mean + std + 1.0, f"{mean:.1f}", ha="center", va="bottom", fontsize=7)
        sample = runs[0]["accuracy"][methods[0]][test_set]
        ax.set_xticks(range(len(categories[test_set])), [
            f"all\n(n={sample['count']:,})" if c == "all" else
            group_label(c, feature).replace(", ", "\n") + f"\n(n={sample['groups'][c]['count']:,})"
            for c in categories[test_set]], fontsize=8)
        if classes:
            ax.axhline(100 / len(classes), color="#999999", linestyle=":", linewidth=1, label="chance")
        ax.set_title(f"{test_set} test set", fontsize=10)
        ax.set_ylim(0, 109)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    axes[0].set_ylabel("accuracy (%)")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=len(methods) + 1, fontsize=8,
                  frameon=False)
    spread = f" (mean ± std over {len(runs)} seeds)" if len(runs) > 1 else ""
    figure.suptitle(f"Accuracy per method, test set and group{spread}", fontsize=11)
    return figure


def training_figure(histories: Sequence[Sequence[Mapping]]) -> Figure:
    """Loss and accuracy per epoch: ERM (training and validation), then each finetune stage,
    drawn after the last ERM epoch it starts from. One history (``results.json``'s ``history``:
    dicts with ``stage``, ``epoch``, ``loss``, ``accuracy``, optional ``val_accuracy``) per seed;
    several are drawn as mean with a ±std band."""
    series: dict[tuple[str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for history in histories:
        for record in history:
            for key in ("loss", "accuracy", "val_accuracy"):
                if record.get(key) is not None:
                    series[record["stage"], key][record["epoch"]].append(record[key])
    erm_epochs = max(series["erm", "loss"], default=0)
    figure = Figure(figsize=(11, 4.6), layout="constrained")
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    stages = list(dict.fromkeys(stage for stage, _ in series))
    for (stage, key), points in series.items():
        epochs = sorted(points)
        offset = 0 if stage == "erm" else erm_epochs
        x = np.array(epochs) + offset
        mean, std = (np.array(v) for v in zip(*(_mean_std(points[e]) for e in epochs)))
        label, colour = method_style(stage)
        if stage == "erm":
            label = f"ERM ({'validation' if key == 'val_accuracy' else 'training'})"
        else:
            label = f"{label} finetune (masked training images)"
            start = series["erm", key].get(erm_epochs)
            if start:  # the finetune starts from the last ERM epoch
                x, mean, std = (np.concatenate([[a], b]) for a, b in
                                ((erm_epochs, x), (statistics.fmean(start), mean), (0.0, std)))
        ax = loss_ax if key == "loss" else accuracy_ax
        validation = key == "val_accuracy"
        ax.plot(x, mean, color=colour, marker="s" if validation else "o", markersize=4,
                linestyle="--" if validation else "-", label=label)
        if len(histories) > 1:
            ax.fill_between(x, mean - std, mean + std, color=colour, alpha=0.15, linewidth=0)
    last_epoch = erm_epochs + max((max(points) for (stage, _), points in series.items() if stage != "erm"), default=0)
    for ax, ylabel in ((loss_ax, "cross-entropy loss"), (accuracy_ax, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(1, max(last_epoch, 1) + 1),
                      [f"{e}" if e <= erm_epochs else f"{e}\nfinetune" for e in range(1, max(last_epoch, 1) + 1)])
        ax.grid(alpha=0.3)
        if len(stages) > 1 and erm_epochs:
            ax.axvline(erm_epochs, color="#999999", linestyle=":", linewidth=1)
    loss_ax.set_title("Training loss", fontsize=10)
    accuracy_ax.set_title("Accuracy", fontsize=10)
    handles, labels = accuracy_ax.get_legend_handles_labels()  # every series has an accuracy curve
    order = sorted(range(len(labels)), key=lambda i: not labels[i].startswith("ERM"))
    figure.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside lower center", ncols=4,
                  fontsize=8, frameon=False)
    spread = f" (mean ± std over {len(histories)} seeds)" if len(histories) > 1 else ""
    figure.suptitle(f"Training curves per epoch{spread}; finetunes start from the last ERM epoch", fontsize=11)
    return figure


def risk_coverage_figure(selective_runs: Sequence[Mapping[str, Mapping]]) -> Figure:
    """Risk (error on the accepted samples, %) against coverage (share accepted, %) per method,
    from the ``selective`` section of one ``results.json`` per seed (one curve per seed)."""
    figure = Figure(figsize=(6.5, 4.4), layout="constrained")
    ax = figure.subplots()
    for method in selective_runs[0]:
        label, colour = method_style(method)
        aurc = [run[method]["aurc"] for run in selective_runs if "aurc" in run[method]]
        if aurc:
            mean, std = _mean_std(aurc)
            label += f" (AURC {mean:.2f}" + (f" ± {std:.2f})" if len(aurc) > 1 else ")")
        for r, run in enumerate(selective_runs):
            order = np.argsort(run[method]["coverage"], kind="stable")
            ax.plot(np.asarray(run[method]["coverage"])[order], np.asarray(run[method]["risk"])[order], color=colour,
                    alpha=1.0 if len(selective_runs) == 1 else 0.6, label=label if r == 0 else None, linewidth=1.5)
    ax.set_xlabel("coverage: test samples accepted (%)")
    ax.set_ylabel("risk: error on accepted samples (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    seeds = f", {len(selective_runs)} seeds" if len(selective_runs) > 1 else ""
    ax.set_title(f"Selective classification: risk-coverage curve{seeds}", fontsize=11)
    return figure

