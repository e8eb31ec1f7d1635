"""The ``masktune`` command line: a thin layer over :mod:`masktune.experiments`."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .errors import MaskTuneError
from .experiments import METHODS, RunConfig, run_biased_mnist
from .masking import RULES
from .reporting import results_table

EXPERIMENTS = {"biased-mnist": run_biased_mnist}


def _colour(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) <= 255 for p in parts):
        raise argparse.ArgumentTypeError(f"colour must be R,G,B with values 0-255, e.g. 255,0,0; got {text!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``masktune`` command."""
    parser = argparse.ArgumentParser(prog="masktune", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run an experiment (default: biased-mnist)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = RunConfig()
    run.add_argument("experiment", nargs="?", default="biased-mnist", choices=sorted(EXPERIMENTS))
    run.add_argument("--epochs", type=int, default=defaults.epochs, help="ERM epochs")
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--methods", default=",".join(defaults.methods), help=f"comma-separated, from {METHODS}")
    run.add_argument("--out", help="run directory (default: runs/<experiment>-seed<seed>)")
    run.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    run.add_argument("--data-dir", help="folder with torchvision's raw MNIST files (else cache, then download)")
    run.add_argument("--cam-layer", help="dotted module name of the CAM layer (default: the model's own)")
    run.add_argument("--limit", type=int, help="keep the first N images of each split, for quick runs")
    run.add_argument("--batch-size", type=int, default=defaults.batch_size)
    run.add_argument("--lr", type=float, default=defaults.lr, help="ERM learning rate")
    run.add_argument("--finetune-lr", type=float, help="finetune learning rate (default: the ERM one, as the authors)")
    run.add_argument("--cam-method", default=defaults.cam_method,
                     help="xgradcam, gradcam, gradcam++, hirescam, layercam, or any pytorch-grad-cam method")
    run.add_argument("--mask-rule", default=defaults.mask_rule, choices=list(RULES),
                     help="mean-std: heat > mean + k*std; top-percent: the p%% hottest pixels; threshold: heat > t")
    run.add_argument("--mask-param", type=float, help="the rule's k (default 2), p (default 5) or t (default 0.5)")
    run.add_argument("--iterations", type=int, default=defaults.iterations,
                     help="MaskTune iterations: each one after the first re-masks with the finetuned model")
    run.add_argument("--accumulate", action="store_true", help="with --iterations > 1: add new masks to the old")
    run.add_argument("--masks", help="reuse this saved mask set (OUT/masks/masktune.pt of an earlier run)")
    run.add_argument("--num-workers", type=int, default=defaults.num_workers, help="data-loader workers")
    biased = run.add_argument_group("biased MNIST")
    biased.add_argument("--conflicting-ratio", type=float, default=defaults.data.conflicting_ratio)
    biased.add_argument("--bias-type", default=defaults.data.bias_type, choices=["square", "background", "foreground"])
    biased.add_argument("--square-size", type=int, default=defaults.data.square_size)
    biased.add_argument("--colour", type=_colour, default=defaults.data.colour, help="R,G,B of the spurious feature")
    biased.add_argument("--n-squares", type=int, default=defaults.data.n_squares, choices=[1, 2])
    biased.add_argument("--val-size", type=int, default=defaults.data.val_size, help="training images held out")
    biased.add_argument("--selection", default=defaults.data.selection, choices=["authors", "random"],
                        help="which images carry the feature: the authors' digit order, or at random")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` that the parsed arguments describe."""
    base = RunConfig()
    data = replace(base.data, conflicting_ratio=args.conflicting_ratio, bias_type=args.bias_type,
                   square_size=args.square_size, colour=args.colour, n_squares=args.n_squares, seed=args.seed,
                   val_size=args.val_size, selection=args.selection)
    return replace(
        base, experiment=args.experiment, epochs=args.epochs, seed=args.seed,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()), out=args.out, device=args.device,
        data_dir=args.data_dir, cam_layer=args.cam_layer, limit=args.limit, batch_size=args.batch_size, lr=args.lr,
        finetune_lr=args.finetune_lr, cam_method=args.cam_method, mask_rule=args.mask_rule,
        mask_param=args.mask_param, iterations=args.iterations, accumulate=args.accumulate, masks=args.masks,
        num_workers=args.num_workers, data=data,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``masktune`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        results = EXPERIMENTS[config.experiment](config, progress=not args.quiet)
    except MaskTuneError as error:
        print(f"masktune: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("masktune: interrupted", file=sys.stderr)
        return 130
    print(results_table(results))
    print(f"results: {config.out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
