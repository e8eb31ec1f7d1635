"""The HTML report of a run, with its figures.

:func:`write_report` (``masktune report RUN_DIR``, also run at the end of ``masktune run``)
writes ``report.html`` into the run directory: one self-contained file (figures embedded as PNG
data, no network needed to view it), with the same figures as PNG files next to it
(``attention.png``, ``accuracy.png``, ``training.png``, ``risk_coverage.png``). A directory
holding several run directories (e.g. ``seed0/``, ``seed1/``, each with a ``results.json``) gets
one report over all of them: accuracies, curves and timings as mean ± std over the runs, and
heatmaps from the first run.

The sections of ``results.json`` the report reads:

- ``config``, ``environment``, ``sizes``, ``timings_s`` (seconds per stage) and ``masking``
  (mask diagnostics per method), shown as tables;
- ``accuracy[method][test_set]``: ``{"accuracy": %, "count": n, "worst_group_accuracy": %,
  "groups": {"y=<class>,spurious=<0|1>": {"accuracy": %, "count": n}}}`` (bar chart, table);
- ``history``: one dict per epoch with ``stage`` (``"erm"`` or the finetune's method),
  ``epoch``, ``loss``, ``accuracy`` (%) and, for ERM, ``val_accuracy`` (%) (training curves);
- ``selective`` (optional; written where selective classification was evaluated):
  ``{method: {"coverage": [...], "risk": [...], "aurc": float}}``. ``coverage`` (share of the
  test samples accepted) and ``risk`` (error on the accepted samples) are in percent, two lists of
  the same non-zero length, one point per confidence threshold, in any order; ``aurc`` (area
  under the risk-coverage curve) is optional. Drawn as one risk-coverage curve per method.

The heatmaps need the trained models and the data: :func:`load_run` rebuilds the training set
from the saved configuration and loads ``checkpoints/erm_best.pt`` and ``checkpoints/<method>.pt``.
"""

from __future__ import annotations

import base64
import html
import json
import statistics
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.base import labels_of, limited
from ..distributed import resolve_device
from ..errors import ReportError
from ..evaluation.diagnostics import heat_shares, heat_verdict
from ..evaluation.leakage import verdict
from ..masks import make_rule
from ..models import model_device, place
from ..pipeline import ExperimentData, RunConfig, get_experiment, make_config
from ..storage import atomic_write_bytes, load_torch, read_json
from .figures import (accuracy_figure, group_label, method_style, png_bytes, risk_coverage_figure, saliency_grid,
                      training_figure)
from .tables import guarded_verdict

FEATURE_NAMES = {"square": "square", "band": "band", "sparse": "sparse pattern", "background": "coloured background",
                 "foreground": "coloured digit"}
DPI = 100


def find_runs(path: str | Path) -> list[Path]:
    """``[path]`` when it holds a ``results.json``, else its subdirectories that do (e.g. one per seed)."""
    path = Path(path)
    if (path / "results.json").is_file():
        return [path]
    runs = sorted(found.parent for found in path.glob("*/results.json"))
    if not runs:
        raise ReportError(f"no results.json in {path} or its subdirectories; pass a run directory written by "
                          "`masktune run` (or a directory of such run directories, one per seed)")
    return runs


def read_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a run directory."""
    results = read_json(Path(run_dir) / "results.json", error=ReportError,
                        fix="run the experiment again (the same command) to rewrite it")
    missing = [key for key in ("config", "accuracy", "history") if key not in results]
    if missing or "experiment" not in results["config"]:
        raise ReportError(f"{Path(run_dir) / 'results.json'} lacks {', '.join(missing) or 'config.experiment'}; "
                          "it was not written by `masktune run`: run the experiment again to rewrite it")
    return results


def run_config(saved: Mapping[str, Any]) -> RunConfig:
    """The :class:`~masktune.experiments.RunConfig` saved in ``results.json`` under ``config``."""

    def plain(value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    overrides = {key: plain(value) for key, value in saved.items()
                 if key not in ("experiment", "data", "version", "world_size", "checksum")}
    overrides.update({f"data.{key}": plain(value) for key, value in saved.get("data", {}).items()})
    return make_config(saved["experiment"], overrides)


@dataclass
class LoadedRun:
    """A finished run rebuilt from its directory, without re-running anything."""

    results: dict
    config: RunConfig
    data: ExperimentData
    train: Dataset  # the training set the run used (after any limit)
    models: dict[str, nn.Module]  # "erm" (best checkpoint) and each finetuned method, in eval mode


def load_run(run_dir: str | Path, *, device: torch.device | str = "cpu") -> LoadedRun:
    """Rebuild a run's data from its saved configuration and load its checkpoints onto ``device``."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    saved = results["config"]
    spec = get_experiment(saved["experiment"])
    if saved.get("version", spec.version) != spec.version:
        raise ReportError(f"{run_dir} was made with version {saved['version']} of the {spec.name} experiment and "
                          f"this masktune has version {spec.version}, so its data cannot be rebuilt; rerun it")
    config = run_config(saved)
    data = spec.build_data(config)
    models = {}
    for method in ("erm", *(m for m in config.methods if m != "erm")):
        path = run_dir / "checkpoints" / ("erm_best.pt" if method == "erm" else f"{method}.pt")
        if not path.is_file():
            raise ReportError(f"{path} is missing, so the heatmaps cannot be drawn; run the experiment again")
        state = load_torch(path, map_location=device, error=ReportError, fix="run the experiment again to rewrite it")
        model = spec.build_model(config, data.num_classes)
        model.load_state_dict(state["model"])
        place(model, device)
        models[method] = model.eval()
    return LoadedRun(results, config, data, limited(data.train, config.limit), models)


