"""The stages of a run, each a function with explicit inputs and outputs; :mod:`.runner` calls them
in order. A stage that saves its output does so through :meth:`RunDir.stage`, so a run started
again loads it instead of computing it."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .. import distributed
from ..data.base import check_labels, labels_of, limited
from ..data.cache import cache_images, data_fingerprint
from ..data.files import ImageFiles
from ..data.loader import first_batch
from ..errors import ConfigError, DataError, TrainingError
from ..evaluation import evaluate_logits, group_counts, mask_diagnostics, selective_classification
from ..evaluation.diagnostics import heat_removed
from ..evaluation.leakage import guarded_mixing, leakage_percent
from ..masks import MaskedDataset, MaskSet, masktune_finetune, prepare_masking, random_square_maskset
from ..masks.rules import MaskRule
from ..models import eval_mode, place, resolve_cam_layer
from ..saliency import CAM
from ..storage import load_torch, read_json, save_torch, write_json
from ..training import ERMResult, TrainSettings, predict, train_erm
from .config import GUARDED, METHODS, RunConfig
from .registry import Experiment, ExperimentData
from .results import StageTimer
from .rundir import MaskStore, MetricsLog, RunDir, other_run


@dataclass
class RunData:
    """The data of a run: the experiment's data, and its splits cut to the run's ``limit``."""

    experiment: ExperimentData
    train: Dataset
    val: Dataset | None
    tests: dict[str, Dataset]

    def fingerprints(self) -> dict[str, str]:
        """A fingerprint of each split (:func:`~masktune.data.cache.data_fingerprint`)."""
        splits = {"train": self.train, "val": self.val, **self.tests}
        return {name: data_fingerprint(dataset) for name, dataset in splits.items() if dataset is not None}

    @property
    def sizes(self) -> dict[str, int]:
        """Images per split, as ``results.json`` records them."""
        return {"train": len(self.train), "val": len(self.val) if self.val is not None else 0,
                **{name: len(dataset) for name, dataset in self.tests.items()}}


def load_data(spec: Experiment, config: RunConfig, progress: bool) -> RunData:
    """The experiment's data for ``config``, each split limited to ``config.limit`` images; with
    ``config.cache``, image-file splits are read from their decoded-image cache (built when missing)."""
    data = spec.build_data(config)

    def prepared(dataset: Dataset) -> Dataset:
        dataset = limited(dataset, config.limit)
        if config.cache and isinstance(dataset, ImageFiles):
            return cache_images(dataset, config.cache_dir, workers=os.cpu_count() or 1, progress=progress)
        return dataset

    return RunData(data, prepared(data.train), prepared(data.val) if data.val is not None else None,
                   {name: prepared(dataset) for name, dataset in data.tests.items()})


@dataclass(frozen=True)
class MaskRecipe:
    """How MaskTune's masks are made: the CAM method, the layer it reads and the mask rule."""

    method: CAM
    rule: MaskRule
    layer: str | None

    def meta(self) -> dict[str, str | None]:
        """The metadata a mask set made this way carries (without the model's fingerprint)."""
        return {"cam_method": self.method.name, "layer": self.layer, "rule": repr(self.rule)}


def check_inputs(data: RunData, model: nn.Module, config: RunConfig, device: torch.device) -> str | None:
    """Refuse, before anything is written, data and settings the run would fail on later: an empty
    split, labels the model has no output for, a class without training images, a bad CAM layer, a
    selective test set that does not exist. Returns the CAM layer's name (None without MaskTune)."""
    splits = {"training": data.train, "validation": data.val,
              **{f"test {name!r}": dataset for name, dataset in data.tests.items()}}
    for name, dataset in splits.items():
        if dataset is not None and len(dataset) == 0:
            raise DataError(f"the {name} set is empty; check the data (--data-dir) and --limit")
    example = first_batch(data.train, place(model, device))
    with eval_mode(model), torch.no_grad():
        outputs = model(example).shape[1]
    for name, dataset in splits.items():
        if dataset is not None:
            check_labels(labels_of(dataset), outputs, name)
    num_classes = data.experiment.num_classes
    empty = (torch.bincount(labels_of(data.train), minlength=num_classes) == 0).nonzero().flatten().tolist()
    if empty:
        raise DataError(
            f"class(es) {', '.join(map(str, empty))} of the {num_classes} classes have no training images, "
            "and a classifier cannot learn a class it never sees; check the data (--data-dir), and with "
            "--limit keep enough images that every class is present"
        )
    if config.selective and (data.val is None or (config.selective_test or next(iter(data.tests))) not in data.tests):
        raise ConfigError(f"selective classification needs a validation set and a test set named by "
                          f"selective_test (one of {', '.join(data.tests)}), got {config.selective_test!r}")
    if "masktune" not in config.methods:
        return None
    return resolve_cam_layer(model, config.cam_layer, example, device=device)[0]


