"""A grid of shortcuts: where MaskTune's masks remove the shortcut, and where they become one.

For each MNIST-format dataset, cue and seed: biased data (the cue on 99% of class 0 and 1% of
class 1), ERM, MaskTune's masks from the best ERM model, then one finetune of the last ERM model
per way of applying the masks (``--options``: fill, mixing, the heat-share rule, accumulated
iterations, and the guarded recipe, which mixes in other classes' masks only where the own masks
leak), and the clean-data ceiling (the same CNN trained where the cue is independent of the label:
the cue on a random half of each class). Accuracy on a shortcut-free
validation split (held-out training images without the cue: what a decision may look at) and on
the two test sets (``original``: no cue; ``biased``: the correlation reversed), with the masks'
leakage and the share of ERM's heat the masks remove. Cues (``CUES``) vary position (corner,
edge, centre), shape (square, band, sparse pattern), colour (red, or white like the strokes), size
(2, 4, 8 pixels) and extent (compact, a band across the image, the whole background, the
strokes). Prints mean ± std over the seeds.

    python benchmarks/shortcut_grid.py --seeds 0 1 2 [--datasets mnist fashion-mnist]
        [--cues corner centre ...] [--options zero guarded ...] [--train-size 20000] [--epochs 3] [--threads 2]
        [--no-ceiling]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from masktune import (BiasedMNISTConfig, MaskedDataset, SmallCNN, TrainSettings, compute_masks,
                      evaluate, load_fashion_mnist, load_mnist, make_biased_mnist, masktune_finetune, train_erm)
from masktune.evaluation.diagnostics import heat_removed
from masktune.evaluation.leakage import guarded_mixing, leakage_percent
from masktune.masks.rules import HeatShareRule

LOADERS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
# option -> masktune_finetune options; "guarded" is the guarded recipe (zero fill, mixing by leakage)
OPTIONS = {"zero": {}, "mean": {"fill": "mean"}, "random-image": {"fill": "random-image"},
           "zero+other-class": {"mixing": "own+other-class"}, "heat-share 50": {"rule": HeatShareRule(50)},
           "zero, 2 accumulated": {"iterations": 2, "accumulate": True}, "guarded": {}}
DEFAULT_OPTIONS = ["zero", "random-image", "zero+other-class", "heat-share 50", "zero, 2 accumulated", "guarded"]

WHITE = (255, 255, 255)
# cue name -> BiasedMNISTConfig options (red unless said): compact squares on the background every
# class shares (corner, edge) or on the objects (centre), of three sizes and two colours; bands
# across the image; a sparse pattern of single pixels; the whole background; the strokes
CUES = {"corner": {}, "corner-2px": {"square_size": 2}, "edge": {"position": "edge"},
        "centre": {"position": "centre"}, "centre-8px": {"position": "centre", "square_size": 8},
        "centre-white": {"position": "centre", "colour": WHITE},
        "band-top": {"bias_type": "band"}, "band-middle": {"bias_type": "band", "position": "centre"},
        "sparse": {"bias_type": "sparse"}, "background": {"bias_type": "background"},
        "foreground": {"bias_type": "foreground"}}


def run_cell(arrays, cue: str, seed: int, args) -> dict[str, dict]:
    config = BiasedMNISTConfig(seed=seed, **CUES[cue])
    data = make_biased_mnist(arrays, config)
    train = data.train.subset(args.train_size)
    tests = {"val (no cue)": data.val_original, "original": data.test_original, "biased": data.test_biased}
    settings = TrainSettings(lr=0.01, batch_size=128, seed=seed, progress=False)
    out = {}
    torch.manual_seed(seed)
    model = SmallCNN(2)
    erm = train_erm(model, train, data.val, settings, epochs=args.epochs)
    model.load_state_dict(erm.best.model)
    out["ERM"] = {name: m["accuracy"] for name, m in evaluate(model, tests).items()}
    masks = compute_masks(model, train, progress=False)
    out["ERM"]["heat removed"] = heat_removed(model, train, masks)
    for name in args.options:
        options = dict(OPTIONS[name])
        if name == "guarded":
            options = {"mixing": "own+other-class"} if guarded_mixing(train, masks) != "own" else {}
            same = next((o for o in args.options if o != "guarded" and OPTIONS[o] == options), None)
            result = (out[f"MaskTune {same}"] if same is not None and f"MaskTune {same}" in out  # already run
                      else finetune_cell(model, erm, train, masks, tests, settings, seed, options))
            out["MaskTune guarded"] = result | {"switched": float(bool(options))}
            continue
        out[f"MaskTune {name}"] = finetune_cell(model, erm, train, masks, tests, settings, seed, options)
    if args.no_ceiling:
        return out
    torch.manual_seed(seed)
    ceiling = SmallCNN(2)
    independent = make_biased_mnist(arrays, dataclasses.replace(config, conflicting_ratio=0.5))
    train_erm(ceiling, independent.train.subset(args.train_size), None, settings, epochs=args.epochs)
    out["ceiling"] = {name: m["accuracy"] for name, m in evaluate(ceiling, tests).items()}
    return out


def finetune_cell(model, erm, train, masks, tests, settings, seed: int, options: dict) -> dict:
    """One MaskTune finetune of the last ERM model with ``options``: accuracy on ``tests`` and the
    leakage of the masks as applied."""
    tuned = copy.deepcopy(model)
    tuned.load_state_dict(erm.last.model)
    rule = options.pop("rule", None)
    cell_masks = masks if rule is None else compute_masks(model, train, rule=rule, progress=False)
    torch.manual_seed(seed)
    masktune_finetune(tuned, train, cell_masks, settings, optimizer_state=erm.last.optimizer, **options)
    leakage = leakage_percent(MaskedDataset(train, cell_masks, fill=options.get("fill", "zero"),
                                            mixing=options.get("mixing", "own")))
    return {n: m["accuracy"] for n, m in evaluate(tuned, tests).items()} | (
        {"leakage": leakage} if leakage is not None else {}) | (
        {"heat removed": heat_removed(model, train, cell_masks)} if rule is not None else {})


def switched(flags: list[float] | None) -> str:
    """The guarded recipe's choice over the seeds."""
    return "" if flags is None else f"other-class masks on {int(sum(flags))}/{len(flags)} seeds"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"], choices=list(LOADERS))
    parser.add_argument("--cues", nargs="+", default=list(CUES), choices=list(CUES))
    parser.add_argument("--options", nargs="+", default=DEFAULT_OPTIONS, choices=list(OPTIONS))
    parser.add_argument("--train-size", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-ceiling", action="store_true", help="skip the clean-data ceilings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print("| dataset | cue | method | val (no cue) | original | biased | leakage (%) | heat removed (%) | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dataset in args.datasets:
        arrays = LOADERS[dataset]()
        for cue in args.cues:
            cells = [run_cell(arrays, cue, seed, args) for seed in args.seeds]
            for method in cells[0]:
                values = {key: [cell[method][key] for cell in cells] for key in cells[0][method]}

                def spread(key: str) -> str:
                    if key not in values:
                        return ""
                    v = values[key]
                    return f"{statistics.fmean(v):.1f}" + (f" ± {statistics.stdev(v):.1f}" if len(v) > 1 else "")

                print(f"| {dataset} | {cue} | {method} | {spread('val (no cue)')} | {spread('original')} | "
                      f"{spread('biased')} | {spread('leakage')} | {spread('heat removed')} | "
                      f"{switched(values.get('switched'))} |", flush=True)
    print(f"{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), {args.train_size} training images, "
          f"{args.epochs} ERM epochs, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