def training_groups(dataset: Dataset) -> dict[tuple[int, int | None], torch.Tensor]:
    """Indices of each (class, spurious flag) group of ``dataset``, the larger group of each class
    first; the flag is ``None`` when the dataset has no ``metadata["spurious"]``."""
    labels = labels_of(dataset)
    spurious = getattr(dataset, "metadata", {}).get("spurious")
    groups = {}
    for y in labels.unique().tolist():
        in_class = labels == y
        parts = [(None, in_class)] if spurious is None else [(s, in_class & (spurious.long() == s)) for s in (0, 1)]
        for s, members in sorted(parts, key=lambda part: -int(part[1].sum())):
            if members.any():
                groups[y, s] = members.nonzero().squeeze(1)
    return groups


def heat_share(model: nn.Module, dataset: Dataset, indices: Sequence[int], region: torch.Tensor,
               layer: str | None = None, *, batch_size: int = 256) -> torch.Tensor:
    """Share (%) of each heatmap's mass (xGradCAM, predicted class) inside ``region`` [H, W], for
    ``dataset[indices]``; returns a CPU tensor [len(indices)]."""
    return heat_shares(model, Subset(dataset, list(indices)), region, layer, device=model_device(model),
                       batch_size=batch_size)


def _selective(results: Mapping) -> dict | None:
    section = results.get("selective")
    if section is None:
        return None
    for method, curve in section.items():
        if not (isinstance(curve, Mapping) and isinstance(curve.get("coverage"), list)
                and isinstance(curve.get("risk"), list) and 0 < len(curve["coverage"]) == len(curve["risk"])):
            raise ReportError(f"results.json's selective[{method!r}] must be {{'coverage': [...], 'risk': [...]}} "
                              "with two lists of the same non-zero length (percent); see masktune.reporting")
    return section