def train_settings(config: RunConfig, data: RunData, device: torch.device, progress: bool) -> TrainSettings:
    """The ERM settings of the run (the finetunes change only the learning rate)."""
    return TrainSettings(lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                         batch_size=config.batch_size, optimizer=config.optimizer, seed=config.seed, device=device,
                         num_workers=config.num_workers, augment=data.experiment.augment, precision=config.precision,
                         compile=config.compile, progress=progress)


def erm(model: nn.Module, data: RunData, settings: TrainSettings, epochs: int, run: RunDir, timer: StageTimer,
        log: MetricsLog, key: str) -> ERMResult:
    """ERM on the training set, resumable per epoch (``checkpoints/erm_last.pt``, which carries the
    run's ``key``)."""
    checkpoints = run.path / "checkpoints"
    if (checkpoints / "erm_last.pt").is_file():
        run.resumed = True
        distributed.note(f"resuming from {checkpoints / 'erm_last.pt'}", settings.progress)
    with timer("erm"):
        return train_erm(model, data.train, data.val, settings, epochs=epochs, checkpoint_dir=checkpoints,
                         resume=True, on_epoch=log, identity=key)


def randmask_masks(train: Dataset, seed: int) -> MaskSet:
    """RandMask's masks of the training set, bit-packed: one random square per image, from ``seed``."""
    height, width = train[0][0].shape[-2:]
    return random_square_maskset(len(train), height, width, generator=torch.Generator().manual_seed(seed))


def masktune_masks(model: nn.Module, train: Dataset, recipe: MaskRecipe, config: RunConfig, device: torch.device,
                   run: RunDir, timer: StageTimer, reused: MaskSet | None, progress: bool, key: str) -> MaskSet:
    """MaskTune's masks of the training set from ``model`` (the best ERM model), computed and saved
    chunk by chunk of ``config.mask_chunk`` images (or ``reused``, checked against the model); the
    masks stay bit-packed throughout. The whole set is also saved as ``masks/masktune.pt``."""
    if reused is not None:
        reused.check(model=model, source=config.masks)
        masks = reused
    else:
        masks = _computed_masks(model, train, recipe, config, device, run, timer, progress, key)
    if distributed.is_main():
        masks.save(run.path / "masks" / "masktune.pt")
    return masks


def _computed_masks(model: nn.Module, train: Dataset, recipe: MaskRecipe, config: RunConfig, device: torch.device,
                    run: RunDir, timer: StageTimer, progress: bool, key: str) -> MaskSet:
    masker = prepare_masking(model, first_batch(train, "cpu"), recipe.layer, method=recipe.method, rule=recipe.rule,
                             device=device, precision=config.precision)
    meta = {**masker.meta, "run_key": key}
    height, width = train[0][0].shape[-2:]
    store = MaskStore(run.path / "masks" / "masktune")

    def part_masks(part: Dataset) -> torch.Tensor:
        return masker(part, num_workers=config.num_workers, progress=False).packed

    def chunk(start: int, stop: int) -> MaskSet:
        def compute() -> MaskSet:
            with timer("masking"):
                return MaskSet(distributed.map_shards(part_masks, Subset(train, range(start, stop))), height, width,
                               meta)

        return run.stage(store.path(start, stop), compute, lambda masks, _: store.save(start, stop, masks),
                         lambda _: store.load(start, stop, expect=meta))

    n, size = len(train), config.mask_chunk
    starts = tqdm(range(0, n, size), desc="masking", unit="chunk", disable=not progress, leave=False)
    return MaskSet.concatenate([chunk(start, min(start + size, n)) for start in starts])


