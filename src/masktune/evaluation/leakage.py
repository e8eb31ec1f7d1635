"""Mask leakage: do the masks leave a mark that tells the classes apart?

Zeroing the pixels a model found salient is harmless where the other classes hold zeros there
anyway (the paper's corner square on MNIST's black background): the masked image looks like any
other. Where the other classes hold content there, the zeroed region is itself a visible mark,
present almost only in the class the shortcut pointed to, and the finetune can learn it instead.

The statistic, per class ``c`` and pixel ``p``: how much more often class ``c``'s images show the
fill value at ``p`` than the other classes' images do, in the masked training set, beyond the
excess it already had in the unmasked set (where real features or the shortcut itself may make
one class darker there)::

    excess_c(p) = max(0, F_c(p) - F_other(p)) - max(0, F0_c(p) - F0_other(p))

with ``F`` the share of images whose pixel ``p`` equals the fill in every channel, masked set, and
``F0`` the same share in the unmasked set. The per-class map is ``excess_c`` (clipped at 0); the
score of class ``c`` is its mean over the pixels class ``c``'s masks cover (weighted by how often
they cover each), in [0, 1]: the share of its masked pixels that are a mark the other classes do
not share. Masks that do not depend on the label add no excess; masks that zero a class's cue on
a background the other classes share add none either.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..data.base import labels_of
from ..data.loader import make_loader, to_device
from ..masks.dataset import MaskedDataset
from ..masks.maskset import MaskSet

MARK_THRESHOLD = 0.10  # a score from here on: the masks leave a mark that predicts the label (README: the grid)


def mask_leakage(dataset: Dataset, masks: MaskSet | torch.Tensor, *, fill: float | torch.Tensor = 0.0,
                 batch_size: int = 1024, labels: torch.Tensor | None = None) -> dict:
    """The leakage statistic of ``masks`` applied with ``fill`` (a value, or a per-pixel fill image
    ``[C, H, W]``) to ``dataset`` (see the module).

    ``dataset`` yields the unmasked images (the mask view) in ``[0, 1]``. Returns ``score`` (the
    largest class score), ``class_scores``, ``verdict`` (a sentence), ``leaks`` (score at least
    :data:`MARK_THRESHOLD`) and ``maps`` (``[classes, H, W]`` float tensor of the excess).
    """
    labels = labels_of(dataset) if labels is None else labels
    classes = int(labels.max()) + 1 if len(labels) else 0
    height, width = masks.shape[-2:]
    shown = torch.zeros(2, classes, height * width, dtype=torch.float64)  # [unmasked, masked] fill counts
    covered = torch.zeros(classes, height * width, dtype=torch.float64)
    start = 0
    for images, *_ in make_loader(dataset, batch_size):
        images = to_device(images, "cpu")
        batch_masks = masks[start:start + len(images)].reshape(len(images), -1)
        batch_labels = labels[start:start + len(images)]
        start += len(images)
        is_fill = (images == fill).all(1).reshape(len(images), -1)
        one_hot = torch.nn.functional.one_hot(batch_labels, classes).double().T  # [classes, B]
        shown[0] += one_hot @ is_fill.double()
        shown[1] += one_hot @ (is_fill | batch_masks).double()
        covered += one_hot @ batch_masks.double()
    sizes = torch.bincount(labels, minlength=classes).double().clamp(min=1)
    share = shown / sizes[None, :, None]
    others = (shown.sum(1, keepdim=True) - shown) / (len(labels) - sizes).clamp(min=1)[None, :, None]
    excess = (share - others).clamp(min=0)
    maps = (excess[1] - excess[0]).clamp(min=0)
    class_scores = ((maps * covered).sum(1) / covered.sum(1).clamp(min=1)).tolist()
    score = max(class_scores, default=0.0)
    return {"score": score, "class_scores": class_scores, "leaks": score >= MARK_THRESHOLD,
            "verdict": verdict(score), "maps": maps.float().view(classes, height, width)}


def leakage_percent(masked: MaskedDataset) -> float | None:
    """:func:`mask_leakage`'s score, in percent, of the masks as ``masked`` applies them: with its
    fill (a value, or the mean image for ``"mean"``) and, with mask mixing, one draw of the mixed
    masks. None for ``"random-image"``: its pixels come from other images and show no fill value,
    which the statistic needs."""
    if masked.fill == "random-image":
        return None
    masks = masked.masks
    if masked.mixing != "own":
        n = len(masked)
        masks = MaskSet.concatenate([MaskSet.from_bool(masked.applied_masks(torch.arange(start, min(start + 4096, n))))
                                     for start in range(0, n, 4096)])
    fill = masked.fill_image if masked.fill_image is not None else masked.fill
    return 100.0 * mask_leakage(masked.base, masks, fill=fill)["score"]


def guarded_mixing(dataset: Dataset, masks: MaskSet | torch.Tensor, fill: float | str = "zero") -> str:
    """The mask mixing of the ``guarded`` recipe: ``"own"`` (the paper's) unless ``masks``, applied
    to ``dataset`` with ``fill`` and each image's own mask, leave a mark that predicts the label
    (:func:`leakage_percent` from ``100 * MARK_THRESHOLD``); then ``"own+other-class"``, which
    makes where the masks lie say nothing about the class. It reads only the training images,
    their labels and the masks. A ``"random-image"`` fill shows no fill value and keeps ``"own"``."""
    leakage = leakage_percent(MaskedDataset(dataset, masks, fill=fill, mixing="own"))
    return "own+other-class" if leakage is not None and leakage >= 100 * MARK_THRESHOLD else "own"


def verdict(score: float) -> str:
    """The plain-language reading of a leakage score."""
    if score >= MARK_THRESHOLD:
        return (f"the masks leave a mark that predicts the label ({100 * score:.0f}% of a class's masked pixels "
                "show the fill where the other classes do not): the finetune may learn the mark instead of the "
                "object")
    return (f"the masks leave no mark that tells the classes apart ({100 * score:.0f}% of a class's masked pixels "
            "show the fill where the other classes do not)")
