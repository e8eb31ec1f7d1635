import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torchvision import transforms

from masktune import (MaskedDataset, MaskSet, compute_masks, make_rule, masktune_finetune, random_square_masks,
                      threshold_masks, train_erm)
from masktune.masks import model_fingerprint
from masktune.data import BatchAugment, ImageDataset
from masktune.errors import MaskTuneError
from masktune.models import fold_batchnorm
from masktune.saliency import saliency_maps
from masktune.training import TrainSettings, finetune, make_optimizer


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


def test_masked_dataset_takes_a_mask_set():
    images = torch.rand(5, 3, 4, 6) + 0.5
    masks = torch.rand(5, 4, 6) < 0.4
    packed = MaskedDataset(Pairs(images, torch.arange(5)), MaskSet.from_bool(masks))
    plain = MaskedDataset(Pairs(images, torch.arange(5)), masks)
    for i in range(5):
        assert torch.equal(packed[i][0], plain[i][0])
        assert torch.equal(packed[i][0] == 0, masks[i].expand(3, -1, -1))


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
    assert small.shape == (10, 9, 11)
    assert torch.equal(small.unpack(), expected) and torch.equal(large.unpack(), expected)
    assert expected.any()
    assert small.meta == {"cam_method": "xgradcam", "layer": "1", "rule": "mean-std(k=2)",
                          "model_fingerprint": model_fingerprint(model)}


def test_compute_masks_with_other_method_rule_and_preprocessing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 7 * 9, 3))
    images = torch.rand(6, 3, 9, 11)
    heat, _ = saliency_maps(model, (images - 0.5) * 4, model[1], method="gradcam++")
    masks = compute_masks(model, Pairs(images, torch.zeros(6)), "1", method="Grad-CAM++",
                          rule=make_rule("threshold", 0.3), preprocess=lambda x: (x - 0.5) * 4, batch_size=4,
                          progress=False)
    assert torch.equal(masks.unpack(), heat > 0.3)
    assert masks.meta["cam_method"] == "gradcam++" and masks.meta["rule"] == "threshold(t=0.3)"


