"""The pipeline of a run, stage by stage, each resumable: ERM (per epoch), masking (per chunk of
images), each finetune and each method's evaluation.

Every stage writes its result atomically into the run directory before the next starts; a rerun of
the same command skips what is saved, and on the CPU ends with the same results as a run that was
never interrupted. Under torchrun every process runs the stages on its share of the data and rank 0
writes the files.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from . import distributed
from ._io import load_torch, save_torch, write_json
from .data import DataError
from .evaluation import mask_diagnostics
from .experiments import (ConfigError, Experiment, ExperimentData, RunConfig, StageTimer, environment,
                          evaluate_methods, get_experiment, limited)
from .masking import compute_masks, make_rule, masktune_finetune, random_square_masks
from .masksets import MaskSet, model_fingerprint
from .models import eval_mode, resolve_cam_layer
from .rundir import MaskStore, RunLock, check_saved_config
from .runlog import MetricsLog
from .saliency import get_method
from .training import ERMResult, TrainingError, check_labels, first_batch, labels_of, model_device, train_erm


def _note(message: str, progress: bool) -> None:
    if progress and distributed.is_main():
        print(f"masktune: {message}", file=sys.stderr)


def check_inputs(data: ExperimentData, splits: dict[str, Dataset | None], model: nn.Module,
                 config: RunConfig) -> None:
    """Refuse, before anything is written, data and settings the run would fail on later: an empty
    split, labels the model has no output for, a class without training images, a bad CAM layer."""
    for name, dataset in splits.items():
        if dataset is not None and len(dataset) == 0:
            raise DataError(f"the {name} set is empty; check the data (--data-dir) and --limit")
    example = first_batch(splits["training"], model_device(model))
    with eval_mode(model), torch.no_grad():
        outputs = model(example).shape[1]
    for name, dataset in splits.items():
        if dataset is not None:
            check_labels(labels_of(dataset), outputs, name)
    counts = torch.bincount(labels_of(splits["training"]), minlength=data.num_classes)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(
            f"class(es) {', '.join(map(str, empty))} of the {data.num_classes} classes have no training images, "
            "and a classifier cannot learn a class it never sees; check the data (--data-dir), and with "
            "--limit keep enough images that every class is present"
        )
    if "masktune" in config.methods:
        resolve_cam_layer(model, config.cam_layer, example)


class _Run:
    """One run of the pipeline: its data, models and run directory."""

    def __init__(self, spec: Experiment, config: RunConfig, device: torch.device, resuming: bool,
                 progress: bool) -> None:
        self.spec, self.config, self.device, self.resuming = spec, config, device, resuming
        self.progress = progress and distributed.is_main()
        self.out = config.out_dir
        self.checkpoints = self.out / "checkpoints"
        self.timer = StageTimer()
        self.resumed = False
        torch.manual_seed(config.seed)
        with self.timer("data"):
            self.data = spec.build_data(config)
            self.train = limited(self.data.train, config.limit)
            self.val = limited(self.data.val, config.limit) if self.data.val is not None else None
            self.tests = {name: limited(dataset, config.limit) for name, dataset in self.data.tests.items()}
        self.model = self.new_model()
        self.train_args = dict(momentum=config.momentum, weight_decay=config.weight_decay,
                               batch_size=config.batch_size, seed=config.seed, device=device,
                               num_workers=config.num_workers, progress=self.progress,
                               optimizer=config.optimizer, augment=self.data.augment)
        self.mask_settings = dict(method=get_method(config.cam_method),
                                  rule=make_rule(config.mask_rule, config.mask_param))
        self.finetune_lr = config.finetune_lr if config.finetune_lr is not None else config.lr

    def new_model(self) -> nn.Module:
        return self.spec.build_model(self.config, self.data.num_classes)

    def saved(self, path: Path) -> bool:
        """Whether the stage output ``path`` exists (and so this run continues an earlier one)."""
        found = path.is_file()
        self.resumed |= found
        return found

    def erm(self) -> ERMResult:
        last = self.checkpoints / "erm_last.pt"
        if self.saved(last):
            _note(f"resuming from {last}", self.progress)
        with self.timer("erm"):
            return train_erm(self.model, self.train, self.val, epochs=self.config.epochs, lr=self.config.lr,
                             checkpoint_dir=self.checkpoints, resume=True, on_epoch=self.log, **self.train_args)

    def masks(self) -> MaskSet:
        """MaskTune's masks of the training set from the best ERM model, chunk by chunk (or the mask
        set given by ``config.masks``, checked against this run's data and model). The masks stay
        bit-packed throughout."""
        if self.reused is not None:
            self.reused.check(model=self.model, source=self.config.masks)
            return self.reused
        meta = {**self.mask_meta, "model_fingerprint": model_fingerprint(self.model)}
        height, width = self.train[0][0].shape[-2:]
        store = MaskStore(self.out / "masks" / "masktune")
        n, size = len(self.train), self.config.mask_chunk
        chunks = []
        for start in tqdm(range(0, n, size), desc="masking", unit="chunk", disable=not self.progress, leave=False):
            stop = min(start + size, n)
            chunk = store.load(start, stop, expect=meta)
            self.resumed |= chunk is not None
            if chunk is None:
                with self.timer("masking"):
                    packed = distributed.map_shards(self._compute_masks, Subset(self.train, range(start, stop)))
                chunk = MaskSet(packed, height, width, meta)
                if distributed.is_main():
                    store.save(start, stop, chunk)
            chunks.append(chunk)
        distributed.barrier()
        return MaskSet.concatenate(chunks)

    def _compute_masks(self, images: Dataset) -> torch.Tensor:
        return compute_masks(self.model, images, self.layer, device=self.device, num_workers=self.config.num_workers,
                             progress=False, **self.mask_settings).packed

    def finetuned(self, method: str, masks: MaskSet | torch.Tensor, erm: ERMResult) -> tuple[nn.Module, list[dict]]:
        """The last ERM model finetuned on the training set under ``masks`` (MaskTune: for
        ``config.iterations`` epochs, re-masking after each); saved as ``<method>.pt`` (the state
        dict), after its history (``<method>_history.json``) and any later iteration's masks."""
        path, history_path = self.checkpoints / f"{method}.pt", self.checkpoints / f"{method}_history.json"
        tuned = self.new_model()
        if self.saved(path):
            tuned.load_state_dict(load_torch(path))
            return tuned, json.loads(history_path.read_text())
        tuned.load_state_dict(erm.last.model)
        torch.manual_seed(self.config.seed)  # a restarted finetune replays the same random draws
        iterate = (dict(iterations=self.config.iterations, accumulate=self.config.accumulate, layer=self.layer,
                        **self.mask_settings) if method == "masktune" else {})
        with self.timer(f"finetune_{method}"):
            try:
                result = masktune_finetune(tuned, self.train, masks, optimizer_state=erm.last.optimizer,
                                           lr=self.finetune_lr, desc=method, **iterate, **self.train_args)
            except TrainingError as error:
                raise TrainingError(f"{error}; the ERM checkpoints in {self.checkpoints} were kept") from None
        if distributed.is_main():
            for i, later in enumerate(result.masks[1:], 2):
                later.save(self.out / "masks" / f"{method}_iteration{i}.pt")
            write_json(result.history, history_path)
            save_torch(tuned.state_dict(), path)
            for metrics in result.history:
                self.log(metrics)
        distributed.barrier()
        return tuned, result.history

    def evaluated(self, models: dict[str, nn.Module]) -> tuple[dict, dict]:
        """Every method's metrics on every test set (and selective classification when asked),
        computed on rank 0 and saved."""
        path = self.out / "evaluation.json"
        if self.saved(path):
            saved = json.loads(path.read_text())
            return saved["accuracy"], saved["extra"]
        with self.timer("evaluation"):
            accuracies, extra = distributed.on_main(lambda: evaluate_methods(
                self.spec, self.config, models, self.val, self.tests, self.data.train))
        if distributed.is_main():
            write_json({"accuracy": accuracies, "extra": extra}, path)
        return accuracies, extra

    def results(self, erm: ERMResult, accuracies: dict, extra: dict, diagnostics: dict,
                history: list[dict]) -> dict:
        self.timer.seconds["total"] = round(sum(self.timer.seconds.values()), 3)
        config = asdict(self.config)
        config.update(out=str(self.out), finetune_lr=self.finetune_lr, methods=list(self.config.methods),
                      version=self.spec.version)
        return {
            "config": config,
            "environment": {**environment(str(self.device)), "world_size": str(distributed.world_size())},
            "sizes": {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,
                      **{name: len(dataset) for name, dataset in self.tests.items()}},
            "accuracy": accuracies,
            **extra,
            "masking": diagnostics,
            "erm_best_epoch": erm.best.epoch,
            "history": history,
            "timings_s": self.timer.seconds,
            "resumed": self.resumed,
        }

    def execute(self) -> dict:
        config = self.config
        splits = {"training": self.train, "validation": self.val,
                  **{f"test {name!r}": dataset for name, dataset in self.tests.items()}}
        check_inputs(self.data, splits, self.model, config)
        if config.selective and (self.val is None or (config.selective_test or next(iter(self.tests))) not in self.tests):
            raise ConfigError(f"selective classification needs a validation set and a test set named by "
                              f"selective_test (one of {', '.join(self.tests)}), got {config.selective_test!r}")
        self.layer = resolve_cam_layer(self.model, config.cam_layer, first_batch(self.train, self.device))[0]
        self.mask_meta = {"cam_method": self.mask_settings["method"].name, "layer": self.layer,
                          "rule": repr(self.mask_settings["rule"])}
        self.reused = (MaskSet.load(config.masks, dataset=self.train, expect=self.mask_meta)
                       if config.masks and "masktune" in config.methods else None)  # refused before training
        self.log = MetricsLog(self.out, tensorboard=config.tensorboard) if distributed.is_main() else None
        if distributed.is_main() and not self.resuming:
            write_json(saved_config(self.spec, config), self.out / "config.json")
        erm = self.erm()
        self.model.load_state_dict(erm.best.model)
        models, diagnostics, history = {"erm": self.model}, {}, list(erm.history)
        spurious = getattr(self.train, "metadata", {}).get("spurious")
        labels = labels_of(self.train) if spurious is not None and self.data.feature_region is not None else None
        for method in ("randmask", "masktune"):
            if method not in config.methods:
                continue
            if method == "randmask":
                generator = torch.Generator().manual_seed(config.seed)
                masks = random_square_masks(len(self.train), *self.train[0][0].shape[-2:], generator=generator)
            else:
                masks = self.masks()
                masks.save(self.out / "masks" / "masktune.pt")
            diagnostics[method] = mask_diagnostics(masks, spurious, self.data.feature_region, labels)
            models[method], method_history = self.finetuned(method, masks, erm)
            history.extend(method_history)
            for later in sorted((self.out / "masks").glob(f"{method}_iteration*.pt")):
                diagnostics[later.stem] = mask_diagnostics(MaskSet.load(later), spurious,
                                                           self.data.feature_region, labels)
        accuracies, extra = self.evaluated(models)
        if self.log is not None:
            self.log.close()
        results = self.results(erm, accuracies, extra, diagnostics, history)
        if distributed.is_main():
            write_json(results, self.out / "results.json")
        return results


def saved_config(spec: Experiment, config: RunConfig) -> dict:
    """The configuration as ``config.json`` records it (a resumed run must match it)."""
    return {"experiment": spec.name, "version": spec.version, **asdict(config),
            "world_size": distributed.launched_world_size()}


def run(config: RunConfig, *, progress: bool = True) -> dict:
    """The pipeline behind :func:`masktune.experiments.run_experiment` (see there)."""
    spec = get_experiment(config.experiment)
    config.validate()
    with distributed.session(config.device), ExitStack() as stack:
        device = distributed.resolve_device(config.device)
        out = config.out_dir

        def claim() -> tuple[bool, dict | None]:
            stack.enter_context(RunLock(out))
            resuming = check_saved_config(out, saved_config(spec, config))
            finished = out / "results.json"
            return resuming, json.loads(finished.read_text()) if finished.is_file() else None

        resuming, finished = distributed.on_main(claim)
        if finished is not None:
            _note(f"{out} holds a finished run; showing its results", progress)
            return finished
        return _Run(spec, config, device, resuming, progress).execute()
