"""One run of an experiment, top to bottom: data -> ERM -> masks -> each finetune -> evaluation ->
results. Every stage is a function of :mod:`.stages` with explicit inputs and outputs.

Every stage writes its output atomically into the run directory before the next starts; a rerun of
the same command loads what is saved (:meth:`RunDir.stage`), and on the CPU ends with the same
results as a run that was never interrupted. Under torchrun every process runs the stages on its
share of the data and rank 0 writes the files.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack

import torch

from .. import distributed
from ..errors import ConfigError
from ..masks import MaskedDataset, MaskSet, make_rule
from ..masks.dataset import MIXINGS
from ..models import autocast_dtype
from ..saliency import get_method
from ..storage import write_json
from ..training import OPTIMIZERS
from . import stages
from .config import GUARDED, RunConfig
from .registry import Experiment, get_experiment
from .results import StageTimer, results_record, run_key, saved_config
from .rundir import MetricsLog, RunDir

FINETUNES = ("randmask", "masktune")


def check_config(config: RunConfig) -> None:
    """Refuse, before anything runs, settings that cannot work: :meth:`RunConfig.validate`, and the
    names of the mask rule, the mask fill and mixing, the CAM method, the optimizer, the device and
    the precision."""
    config.validate()
    make_rule(config.mask_rule, config.mask_param)
    get_method(config.cam_method)
    if config.mask_mixing not in (*MIXINGS, GUARDED):
        raise ConfigError(f"unknown mask mixing {config.mask_mixing!r}; choose one of: {', '.join(MIXINGS)}, {GUARDED}")
    MaskedDataset.check_options(config.mask_fill, "own" if config.mask_mixing == GUARDED else config.mask_mixing)
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    autocast_dtype(config.precision, distributed.resolve_device(config.device))


def run_experiment(config: RunConfig, *, progress: bool = True) -> dict:
    """Run ERM and the chosen finetunes of ``config``'s experiment; write checkpoints and results.

    Returns the results dictionary that is also written to ``config.out_dir / "results.json"``. A
    run killed at any point continues where it stopped when started again with the same settings;
    a finished run is not run again (its results are returned). Under torchrun it runs on all
    processes.
    """
    spec = get_experiment(config.experiment)
    check_config(config)
    with distributed.session(config.device), ExitStack() as stack:
        device = distributed.resolve_device(config.device)
        if device.type == "cuda" and config.precision != "float32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        run = RunDir(config.out_dir)
        resuming, finished = distributed.on_main(lambda: run.claim(stack, saved_config(spec, config)))
        if finished is not None:
            distributed.note(f"{run.path} holds a finished run; showing its results", progress)
            return finished
        return _run(spec, config, device, run, resuming, progress and distributed.is_main())


def _run(spec: Experiment, config: RunConfig, device: torch.device, run: RunDir, resuming: bool,
         progress: bool) -> dict:
    """The stages of one run, in order."""
    timer = StageTimer()
    torch.manual_seed(config.seed)
    with timer("data"):
        data = stages.load_data(spec, config, progress)
    model = spec.build_model(config, data.experiment.num_classes)
    recipe = stages.MaskRecipe(get_method(config.cam_method), make_rule(config.mask_rule, config.mask_param),
                               stages.check_inputs(data, model, config, device))
    reused = (MaskSet.load(config.masks, dataset=data.train, expect=recipe.meta())
              if config.masks and "masktune" in config.methods else None)  # refused before training
    settings = stages.train_settings(config, data, device, progress)
    fingerprints = data.fingerprints()
    key = run_key(spec, config, fingerprints)
    with MetricsLog(run.path, tensorboard=config.tensorboard, enabled=distributed.is_main()) as log:
        if distributed.is_main() and not resuming:
            write_json(saved_config(spec, config), run.path / "config.json")
        erm = stages.erm(model, data, settings, config.epochs, run, timer, log, key)
        model.load_state_dict(erm.best.model)
        models, masking, history, guarded = {"erm": model}, {}, list(erm.history), {}
        tuning = dataclasses.replace(settings, lr=config.tuning_lr)
        for method in (m for m in FINETUNES if m in config.methods):
            masks = (stages.randmask_masks(data.train, config.seed) if method == "randmask" else
                     stages.masktune_masks(model, data.train, recipe, config, device, run, timer, reused, progress, key))
            applied = stages.applied(config, data.train, masks) if method == "masktune" else config
            if applied is not config:
                guarded["guarded_mixing"] = applied.mask_mixing
            tuned = stages.finetuned(method, masks, erm, lambda: spec.build_model(config, data.experiment.num_classes),
                                     data.train, tuning, recipe, applied, run, timer, log, key)
            models[method] = tuned.model
            masking |= stages.mask_report(method, tuned.masks, data, applied, model, recipe, device)
            history.extend(tuned.history)
        evaluation = stages.evaluation(spec, config, models, data, device, run, timer, key)
    outcome = {"data": {"source": config.data_dir or "default", "fingerprints": fingerprints}, "run_key": key,
               **evaluation, "masking": masking, "erm_best_epoch": erm.best.epoch, "history": history, **guarded}
    results = results_record(spec, config, device, data.sizes, outcome, timer, run.resumed)
    if distributed.is_main():
        write_json(results, run.path / "results.json")
    return results
