"""MaskTune: find and remove spurious correlations (shortcut features) from image classifiers."""

__version__ = "0.1.0"

from .errors import MaskTuneError  # noqa: E402
from .evaluation import evaluate, group_metrics, mask_diagnostics  # noqa: E402
from .masking import MaskedDataset, compute_masks, random_square_masks, threshold_masks  # noqa: E402
from .models import SmallCNN, resolve_cam_layer  # noqa: E402
from .saliency import CAM, XGradCAM, saliency_maps  # noqa: E402
from .training import ERMResult, finetune, predict, train_erm  # noqa: E402

__all__ = [
    "CAM",
    "ERMResult",
    "MaskTuneError",
    "MaskedDataset",
    "SmallCNN",
    "XGradCAM",
    "compute_masks",
    "evaluate",
    "finetune",
    "group_metrics",
    "mask_diagnostics",
    "predict",
    "random_square_masks",
    "resolve_cam_layer",
    "saliency_maps",
    "threshold_masks",
    "train_erm",
]
