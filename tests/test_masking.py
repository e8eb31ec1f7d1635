import math

import pytest
import torch

from masktune import MaskedDataset, compute_masks, random_square_masks, threshold_masks
from masktune.saliency import saliency_maps


def test_rule_hand_computed():
    # positive values 0.1, 0.2, 0.3, 0.9, 1.0: mean 0.5, population std sqrt(0.14) = 0.3742
    heat = torch.tensor([[[0.0, 0.1, 0.2], [0.3, 0.9, 1.0]]])
    assert not threshold_masks(heat, k=2).any()  # tau = 1.248
    expected = torch.tensor([[[False, False, False], [False, True, True]]])
    assert torch.equal(threshold_masks(heat, k=1), expected)  # tau = 0.874
    assert torch.equal(threshold_masks(heat, k=0), expected)  # tau = 0.5
    # k = -1: tau = 0.1258, so 0.2 and above; the zero pixel is never counted or masked
    assert threshold_masks(heat, k=-1).flatten().tolist() == [False, False, True, True, True, True]


def test_rule_single_hot_pixel_default_k():
    heat = torch.full((1, 4, 4), 0.1)
    heat[0, 2, 3] = 1.0
    # mean 0.15625, std 0.2179: tau 0.5920, so only the hot pixel
    mask = threshold_masks(heat)
    assert mask.sum() == 1 and mask[0, 2, 3]


def test_rule_all_zero_and_constant_maps_mask_nothing():
    assert not threshold_masks(torch.zeros(2, 5, 7)).any()
    assert not threshold_masks(torch.full((1, 3, 3), 0.5), k=0).any()  # heat == tau is not masked


def test_rule_ties_at_threshold_are_kept():
    # positives 0.25 and 0.75 (exact in binary): mean 0.5, std 0.25
    heat = torch.tensor([[[0.25, 0.75], [0.0, 0.0]]])
    assert not threshold_masks(heat, k=1).any()  # tau = 0.75 exactly
    assert threshold_masks(heat, k=-1).flatten().tolist() == [False, True, False, False]  # tau = 0.25


def test_rule_is_per_image():
    a = torch.tensor([[0.0, 0.1], [0.1, 1.0]])
    batch = torch.stack([a, torch.zeros(2, 2), a * 3])
    masks = threshold_masks(batch, k=1)
    assert torch.equal(masks[0], masks[2]) and not masks[1].any()
    brute = []
    for image in batch:
        values = image[image > 0]
        if len(values) == 0:
            brute.append(torch.zeros_like(image, dtype=torch.bool))
            continue
        mean = values.sum().item() / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values.tolist()) / len(values))
        brute.append(image > mean + std)
    assert torch.equal(masks, torch.stack(brute))


def test_random_square_masks_shapes_and_sides():
    g = torch.Generator().manual_seed(0)
    masks = random_square_masks(2000, 28, 28, generator=g)
    assert masks.shape == (2000, 28, 28)
    rows = masks.any(2)
    cols = masks.any(1)
    heights, widths = rows.sum(1), cols.sum(1)
    # each mask is exactly the rectangle spanned by its rows and columns
    assert torch.equal(masks, rows[:, :, None] & cols[:, None, :])
    assert (heights >= 1).all() and (heights <= 14).all() and (widths <= 14).all()
    inside = ~rows[:, 0] & ~rows[:, -1] & ~cols[:, 0] & ~cols[:, -1]  # not clipped
    assert torch.equal(heights[inside], widths[inside])
    assert set(heights[inside].tolist()) == set(range(2, 15))
    again = random_square_masks(2000, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(masks, again)


class Pairs(torch.utils.data.Dataset):
    """A plain user dataset without a batched fast path."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def test_masked_dataset_zeroes_every_channel_and_keeps_the_rest():
    images = torch.rand(4, 3, 5, 6) + 0.5
    masks = torch.zeros(4, 5, 6, dtype=torch.bool)
    masks[1, 2, 3] = masks[1, 0, 0] = True
    data = MaskedDataset(Pairs(images, torch.arange(4)), masks)
    image, label = data[1]
    assert label == 1
    assert (image[:, 2, 3] == 0).all() and (image[:, 0, 0] == 0).all()
    keep = ~masks[1]
    assert torch.equal(image[:, keep], images[1][:, keep])
    assert torch.equal(data[0][0], images[0])
    batch = data.__getitems__([1, 3])
    assert torch.equal(batch[0][0], image)
    shifted = MaskedDataset(Pairs(images, torch.arange(4)), masks, transform=lambda x: x - 1)
    assert (shifted[1][0][:, 2, 3] == -1).all()  # the transform runs after masking


def test_masked_dataset_refuses_mismatches():
    images = torch.rand(4, 3, 5, 6)
    with pytest.raises(ValueError, match="4 images"):
        MaskedDataset(Pairs(images, torch.arange(4)), torch.zeros(3, 5, 6, dtype=torch.bool))
    data = MaskedDataset(Pairs(images, torch.arange(4)), torch.zeros(4, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="geometry"):
        data[0]


def test_compute_masks_matches_whole_batch_rule_and_is_batch_size_independent():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 7 * 9, 3))
    images = torch.rand(10, 3, 9, 11)
    dataset = Pairs(images, torch.zeros(10, dtype=torch.long))
    heat, _ = saliency_maps(model, images, model[1])
    expected = threshold_masks(heat)
    small = compute_masks(model, dataset, "1", batch_size=3, progress=False)
    large = compute_masks(model, dataset, "1", batch_size=10, progress=False)
    assert small.shape == (10, 9, 11) and small.dtype == torch.bool
    assert torch.equal(small, expected) and torch.equal(large, expected)
    assert expected.any()