class ViewNet(nn.Module):
    """Flattens with ``view``, which fails on channels-last feature maps."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4 * 7 * 9, 3)

    def forward(self, x):
        x = self.conv(x).relu()
        return self.fc(x.view(len(x), -1))


def test_compute_masks_works_with_models_that_need_contiguous_maps():
    torch.manual_seed(0)
    model = ViewNet()
    images = torch.rand(6, 3, 9, 11)
    with pytest.raises(RuntimeError, match="view"):
        model(images.contiguous(memory_format=torch.channels_last))
    heat, _ = saliency_maps(model, images, model.conv)
    masks = compute_masks(model, Pairs(images, torch.zeros(6)), "conv", progress=False)
    assert torch.equal(masks.unpack(), threshold_masks(heat))


@pytest.mark.parametrize("p", [1, 5, 12.5, 100])
def test_top_percent_rule_brute_force(p):
    heat = torch.rand(4, 6, 7)
    heat[0] = 0  # no positive heat: nothing masked
    heat[1, :3] = 0  # only 21 positive pixels: never mask a zero
    heat[2] = heat[2].round(decimals=1)  # ties: the first in row-major order win
    masks = make_rule("top-percent", p)(heat)
    n = math.floor(p / 100 * 42 + 0.5)
    for image, mask in zip(heat, masks):
        ranked = sorted(range(42), key=lambda i: (-image.flatten()[i].item(), i))[:n]
        expected = torch.zeros(42, dtype=torch.bool)
        expected[[i for i in ranked if image.flatten()[i] > 0]] = True
        assert torch.equal(mask.flatten(), expected)


def test_rules_by_name_and_their_parameters():
    heat = torch.tensor([[[0.0, 0.2], [0.5, 0.9]]])
    assert make_rule("threshold", 0.5)(heat).flatten().tolist() == [False, False, False, True]
    assert make_rule("threshold")(heat).flatten().tolist() == [False, False, False, True]  # default t = 0.5
    assert torch.equal(make_rule("mean-std", 1)(heat), threshold_masks(heat, 1))
    assert repr(make_rule("mean-std")) == "mean-std(k=2)" and repr(make_rule("top-percent")) == "top-percent(p=5)"
    with pytest.raises(MaskTuneError, match="unknown mask rule 'otsu'"):
        make_rule("otsu")
    with pytest.raises(MaskTuneError, match="0 < p <= 100"):
        make_rule("top-percent", 0)
    with pytest.raises(MaskTuneError, match="0 <= t < 1"):
        make_rule("threshold", 1.5)


def patch_images(n=8, size=16, side=4, seed=0):
    """Grey images with a bright square at a random place, and masks covering exactly the squares."""
    g = torch.Generator().manual_seed(seed)
    images = torch.full((n, 3, size, size), 0.5)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, (r, c) in enumerate(torch.randint(0, size - side + 1, (n, 2), generator=g).tolist()):
        images[i, :, r : r + side, c : c + side] = 1.0
        masks[i, r : r + side, c : c + side] = True
    return images, masks


def test_random_crop_after_masking_keeps_masks_on_their_pixels():
    images, masks = patch_images()
    data = MaskedDataset(Pairs(images, torch.arange(8) % 2), MaskSet.from_bool(masks))
    crop, seen = BatchAugment(pad_crop=4), []

    def augment(batch):
        seen.append(crop(batch))
        return seen[-1]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 2))
    finetune(model, data, TrainSettings(batch_size=4, augment=augment, progress=False), epochs=5)
    assert len(seen) == 10
    for batch in seen:  # the augmentation runs on each training batch, after masking
        # the whole square is masked, wherever the shift moved it: grey, or zero (mask or padding)
        assert (((batch - 0.5).abs() < 1e-4) | (batch.abs() < 1e-4)).all()


def test_a_random_crop_before_masking_would_misalign_them():
    images, masks = patch_images()
    torch.manual_seed(0)
    crop = transforms.RandomCrop(16, padding=4)
    augmented = torch.stack([crop(image) for image in images])  # the augmentation inside the dataset
    data = MaskedDataset(Pairs(augmented, torch.arange(8)), masks)
    assert any((data[i][0] == 1.0).any() for i in range(8))


def test_authors_geometry_stretches_masks_over_the_raw_image_like_opencv():
    cv2 = pytest.importorskip("cv2")
    raw = ImageDataset(torch.randint(100, 256, (3, 3, 30, 41), dtype=torch.uint8), torch.arange(3))
    masks = torch.rand(3, 12, 12, generator=torch.Generator().manual_seed(0)) < 0.3
    data = MaskedDataset(raw, MaskSet.from_bool(masks), geometry="authors")
    batch, _ = data.__getitems__([0, 1, 2])
    for i in range(3):
        expected = cv2.resize(masks[i].numpy().astype(np.uint8), (41, 30), interpolation=cv2.INTER_NEAREST)
        assert np.array_equal((data[i][0] == 0).all(0).numpy(), expected.astype(bool))
        assert torch.equal(batch[i], data[i][0])
    with pytest.raises(MaskTuneError, match="unknown mask geometry"):
        MaskedDataset(raw, masks, geometry="centre")


def tiny_task(n=48):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 12, 12), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 2
    images[labels == 1, :, 2:6, 2:6] = 255
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 2))
    train = ImageDataset(images, labels)
    erm = train_erm(model, train, settings=TrainSettings(lr=0.05, batch_size=16, progress=False), epochs=1)
    return model, train, erm


@pytest.mark.parametrize("accumulate", [False, True])
def test_iterative_masktune_remasks_with_the_finetuned_model(accumulate):
    model, train, erm = tiny_task()
    first = compute_masks(model, train, "1", progress=False)
    settings = TrainSettings(lr=0.05, batch_size=16, progress=False)
    tuned = copy.deepcopy(model)
    result = masktune_finetune(tuned, train, first, settings, iterations=3, accumulate=accumulate, layer="1",
                               optimizer_state=erm.last.optimizer)

    reference = copy.deepcopy(model)  # the same steps, spelled out
    optimizer = make_optimizer(reference, settings, erm.last.optimizer)
    masks = first
    for iteration in range(3):
        if iteration:
            new = compute_masks(reference, MaskedDataset(train, masks) if accumulate else train, "1", progress=False)
            masks = MaskSet.from_bool(masks.unpack() | new.unpack()) if accumulate else new
        assert torch.equal(result.masks[iteration].unpack(), masks.unpack())
        finetune(reference, MaskedDataset(train, masks), TrainSettings(batch_size=16, seed=iteration, progress=False),
                 optimizer=optimizer, desc="masktune")
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), reference.state_dict().values()))
    assert [h["iteration"] for h in result.history] == [1, 2, 3]
    assert not torch.equal(result.masks[1].unpack(), first.unpack())  # the finetuned model looks elsewhere
    if accumulate:
        assert (result.masks[2].unpack() >= result.masks[1].unpack()).all()


def test_compute_masks_agrees_with_pytorch_grad_cam_and_the_authors_numpy_rule():
    pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
    from masktune import SmallCNN

    torch.manual_seed(0)
    model = SmallCNN(num_classes=2).eval()
    images = torch.rand(40, 3, 28, 28)
    ours = compute_masks(model, Pairs(images, torch.zeros(40)), batch_size=16, progress=False).unpack().numpy()
    heat = pytorch_grad_cam.XGradCAM(model=model, target_layers=[model.block4])(images, targets=None)
    positive = np.where(heat > 0, heat, np.nan)  # the authors' rule: NaN-masked mean and std
    tau = (np.nanmean(positive, axis=(1, 2)) + 2 * np.nanstd(positive, axis=(1, 2)))[:, None, None]
    theirs = heat > tau
    assert theirs.sum() > 100
    differ = ours != theirs
    assert differ.sum() <= 3 and np.all(np.abs(heat - tau)[differ] < 1e-5)  # only float rounding at the threshold


class Shared(nn.Module):
    """A conv-BN pair, a conv used twice, and data-dependent control flow when asked."""

    def __init__(self, branchy=False):
        super().__init__()
        self.branchy = branchy
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.twice, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))

    def forward(self, x):
        x = self.bn(self.conv(x)).relu()
        if self.branchy and x.sum() > 0:
            x = -x
        x = self.bn2(self.twice(self.twice(x)))
        return self.head(x)


def test_fold_batchnorm_folds_only_safe_pairs_and_keeps_outputs():
    torch.manual_seed(0)
    model = Shared()
    x = torch.rand(5, 3, 12, 10)
    model(x)
    model.train()
    for bn in (model.bn, model.bn2, model.head[1]):  # non-trivial running statistics
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    folded = fold_batchnorm(model, keep="head.0")
    assert model.training and isinstance(model.bn, nn.BatchNorm2d)  # the model itself is untouched
    assert isinstance(folded.bn, nn.Identity)  # conv -> bn: folded
    assert isinstance(folded.bn2, nn.BatchNorm2d)  # after a conv that runs twice: kept
    assert isinstance(folded.head[1], nn.BatchNorm2d)  # after the CAM layer's conv: kept
    with torch.no_grad():
        assert (folded(x) - model.eval()(x)).abs().max() < 1e-5
    branchy = Shared(branchy=True)
    assert fold_batchnorm(branchy) is branchy  # cannot be traced: used as it is
