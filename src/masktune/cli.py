"""The ``masktune`` command line: a thin layer over :mod:`masktune.pipeline` and :mod:`masktune.report`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, MaskTuneError
from .pipeline import EXPERIMENTS, make_config, parse_overrides, run_experiment, sweep
from .pipeline.config import RECIPES, coerce, recipe_settings
from .report import results_table, write_report


def _typed(key: str, kind: Any) -> Any:
    """An argparse ``type`` turning the flag's text into the setting's type (a bad value: exit 2)."""
    def parse(text: str) -> Any:
        try:
            return coerce(key, text, kind)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return parse


# configuration key -> (type, help); flags left out keep the experiment's default
RUN_FLAGS = {
    "epochs": (int, "ERM epochs"),
    "seed": (int, "random seed (data split, initialisation, shuffling)"),
    "methods": (tuple[str, ...], "comma-separated, from erm,randmask,masktune"),
    "out": (str, "run directory (default: runs/<experiment>-seed<seed>)"),
    "device": (str, "cpu, cuda or cuda:N"),
    "data_dir": (str, "folder with the dataset (else the cache, then a download where possible)"),
    "cam_layer": (str, "dotted module name of the CAM layer (default: the model's own)"),
    "limit": (int, "keep the first N images of each split, for quick runs"),
    "batch_size": (int, "training batch size"),
    "lr": (float, "ERM learning rate"),
    "finetune_lr": (float, "finetune learning rate (default: the ERM one, as the authors)"),
    "cam_method": (str, "xgradcam, gradcam, gradcam++, hirescam, layercam, or any pytorch-grad-cam method"),
    "mask_rule": (str, "mean-std: heat > mean + k*std; top-percent: the p%% hottest pixels; threshold: heat > t; "
                  "heat-share: the hottest pixels holding q%% of the heat"),
    "mask_param": (float, "the rule's k (default 2), p (default 5), t (default 0.5) or q (default 50)"),
    "mask_fill": (str, "what masked pixels become: zero (the paper's), mean (the per-pixel mean image) or "
                  "random-image (the pixels of another random training image)"),
    "mask_mixing": (str, "own (the paper's); own+other-class: each image also gets the mask of a random "
                    "image of another class; guarded: own+other-class only where the own masks leak"),
    "iterations": (int, "MaskTune iterations: each one after the first re-masks with the finetuned model"),
    "masks": (str, "reuse this saved mask set (OUT/masks/masktune.pt of an earlier run)"),
    "num_workers": (int, "data-loader worker processes (default: none for in-memory and cached images, one per "
                    "core up to 8 for image files)"),
    "precision": (str, "auto (bfloat16 autocast on CUDA, float32 on the CPU), float32, bfloat16 or float16"),
    "cache_dir": (str, "folder of the decoded-image cache of image-file datasets (default: $MASKTUNE_HOME/images)"),
}
DATA_FLAGS = {
    "conflicting_ratio": (float, "share of class-1 images with the feature (and of class-0 images without)"),
    "bias_type": (str, "square, band (square-size rows across the image), sparse (every 4th pixel of every "
                  "4th row), background or foreground"),
    "square_size": (int, "side of the square (height of the band) in pixels"),
    "position": (str, "where the square sits: corner (the paper's), edge (the middle of the top edge) or centre"),
    "colour": (tuple[int, ...], "R,G,B of the spurious feature, e.g. 255,0,0"),
    "n_squares": (int, "1, or 2 for a second square in the top-right corner"),
    "val_size": (int, "training images held out for validation"),
    "selection": (str, "which images carry the feature: authors (digit order) or random"),
}
SWITCHES = {"accumulate": True, "tensorboard": True, "pretrained": False, "cache": False, "compile": True}


def _add_run_options(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    parser.add_argument("experiment", nargs="?", default="biased-mnist", choices=sorted(EXPERIMENTS))
    parser.add_argument("--recipe", choices=list(RECIPES), default="paper",
                        help="masking recipe: paper (the paper's, default) or guarded (the paper's, with other "
                             "classes' masks mixed in where the own masks leave a mark); other flags override it")
    for key, (kind, text) in RUN_FLAGS.items():
        if key not in leave_out:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=_typed(key, kind), help=text)
    data = parser.add_argument_group("biased MNIST data options (also settable as --set data.<option>=...)")
    for key, (kind, text) in DATA_FLAGS.items():
        data.add_argument(f"--{key.replace('_', '-')}", dest=f"data.{key}", type=_typed(f"data.{key}", kind), help=text)
    parser.add_argument("--accumulate", action="store_const", const=True,
                        help="with --iterations > 1: add new masks to the old")
    parser.add_argument("--tensorboard", action="store_const", const=True,
                        help="also log per-epoch metrics for TensorBoard (needs pip install 'masktune[tensorboard]')")
    parser.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                        help="random initialisation instead of pretrained (ImageNet) weights")
    parser.add_argument("--no-cache", dest="cache", action="store_const", const=False,
                        help="decode image files in every stage (the lazy PIL path) instead of caching them once")
    parser.add_argument("--compile", action="store_const", const=True, help="train a torch.compile-d model")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``masktune`` command."""
    parser = argparse.ArgumentParser(prog="masktune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment (default: biased-mnist); rerun to resume")
    _add_run_options(run)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any setting, e.g. --set weight_decay=5e-4 --set data.square_size=6")
    run.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    report = commands.add_parser("report", help="write the HTML report (heatmaps, masks, accuracy, curves) of a run")
    report.add_argument("run_dir", help="a run directory, or a directory of run directories (one per seed)")
    report.add_argument("--device", default="cpu", help="device that runs the models for the heatmaps")
    report.add_argument("--samples", type=int, default=3, help="training images shown per group")
    grid = commands.add_parser("sweep", help="run an experiment over seeds and a grid of settings")
    _add_run_options(grid, leave_out=("seed", "out"))
    grid.add_argument("--seeds", default="0..4", help="a range like 0..4 (inclusive) or a list like 0,3,7")
    grid.add_argument("--out", dest="sweep_dir", help="sweep folder (default: runs/sweep-<experiment>)")
    grid.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                      help="a grid axis: the values, separated by commas (by ; for list-valued settings such "
                           "as methods or data.colour, e.g. --set 'methods=erm,masktune;masktune')")
    return parser