@dataclass
class Finetuned:
    """A finetuned model, the metrics of its epochs, and the masks of each of its iterations."""

    model: nn.Module
    history: list[dict]
    masks: list[MaskSet | torch.Tensor]


def finetuned(method: str, masks: MaskSet | torch.Tensor, erm_result: ERMResult, new_model: Callable[[], nn.Module],
              train: Dataset, settings: TrainSettings, recipe: MaskRecipe, config: RunConfig, run: RunDir,
              timer: StageTimer, log: MetricsLog, key: str) -> Finetuned:
    """The last ERM model finetuned on the training set under ``masks`` (MaskTune: for
    ``config.iterations`` epochs, re-masking after each). Saved as ``checkpoints/<method>.pt``
    (``{"model": state dict, "history": [...], "run_key": key}``), after any later iteration's
    masks (``masks/<method>_iteration<i>.pt``)."""
    later = [run.path / "masks" / f"{method}_iteration{i}.pt"
             for i in range(2, config.iterations + 1)] if method == "masktune" else []

    def compute() -> Finetuned:
        tuned = new_model()
        tuned.load_state_dict(erm_result.last.model)
        torch.manual_seed(config.seed)  # a restarted finetune replays the same random draws
        iterate = (dict(iterations=config.iterations, accumulate=config.accumulate, layer=recipe.layer,
                        method=recipe.method, rule=recipe.rule, fill=config.mask_fill, mixing=config.mask_mixing)
                   if method == "masktune" else {})
        with timer(f"finetune_{method}"):
            try:
                result = masktune_finetune(tuned, train, masks, settings, optimizer_state=erm_result.last.optimizer,
                                           desc=method, **iterate)
            except TrainingError as error:
                raise TrainingError(f"{error}; the ERM checkpoints in {run.path / 'checkpoints'} were kept") from None
        return Finetuned(tuned, result.history, result.masks)

    def save(tuned: Finetuned, path: Path) -> None:
        for m, later_path in zip(tuned.masks[1:], later):
            MaskSet(m.packed, m.height, m.width, {**m.meta, "run_key": key}).save(later_path)
        save_torch({"model": tuned.model.state_dict(), "history": tuned.history, "run_key": key}, path)
        for metrics in tuned.history:
            log(metrics)

    def load(path: Path) -> Finetuned:
        saved = load_torch(path)
        if saved.get("run_key") != key:
            raise other_run(path, "settings or data")
        tuned = new_model()
        tuned.load_state_dict(saved["model"])
        return Finetuned(tuned, saved["history"], [masks, *(MaskSet.load(p, expect={"run_key": key}) for p in later)])

    return run.stage(Path("checkpoints") / f"{method}.pt", compute, save, load)


def applied(config: RunConfig, train: Dataset, masks: MaskSet | torch.Tensor) -> RunConfig:
    """``config`` with the mask mixing MaskTune's finetune uses: a ``"guarded"`` mixing becomes
    :func:`~masktune.evaluation.leakage.guarded_mixing`'s choice for ``masks`` (ERM's), which
    holds for every iteration; any other mixing is kept."""
    if config.mask_mixing != GUARDED:
        return config
    return dataclasses.replace(config, mask_mixing=guarded_mixing(train, masks, config.mask_fill))


