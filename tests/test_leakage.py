"""The mask-leakage statistic against hand-built cases and a brute-force reference."""

import torch

from masktune import ImageDataset, mask_diagnostics
from masktune.evaluation import mask_leakage
from masktune.evaluation.leakage import MARK_THRESHOLD


def two_classes(n=8, size=6):
    """Black images; class 0 carries a red square in the centre (rows/cols 2..3: the shortcut), and
    half of class 1 a white stroke there."""
    images = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    strokes = (labels == 1) & (torch.arange(n) % 4 == 1)
    images[strokes, :, 2:4, 2:4] = 255
    images[labels == 0, 0, 2:4, 2:4] = 255
    return ImageDataset(images, labels)


def region_masks(labels, rows, cols, size=6, only=0):
    masks = torch.zeros(len(labels), size, size, dtype=torch.bool)
    masks[(labels == only) if only is not None else slice(None), rows, cols] = True
    return masks


def test_masks_on_a_shared_background_leave_no_mark():
    data = two_classes()
    result = mask_leakage(data, region_masks(data.labels, slice(0, 2), slice(0, 2)))
    assert result["score"] == 0.0 and not result["leaks"] and "no mark" in result["verdict"]


def test_masks_where_the_other_class_has_content_are_a_mark_in_proportion():
    data = two_classes()  # class 0's square becomes black where half of class 1 (2 of 4 images) is white
    result = mask_leakage(data, region_masks(data.labels, slice(2, 4), slice(2, 4)))
    assert result["class_scores"] == [0.5, 0.0] and result["leaks"] and "predicts the label" in result["verdict"]
    assert torch.allclose(result["maps"][0, 2:4, 2:4], torch.full((2, 2), 0.5))
    assert result["maps"][0].sum() == 4 * 0.5 and result["maps"][1].sum() == 0


def test_masks_that_ignore_the_label_leave_no_mark():
    data = two_classes()
    result = mask_leakage(data, region_masks(data.labels, slice(1, 5), slice(1, 5), only=None))
    assert result["score"] == 0.0


def brute_force(images, labels, masks, fill=0.0):
    n, _, h, w = images.shape
    classes = int(labels.max()) + 1
    scores = []
    maps = torch.zeros(classes, h, w, dtype=torch.float64)
    for c in range(classes):
        own, rest = (labels == c).nonzero().flatten().tolist(), (labels != c).nonzero().flatten().tolist()
        covered = total = 0.0
        for y in range(h):
            for x in range(w):
                def share(indices, masked):
                    hits = [bool((images[i, :, y, x] == fill).all()) or (masked and bool(masks[i, y, x]))
                            for i in indices]
                    return sum(hits) / max(len(hits), 1)
                excess = max(0.0, share(own, True) - share(rest, True)) - max(0.0, share(own, False) - share(rest, False))
                maps[c, y, x] = max(0.0, excess)
                count = sum(bool(masks[i, y, x]) for i in own)
                covered += count * maps[c, y, x].item()
                total += count
        scores.append(covered / max(total, 1))
    return scores, maps


def test_agrees_with_a_brute_force_reference():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(30, 3, 5, 5, generator=g) < 0.4).to(torch.uint8) * 255
    labels = torch.randint(0, 3, (30,), generator=g)
    masks = torch.rand(30, 5, 5, generator=g) < 0.3 + 0.4 * (labels == 1)[:, None, None]
    result = mask_leakage(ImageDataset(images, labels), masks, batch_size=7)
    scores, maps = brute_force(images.float() / 255, labels, masks)
    assert torch.allclose(torch.tensor(result["class_scores"], dtype=torch.float64), torch.tensor(scores, dtype=torch.float64))
    assert torch.allclose(result["maps"].double(), maps, atol=1e-6) and maps.sum() > 0


def test_mask_diagnostics_report_the_leakage_in_percent():
    data = two_classes()
    masks = region_masks(data.labels, slice(2, 4), slice(2, 4))
    assert mask_diagnostics(masks, dataset=data)["leakage_percent"] == 50.0
    assert "leakage_percent" not in mask_diagnostics(masks)
    assert MARK_THRESHOLD <= 0.5