def _spread(values: Sequence[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(out: Path, name: str, figure: Figure, caption: str) -> str:
    """Save ``figure`` as ``out/name.png`` and return it as an embedded ``<figure>``."""
    png = png_bytes(figure, DPI)
    atomic_write_bytes(out / f"{name}.png", png)
    data = base64.b64encode(png).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _attention_section(out: Path, run_dir: Path, device: str, samples: int, feature: str, seeds: bool) -> str:
    run = load_run(run_dir, device=device)
    config = run.config
    groups = training_groups(run.train)
    class_sizes = labels_of(run.train).bincount()
    titles = {}
    for (y, s), members in groups.items():
        name = f"class {y}" if s is None else group_label(f"y={y},spurious={s}", feature)
        share = 100 * len(members) / class_sizes[y]
        titles[y, s] = f"{name}\n{len(members):,} training images ({share:.1f}% of class {y})"
    finetuned = {"MaskTune": run.models["masktune"]} if "masktune" in run.models else {}
    figure = saliency_grid(run.models["erm"], run.train, {titles[g]: m[:samples].tolist() for g, m in groups.items()},
                           config.cam_layer, finetuned=finetuned, method=config.cam_method,
                           rule=make_rule(config.mask_rule, config.mask_param))
    rows = [f"{samples} training images from each group (the first in training order). Rows: the image; the "
            "heatmap of the best ERM checkpoint for its predicted class; the MaskTune mask made from it "
            f"({make_rule(config.mask_rule, config.mask_param)!r}); the masked image the finetune trains on"]
    if finetuned:
        rows.append("the MaskTune model's heatmap on the original image")
    caption = "; ".join(rows) + ". Under each heatmap: predicted class and its probability (green when right)."
    if seeds:
        caption += f" Models of the run in {run_dir.name}."
    figure_html = _figure(out, "attention", figure, caption)
    if run.data.feature_region is None:
        return figure_html
    names = {group: title.split("\n")[0] for group, title in titles.items()}
    return figure_html + _heat_share_table(run, groups, names, feature)


def _heat_share_table(run: LoadedRun, groups: Mapping[tuple, torch.Tensor], names: Mapping[tuple, str],
                      feature: str, n: int = 128) -> str:
    """How much of each model's heat falls on the spurious feature, per training group."""
    region = run.data.feature_region
    picked = [members[:n] for members in groups.values()]
    means = [[share.mean().item() for share in heat_share(model, run.train, torch.cat(picked).tolist(), region,
                                                          run.config.cam_layer).split([len(p) for p in picked])]
             for model in run.models.values()]
    area = 100 * region.float().mean().item()
    top = max(range(len(groups)), key=lambda i: means[0][i])
    others = "".join(f"; {method_style(m)[0]} {per_group[top]:.1f}%"
                     for m, per_group in zip(list(run.models)[1:], means[1:]))
    text = (f"<p>Share of each model's heatmap inside the {feature} (mean over up to {n} training images per "
            f"group); a model that ignores the {feature} puts about its area's share ({area:.1f}%) there. In the "
            f"group “{html.escape(list(names.values())[top])}”, ERM puts {means[0][top]:.1f}% of its heat inside "
            f"the {feature}{others}.</p>")
    return text + _table(["training group", *(method_style(m)[0] for m in run.models), f"{feature} area"],
                         [[names[g], *(f"{per_group[i]:.1f}%" for per_group in means), f"{area:.1f}%"]
                          for i, g in enumerate(groups)])


def _accuracy_rows(runs: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    accuracy = runs[0]["accuracy"]
    test_sets = list(next(iter(accuracy.values())))
    header = ["method", *(f"{t} (%)" for t in test_sets), *(f"{t} worst group (%)" for t in test_sets)]
    rows = [[method_style(method)[0],
             *(_spread([r["accuracy"][method][t]["accuracy"] for r in runs]) for t in test_sets),
             *(_spread([r["accuracy"][method][t].get("worst_group_accuracy", float("nan")) for r in runs])
               for t in test_sets)] for method in accuracy]
    return header, rows


def _leakage_verdicts(runs: Sequence[dict]) -> str:
    """Each method's leakage verdict and, for MaskTune, how much of the heat its masks cover (means
    over the runs), in plain words."""
    found: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        for method, diag in run.get("masking", {}).items():
            for key in ("leakage_percent", "heat_removed_percent"):
                if key in diag:
                    found.setdefault((method, key), []).append(diag[key])
    read = {"leakage_percent": lambda v: verdict(v / 100), "heat_removed_percent": heat_verdict}
    guarded = [run for run in runs if "guarded_mixing" in run]
    mixed = sum(run["guarded_mixing"] != "own" for run in guarded)
    choice = (guarded_verdict(guarded[0]["guarded_mixing"], guarded[0]["masking"].get("masktune", {}))
              if len(guarded) == 1 else f"guarded recipe: the own masks left a mark in {mixed} of {len(guarded)} "
              "runs, which also masked each image with the mask of a random image of another class")
    return "".join(f"<p><b>{html.escape(method_style(m)[0])} masks:</b> "
                   f"{html.escape(read[key](statistics.fmean(v)))}.</p>" for (m, key), v in found.items()) + (
        f"<p>{html.escape(choice)}.</p>" if guarded else "")


def _masking_table(runs: Sequence[dict], feature: str) -> str:
    masking = [r.get("masking", {}) for r in runs]
    keys = list(next(iter(masking[0].values())))
    return _leakage_verdicts(runs) + _table(
        ["method", *(k.replace("_percent", " (%)").replace("_", " ").replace("region", feature) for k in keys)],
        [[method_style(m)[0], *(_spread([x[m][k] for x in masking if k in x.get(m, {})], 1) for k in keys)]
         for m in masking[0]])


def _run_details(runs: Sequence[dict], run_dirs: Sequence[Path]) -> str:
    def flat(config: Mapping) -> dict[str, Any]:
        values = {k: v for k, v in config.items() if k != "data"}
        return values | {f"data.{k}": v for k, v in config.get("data", {}).items()}

    def shown(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    configs = [flat(r["config"]) for r in runs]
    config_rows = [[key, ", ".join(dict.fromkeys(shown(c.get(key)) for c in configs))] for key in configs[0]]
    environments = [r.get("environment", {}) for r in runs]
    environment_rows = [[key, ", ".join(dict.fromkeys(str(e.get(key)) for e in environments))]
                        for key in environments[0]]
    timings = [r.get("timings_s", {}) for r in runs]
    timing_rows = [[stage, _spread([t[stage] for t in timings if stage in t], 1)] for stage in timings[0]]
    size_rows = [[split, f"{size:,}"] for split, size in runs[0].get("sizes", {}).items()]
    runs_row = f"<p>Runs: {html.escape(', '.join(str(d) for d in run_dirs))}.</p>"
    return (f"{runs_row}<div class=\"cols\"><div><h3>Configuration</h3>{_table(['setting', 'value'], config_rows)}"
            f"</div><div><h3>Versions and device</h3>{_table(['item', 'value'], environment_rows)}"
            f"<h3>Stage timings (s)</h3>{_table(['stage', 'seconds'], timing_rows)}"
            f"<h3>Images</h3>{_table(['split', 'images'], size_rows)}</div></div>")


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1500px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:1.6em;margin-bottom:4px} h2{margin-top:36px;border-bottom:1px solid #d6d9df;padding-bottom:4px}
h3{font-size:1em;margin:18px 0 6px} .lede{color:#56607a;margin-top:0} p{line-height:1.45;max-width:1100px}
figure{margin:12px 0;background:#fff;border:1px solid #d6d9df;border-radius:6px;padding:10px;overflow-x:auto}
figure img{display:block;max-width:100%;height:auto} figcaption{color:#56607a;font-size:.9em;margin-top:6px}
table{border-collapse:collapse;background:#fff;font-size:.9em;margin:6px 0}
th,td{border:1px solid #d6d9df;padding:4px 10px;text-align:left;vertical-align:top} th{background:#eef0f4}
td{font-variant-numeric:tabular-nums} .cols{display:flex;gap:32px;flex-wrap:wrap;align-items:flex-start}
"""


def write_report(path: str | Path, *, device: str = "cpu", samples_per_group: int = 3) -> Path:
    """Write ``path/report.html`` and its PNG figures for the run directory ``path``, or for the
    run directories inside it (several seeds); returns the report's path.

    ``device`` runs the models for the heatmaps; ``samples_per_group`` training images of each
    (class, spurious feature) group are shown.
    """
    if samples_per_group < 1:
        raise ReportError(f"samples per group must be at least 1, got {samples_per_group}")
    device = str(resolve_device(device))  # a device that is not there is refused before anything is read
    out = Path(path)
    run_dirs = find_runs(out)
    runs = [read_results(d) for d in run_dirs]
    selective = [s for s in map(_selective, runs) if s is not None]
    first = runs[0]["config"]
    feature = FEATURE_NAMES.get(first.get("data", {}).get("bias_type"), "spurious feature")
    seeds = ", ".join(str(r["config"].get("seed")) for r in runs)
    spread = f" (mean ± std over {len(runs)} runs)" if len(runs) > 1 else ""
    description = get_experiment(first["experiment"]).description
    body = [f"<h1>MaskTune report: {html.escape(first['experiment'])}</h1>",
            f"<p class=\"lede\">{html.escape(description)}. Seed{'s' if len(runs) > 1 else ''} {seeds}; "
            f"{first.get('epochs')} ERM epochs; written {datetime.now().isoformat(timespec='seconds')}.</p>",
            f"<h2>Results</h2><p>Accuracy in percent{spread}; the worst group is the lowest accuracy over the "
            f"(class, {feature}) groups of a test set.</p>", _table(*_accuracy_rows(runs)),
            "<h2>Where the models look</h2>",
            _attention_section(out, run_dirs[0], device, samples_per_group, feature, len(runs) > 1),
            "<h2>Accuracy per test set and group</h2>",
            _figure(out, "accuracy", accuracy_figure(runs, feature),
                    f"Accuracy of each method on each test set, overall and per group{spread}; n = test images.")]
    if runs[0].get("masking"):
        body += [f"<h3>Masks on the training set{spread}</h3>", _masking_table(runs, feature)]
    body += ["<h2>Training curves</h2>",
             _figure(out, "training", training_figure([r["history"] for r in runs]),
                     "Loss and accuracy per epoch: ERM on the training and validation sets, then each one-epoch "
                     "finetune on its masked training images, starting from the last ERM epoch.")]
    if selective:
        body += ["<h2>Selective classification</h2>",
                 _figure(out, "risk_coverage", risk_coverage_figure(selective),
                         "Error on the accepted test samples against the share accepted, per method.")]
    body += ["<h2>Run</h2>", _run_details(runs, run_dirs)]
    page = (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>MaskTune report: {html.escape(first['experiment'])}</title><style>{STYLE}</style></head>"
            f"<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")
    report = out / "report.html"
    atomic_write_bytes(report, page.encode())
    return report
