"""The ``masktune`` command line: a thin layer over :mod:`masktune.experiments`."""

from __future__ import annotations

import argparse
import sys

from .errors import MaskTuneError
from .experiments import EXPERIMENTS, make_config, parse_overrides, run_experiment
from .reporting import results_table, write_report

# command-line flag -> configuration key; flags left out keep the experiment's default
RUN_FLAGS = {
    "epochs": ("epochs", int, "ERM epochs"),
    "seed": ("seed", int, "random seed (data split, initialisation, shuffling)"),
    "methods": ("methods", str, "comma-separated, from erm,randmask,masktune"),
    "out": ("out", str, "run directory (default: runs/<experiment>-seed<seed>)"),
    "device": ("device", str, "cpu, cuda or cuda:N"),
    "data_dir": ("data_dir", str, "folder with the dataset (else the cache, then a download where possible)"),
    "cam_layer": ("cam_layer", str, "dotted module name of the CAM layer (default: the model's own)"),
    "limit": ("limit", int, "keep the first N images of each split, for quick runs"),
    "batch_size": ("batch_size", int, "training batch size"),
    "lr": ("lr", float, "ERM learning rate"),
    "finetune_lr": ("finetune_lr", float, "finetune learning rate (default: the ERM one, as the authors)"),
    "cam_method": ("cam_method", str, "xgradcam, gradcam, gradcam++, hirescam, layercam, or any pytorch-grad-cam "
                   "method"),
    "mask_rule": ("mask_rule", str, "mean-std: heat > mean + k*std; top-percent: the p%% hottest pixels; "
                  "threshold: heat > t"),
    "mask_param": ("mask_param", float, "the rule's k (default 2), p (default 5) or t (default 0.5)"),
    "iterations": ("iterations", int, "MaskTune iterations: each one after the first re-masks with the finetuned "
                   "model"),
    "masks": ("masks", str, "reuse this saved mask set (OUT/masks/masktune.pt of an earlier run)"),
    "num_workers": ("num_workers", int, "data-loader worker processes"),
}
DATA_FLAGS = {
    "conflicting_ratio": (float, "share of class-1 images with the feature (and of class-0 images without)"),
    "bias_type": (str, "square, background or foreground"),
    "square_size": (int, "side of the square in pixels"),
    "colour": (str, "R,G,B of the spurious feature, e.g. 255,0,0"),
    "n_squares": (int, "1, or 2 for a second square in the top-right corner"),
    "val_size": (int, "training images held out for validation"),
    "selection": (str, "which images carry the feature: authors (digit order) or random"),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``masktune`` command."""
    parser = argparse.ArgumentParser(prog="masktune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment (default: biased-mnist)")
    run.add_argument("experiment", nargs="?", default="biased-mnist", choices=sorted(EXPERIMENTS))
    for flag, (_, kind, text) in RUN_FLAGS.items():
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=kind, help=text)
    data = run.add_argument_group("biased MNIST data options (also settable as --set data.<option>=...)")
    for flag, (kind, text) in DATA_FLAGS.items():
        data.add_argument(f"--{flag.replace('_', '-')}", dest=f"data.{flag}", type=kind, help=text)
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override any setting, e.g. --set weight_decay=5e-4 --set data.square_size=6")
    run.add_argument("--accumulate", action="store_true", help="with --iterations > 1: add new masks to the old")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log per-epoch metrics for TensorBoard (needs pip install 'masktune[tensorboard]')")
    run.add_argument("--no-report", action="store_true", help="do not write the HTML report at the end")
    run.add_argument("--no-pretrained", dest="pretrained", action="store_const", const="false",
                     help="random initialisation instead of pretrained (ImageNet) weights")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    report = commands.add_parser("report", help="write the HTML report (heatmaps, masks, accuracy, curves) of a run")
    report.add_argument("run_dir", help="a run directory, or a directory of run directories (one per seed)")
    report.add_argument("--device", default="cpu", help="device that runs the models for the heatmaps")
    report.add_argument("--samples", type=int, default=3, help="training images shown per group")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``masktune`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            print(f"report: {write_report(args.run_dir, device=args.device, samples_per_group=args.samples)}")
            return 0
        given = {key: value for key, value in vars(args).items()
                 if value is not None and (key in RUN_FLAGS or key.startswith("data.") or key == "pretrained")}
        overrides = {RUN_FLAGS[k][0] if k in RUN_FLAGS else k: str(v) for k, v in given.items()}
        overrides |= {flag: "true" for flag in ("tensorboard", "accumulate") if getattr(args, flag)}
        config = make_config(args.experiment, overrides | parse_overrides(args.set))
        results = run_experiment(config, progress=not args.quiet)
        print(results_table(results))
        print(f"results: {config.out_dir / 'results.json'}")
        if not args.no_report:
            print(f"report: {write_report(config.out_dir, device=config.device)}")
    except MaskTuneError as error:
        print(f"masktune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masktune: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
