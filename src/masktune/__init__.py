"""MaskTune: find and remove spurious correlations (shortcut features) from image classifiers."""

__version__ = "0.1.0"

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
from .models import SmallCNN, resolve_cam_layer  # noqa: E402
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
from .training import ERMResult, finetune, predict, train_erm  # noqa: E402

__all__ = [
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
    "resolve_cam_layer",
    "saliency_maps",
    "threshold_masks",
    "train_erm",
]
