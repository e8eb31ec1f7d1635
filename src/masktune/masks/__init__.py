"""Masks: the rules that turn heatmaps into masks, bit-packed mask sets, the masks of a whole dataset
(MaskTune's and RandMask's), the dataset that applies them, and MaskTune's finetune."""

from .compute import Masker, compute_masks, prepare_masking, random_square_masks, random_square_maskset
from .dataset import GEOMETRIES, MaskedDataset, stretch_masks
from .finetune import MaskTuneResult, masktune_finetune
from .maskset import MaskSet, model_fingerprint, pack_bits, unpack_bits
from .rules import RULES, MaskRule, make_rule, threshold_masks

__all__ = [
    "GEOMETRIES", "RULES", "MaskRule", "Masker", "prepare_masking", "random_square_maskset", "MaskSet", "MaskTuneResult", "MaskedDataset", "compute_masks", "make_rule",
    "masktune_finetune", "model_fingerprint", "pack_bits", "random_square_masks", "stretch_masks",
    "threshold_masks", "unpack_bits",
]
