"""MaskTune: find and remove spurious correlations (shortcut features) from image classifiers.

The library, by pipeline stage: data (:mod:`masktune.data`), models and their CAM layer
(:mod:`masktune.models`), saliency (:mod:`masktune.saliency`), training (:mod:`masktune.training`),
masks and MaskTune's finetune (:mod:`masktune.masks`), evaluation (:mod:`masktune.evaluation`),
the pipeline of a run (:mod:`masktune.pipeline`) and its report (:mod:`masktune.report`). The
names below are the public API; everything a user composes is here.
"""

from .version import __version__  # noqa: E402
from .data import (  # noqa: E402
    BatchAugment,
    BiasedMNISTConfig,
    ImageDataset,
    ImageFiles,
    ImageView,
    load_cats_vs_dogs,
    load_celeba,
    load_cifar10,
    load_fashion_mnist,
    load_image_csv,
    load_in9l,
    load_mnist,
    load_svhn,
    load_waterbirds,
    make_biased_mnist,
)
from .errors import (  # noqa: E402
    CAMMethodError,
    ConfigError,
    CorruptImageError,
    DataError,
    DeviceError,
    LayerError,
    MaskSetError,
    MaskTuneError,
    ReportError,
    RunDirError,
    StorageError,
    TrainingError,
    WeightsError,
)
from .evaluation import evaluate, group_metrics, mask_diagnostics, selective_classification  # noqa: E402
from .masks import (  # noqa: E402
    MaskedDataset,
    MaskRule,
    MaskSet,
    MaskTuneResult,
    compute_masks,
    make_rule,
    masktune_finetune,
    random_square_masks,
    threshold_masks,
)
from .models import Normalized, SmallCNN, resnet32, resnet50, resolve_cam_layer  # noqa: E402
from .pipeline import (  # noqa: E402
    EXPERIMENTS,
    Experiment,
    ExperimentData,
    RunConfig,
    get_experiment,
    make_config,
    register,
    run_experiment,
)
from .report import write_report  # noqa: E402
from .saliency import CAM, saliency_maps  # noqa: E402
from .training import ERMResult, TrainSettings, finetune, predict, train_erm  # noqa: E402

__all__ = [
    "__version__",
    # data
    "BatchAugment", "BiasedMNISTConfig", "ImageDataset", "ImageFiles", "ImageView", "load_cats_vs_dogs", "load_celeba",
    "load_cifar10", "load_fashion_mnist", "load_image_csv", "load_in9l", "load_mnist", "load_svhn", "load_waterbirds",
    "make_biased_mnist",
    # models, saliency, training, masks
    "Normalized", "SmallCNN", "resnet32", "resnet50", "resolve_cam_layer", "CAM", "saliency_maps", "ERMResult",
    "TrainSettings", "finetune", "predict", "train_erm", "MaskRule", "MaskSet", "MaskTuneResult", "MaskedDataset",
    "compute_masks", "make_rule", "masktune_finetune", "random_square_masks", "threshold_masks",
    # evaluation
    "evaluate", "group_metrics", "mask_diagnostics", "selective_classification",
    # the pipeline and its report
    "EXPERIMENTS", "Experiment", "ExperimentData", "RunConfig", "get_experiment", "make_config", "register",
    "run_experiment", "write_report",
    # errors
    "MaskTuneError", "CAMMethodError", "ConfigError", "CorruptImageError", "DataError", "DeviceError", "LayerError",
    "MaskSetError", "ReportError", "RunDirError", "StorageError", "TrainingError", "WeightsError",
]
