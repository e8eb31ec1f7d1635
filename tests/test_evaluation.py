import pytest
import torch

from masktune import group_metrics, mask_diagnostics


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
