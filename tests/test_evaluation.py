import pytest
import torch

from masktune import MaskSet, group_metrics, mask_diagnostics


def test_group_metrics_hand_computed():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    spurious = torch.tensor([1, 1, 0, 0, 0, 1, 0, 1], dtype=torch.bool)
    predictions = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1])
    result = group_metrics(predictions, labels, spurious)
    assert result["accuracy"] == pytest.approx(100 * 5 / 8)
    assert result["groups"] == {
        "y=0,spurious=0": {"accuracy": 0.0, "count": 1},
        "y=0,spurious=1": {"accuracy": pytest.approx(100 * 2 / 3), "count": 3},
        "y=1,spurious=0": {"accuracy": pytest.approx(100 * 2 / 3), "count": 3},
        "y=1,spurious=1": {"accuracy": 100.0, "count": 1},
    }
    assert result["worst_group_accuracy"] == 0.0


def test_group_metrics_leave_out_empty_groups():
    labels = torch.tensor([0, 1, 1])
    result = group_metrics(torch.tensor([0, 1, 0]), labels, torch.tensor([False, True, True]))
    assert set(result["groups"]) == {"y=0,spurious=0", "y=1,spurious=1"}
    assert result["worst_group_accuracy"] == pytest.approx(50.0)


def test_mask_diagnostics_hand_computed():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True
    masks[0, :2, :2] = True  # whole region
    masks[0, 3, 3] = True  # plus one outside
    masks[1, 0, 0] = True  # a quarter of the region
    masks[2, 2:, 2:] = True  # image without the feature: 4 pixels outside
    spurious = torch.tensor([True, True, False])
    result = mask_diagnostics(masks, spurious, region)
    assert result["masked_pixels_per_image"] == pytest.approx(10 / 3)
    assert result["masked_percent"] == pytest.approx(100 * 10 / 48)
    assert result["region_coverage_percent"] == pytest.approx(100 * (1 + 0.25) / 2)
    assert result["region_fully_covered_percent"] == pytest.approx(50.0)
    assert result["masked_inside_region_percent"] == pytest.approx(100 * 5 / 6)
    assert set(mask_diagnostics(masks)) == {"masked_percent", "masked_pixels_per_image"}
    assert mask_diagnostics(MaskSet.from_bool(masks), spurious, region) == result


def test_mask_diagnostics_of_a_mask_set_in_several_chunks_match_a_brute_force_count():
    generator = torch.Generator().manual_seed(0)
    masks = torch.rand(9000, 3, 5, generator=generator) > 0.7  # more images than one chunk of 4096
    spurious = torch.rand(9000, generator=generator) > 0.5
    region = torch.zeros(3, 5, dtype=torch.bool)
    region[0, :2] = True
    result = mask_diagnostics(MaskSet.from_bool(masks), spurious, region)
    masked = sum(int(m.sum()) for m in masks)
    carried = [m for m, s in zip(masks, spurious) if s]
    full = sum(bool(m[0, 0] and m[0, 1]) for m in carried)
    assert result["masked_pixels_per_image"] == pytest.approx(masked / 9000)
    assert result["region_fully_covered_percent"] == pytest.approx(100 * full / len(carried))


def test_mask_diagnostics_split_aligned_and_conflicting_images():
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[0, :2] = True
    masks = torch.zeros(6, 4, 4, dtype=torch.bool)
    masks[[0, 1, 3], 0, :2] = True  # whole region on two of three class-0 images and one class-1 image
    masks[2, 0, 0] = True  # half of it
    spurious = torch.tensor([True, True, True, True, True, False])
    labels = torch.tensor([0, 0, 0, 1, 1, 1])  # the feature comes mostly with class 0
    result = mask_diagnostics(masks, spurious, region, labels)
    assert result["region_fully_covered_percent"] == pytest.approx(100 * 3 / 5)
    assert result["aligned_region_fully_covered_percent"] == pytest.approx(100 * 2 / 3)
    assert result["conflicting_region_fully_covered_percent"] == pytest.approx(50.0)
    only_aligned = mask_diagnostics(masks[:3], spurious[:3], region, labels[:3])
    assert "conflicting_region_fully_covered_percent" not in only_aligned