def mask_report(method: str, masks: list[MaskSet | torch.Tensor], data: RunData, config: RunConfig,
                model: nn.Module, recipe: MaskRecipe, device: torch.device) -> dict[str, dict]:
    """:func:`~masktune.mask_diagnostics` of each iteration's masks of ``method``, keyed ``method``,
    then ``<method>_iteration2``, ...: with the masks' leakage (of the masks as applied: MaskTune's
    with ``config.mask_fill`` and ``mask_mixing``; with mixing, ``own_leakage_percent`` is that of
    the own masks alone), with a known feature region its coverage too,
    and for MaskTune's first masks the share of the heat of ``model`` (the best ERM model) they
    remove (:func:`~masktune.evaluation.diagnostics.heat_removed`)."""
    spurious = getattr(data.train, "metadata", {}).get("spurious")
    region = data.experiment.feature_region
    labels = labels_of(data.train) if spurious is not None and region is not None else None
    names = [method, *(f"{method}_iteration{i}" for i in range(2, len(masks) + 1))]
    options = dict(fill=config.mask_fill, mixing=config.mask_mixing) if method == "masktune" else {}
    report = {}
    for name, m in zip(names, masks):
        leakage = leakage_percent(MaskedDataset(data.train, m, **options))
        report[name] = mask_diagnostics(m, spurious, region, labels) | (
            {"leakage_percent": leakage} if leakage is not None else {})
        own = (leakage_percent(MaskedDataset(data.train, m, fill=config.mask_fill))
               if options.get("mixing", "own") != "own" else None)
        if own is not None:
            report[name]["own_leakage_percent"] = own
    if method == "masktune":
        report[method]["heat_removed_percent"] = heat_removed(model, data.train, masks[0], recipe.layer,
                                                              method=recipe.method, device=device)
    return report


def evaluate_methods(spec: Experiment, config: RunConfig, models: dict[str, nn.Module], data: RunData,
                     device: torch.device) -> dict[str, Any]:
    """Metrics of each method on each test set (groups weighted by the training set's proportions),
    the experiment's summary figures and, when asked, selective classification."""
    full_train = data.experiment.train
    train_metadata = getattr(full_train, "metadata", {})
    train_groups = group_counts(labels_of(full_train), train_metadata) if "spurious" in train_metadata else {}
    evaluated = [method for method in METHODS if method in config.methods]

    def logits_of(method: str, dataset: Dataset) -> torch.Tensor:
        return predict(models[method], dataset, device=device, num_workers=config.num_workers,
                       precision=config.precision)

    logits = {method: {name: logits_of(method, dataset) for name, dataset in data.tests.items()}
              for method in evaluated}
    accuracies = {method: evaluate_logits(logits[method], data.tests, train_group_counts=train_groups or None)
                  for method in evaluated}
    extra: dict[str, Any] = {"train_group_counts": train_groups}
    if spec.summarize is not None:
        extra["summary"] = {method: spec.summarize(accuracies[method]) for method in evaluated}
    if config.selective:
        val_logits = {method: logits_of(method, data.val) for method in ("erm", "masktune")}
        by_test_set = {name: selective_classification(val_logits["erm"], val_logits["masktune"], logits["erm"][name],
                                                      logits["masktune"][name], labels_of(dataset), config.coverages)
                       for name, dataset in data.tests.items()}
        chosen = config.selective_test or next(iter(data.tests))
        extra["selective"] = {method: {"test_set": chosen, **r} for method, r in by_test_set[chosen].items()}
        if len(data.tests) > 1:
            extra["selective_by_test_set"] = by_test_set
    return {"accuracy": accuracies, **extra}


def evaluation(spec: Experiment, config: RunConfig, models: dict[str, nn.Module], data: RunData,
               device: torch.device, run: RunDir, timer: StageTimer, key: str) -> dict[str, Any]:
    """:func:`evaluate_methods`, computed on rank 0 and saved as ``evaluation.json`` with the run's ``key``."""
    def compute() -> dict[str, Any]:
        with timer("evaluation"):
            return distributed.on_main(lambda: evaluate_methods(spec, config, models, data, device))

    def load(path: Path) -> dict[str, Any]:
        saved = read_json(path)
        if saved.pop("run_key", None) != key:
            raise other_run(path, "settings or data")
        saved.pop("checksum")
        return saved

    return run.stage("evaluation.json", compute, lambda outcome, path: write_json({**outcome, "run_key": key}, path),
                     load)