def _message(error: MaskTuneError) -> str:
    """The error's own message, also when a DataLoader worker wrapped it in the worker's traceback."""
    text = str(error)
    if text.startswith("Caught ") and "DataLoader worker" in text.partition("\n")[0]:
        text = text.rpartition(f"{type(error).__module__}.{type(error).__qualname__}: ")[2]
    return text.strip()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``masktune`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        if args.command == "report":
            print(f"report: {write_report(args.run_dir, device=args.device, samples_per_group=args.samples)}")
            return 0
        overrides = recipe_settings(args.recipe) | {
            key: value for key, value in vars(args).items()
            if value is not None and (key in RUN_FLAGS or key in SWITCHES or key.startswith("data."))}
        if args.command == "sweep":
            out = Path(args.sweep_dir or f"runs/sweep-{args.experiment}")
            runs = sweep.plan(args.experiment, sweep.parse_seeds(args.seeds), args.set, overrides, out)
            rows = sweep.aggregate(sweep.run_sweep(runs, out, progress=not args.quiet))
            if rank == 0:
                print(sweep.markdown_table(rows))
                print(f"runs: {out / 'runs.jsonl'}; tables: {out / 'summary.md'}, {out / 'summary.csv'}")
            return 0
        config = make_config(args.experiment, overrides | parse_overrides(args.set))
        results = run_experiment(config, progress=not args.quiet)
        if rank == 0:
            print(results_table(results))
            print(f"results: {config.out_dir / 'results.json'}")
            if not args.no_report:
                print(f"report: {write_report(config.out_dir, device=config.device)}")
    except MaskTuneError as error:
        where = f" (rank {rank})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"masktune: error{where}: {_message(error)}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a read-only folder: the stages saved so far are kept
        where = f" ({error.filename})" if error.filename else ""
        print(f"masktune: error: a file could not be written or read{where}: {error.strerror or error}; free some "
              "space or make the folder writable (or pass another --out), then run the same command again: the "
              "stages already saved are kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masktune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
