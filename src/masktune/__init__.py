"""MaskTune: find and remove spurious correlations (shortcut features) from image classifiers."""

__version__ = "0.1.0"

from .augment import BatchAugment  # noqa: E402
from .errors import MaskTuneError  # noqa: E402
from .evaluation import evaluate, group_metrics, mask_diagnostics  # noqa: E402
from .masking import (  # noqa: E402
    MaskedDataset,
    MaskRule,
    MaskTuneResult,
    compute_masks,
    make_rule,
    masktune_finetune,
    random_square_masks,
    threshold_masks,
)
from .masksets import MaskSet, model_fingerprint  # noqa: E402
from .models import Normalized, SmallCNN, resnet32, resnet50, resolve_cam_layer  # noqa: E402
from .saliency import (  # noqa: E402
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    LibraryCAM,
    XGradCAM,
    saliency_maps,
)
from .selective import selective_classification  # noqa: E402
from .training import ERMResult, finetune, predict, train_erm  # noqa: E402

__all__ = [
    "BatchAugment",
    "CAM",
    "ERMResult",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "LibraryCAM",
    "MaskRule",
    "MaskSet",
    "MaskTuneError",
    "MaskTuneResult",
    "MaskedDataset",
    "Normalized",
    "SmallCNN",
    "XGradCAM",
    "compute_masks",
    "evaluate",
    "finetune",
    "group_metrics",
    "make_rule",
    "mask_diagnostics",
    "masktune_finetune",
    "model_fingerprint",
    "predict",
    "random_square_masks",
    "resnet32",
    "resnet50",
    "resolve_cam_layer",
    "saliency_maps",
    "selective_classification",
    "threshold_masks",
    "train_erm",
]