def test_group_metrics_wilds_contract_weighted_average_and_empty_group():
    from masktune.evaluation import group_counts

    train_labels = torch.tensor([0] * 6 + [1] * 4)
    train_spurious = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    counts = group_counts(train_labels, {"spurious": train_spurious})
    assert counts == {"y=0,spurious=0": 5, "y=0,spurious=1": 1, "y=1,spurious=0": 1, "y=1,spurious=1": 3}
    # test set: group (y=1, spurious=0) is empty
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    metadata = {"spurious": torch.tensor([0, 0, 1, 1, 1, 1])}
    predictions = torch.tensor([0, 1, 0, 0, 1, 0])
    result = group_metrics(predictions, labels, metadata, train_group_counts=counts)
    assert result["accuracy"] == pytest.approx(100 * 4 / 6)  # plain test accuracy
    assert result["groups"] == {"y=0,spurious=0": {"accuracy": 50.0, "count": 2},
                                "y=0,spurious=1": {"accuracy": 100.0, "count": 2},
                                "y=1,spurious=1": {"accuracy": 50.0, "count": 2}}
    assert result["empty_groups"] == ["y=1,spurious=0"]
    assert result["worst_group_accuracy"] == 50.0
    assert result["train_weighted_accuracy"] is None  # undefined: a training group has no test samples
    # with one test sample of (y=1, spurious=0), predicted right: weights 5, 1, 1, 3 of 10 training images
    complete = group_metrics(torch.cat([predictions, torch.tensor([1])]), torch.cat([labels, torch.tensor([1])]),
                             {"spurious": torch.cat([metadata["spurious"], torch.tensor([0])])},
                             train_group_counts=counts)
    assert complete["empty_groups"] == []
    assert complete["train_weighted_accuracy"] == pytest.approx((5 * 50 + 1 * 100 + 1 * 100 + 3 * 50) / 10)
    assert group_metrics(predictions, labels, {})["accuracy"] == result["accuracy"]
    assert "groups" not in group_metrics(predictions, labels, {})


def test_group_names_sort_numerically_for_many_classes_and_attribute_values():
    labels = torch.tensor([10, 2, 2, 10])
    result = group_metrics(labels.clone(), labels, {"spurious": torch.tensor([3, 0, 12, 3])})
    assert list(result["groups"]) == ["y=2,spurious=0", "y=2,spurious=12", "y=10,spurious=3"]
    assert result["groups"]["y=10,spurious=3"] == {"accuracy": 100.0, "count": 2}


def test_bg_gap():
    from masktune.evaluation import bg_gap

    metrics = {"original": {"accuracy": 95.0}, "mixed_same": {"accuracy": 90.5}, "mixed_rand": {"accuracy": 80.25}}
    assert bg_gap(metrics) == {"bg_gap": pytest.approx(10.25)}


def test_evaluate_uses_dataset_metadata_and_training_groups():
    from torch import nn

    from masktune import evaluate
    from masktune.data import ImageDataset

    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    images[2:] = 255
    dataset = ImageDataset(images, torch.tensor([0, 1, 1, 1]), {"spurious": torch.tensor([0, 0, 1, 1])})

    class Bright(nn.Module):  # predicts 1 for bright images
        def forward(self, x):
            return torch.stack([0.5 - x.mean((1, 2, 3)), x.mean((1, 2, 3)) - 0.5], 1)

    result = evaluate(Bright(), {"t": dataset}, train_group_counts={"y=0,spurious=0": 1, "y=1,spurious=0": 3,
                                                                     "y=1,spurious=1": 1})["t"]
    assert result["groups"]["y=1,spurious=0"] == {"accuracy": 0.0, "count": 1}
    assert result["train_weighted_accuracy"] == pytest.approx((1 * 100 + 3 * 0 + 1 * 100) / 5)
