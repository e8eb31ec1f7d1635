"""The mask-leakage statistic against hand-built cases and a brute-force reference, and the ways of
applying masks (fills, mixing) against references, aligned under augmentation."""

import pytest
import torch

from masktune import ImageDataset, MaskedDataset, TrainSettings, finetune, mask_diagnostics
from masktune.data import EpochBatches
from masktune.data.loader import to_device
from masktune.errors import ConfigError
from masktune.evaluation import mask_leakage
from masktune.evaluation.leakage import MARK_THRESHOLD, leakage_percent
from masktune.training import _epoch_seed


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


def fill_case(n=12, size=5):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    masks = torch.rand(n, size, size, generator=g) < 0.4
    return ImageDataset(images, labels), masks


def test_mean_fill_puts_the_per_pixel_mean_on_masked_pixels():
    data, masks = fill_case()
    images = data.images.float() / 255
    mean = images.mean(0)
    masked = MaskedDataset(data, masks, fill="mean")
    batch = masked.__getitems__(list(range(12)))[0]
    assert torch.allclose(batch, torch.where(masks[:, None], mean, images), atol=1e-6)
    assert torch.allclose(masked[4][0], torch.where(masks[4][None], mean, images[4]), atol=1e-6)


def test_random_image_fill_takes_the_pixels_of_a_random_training_image():
    data, masks = fill_case()
    masked = MaskedDataset(data, masks, fill="random-image")
    torch.manual_seed(7)
    batch = masked.__getitems__([0, 5, 9])[0]
    torch.manual_seed(7)
    donors = torch.randint(12, (3,))
    images = data.images.float() / 255
    assert torch.equal(batch, torch.where(masks[[0, 5, 9], None], images[donors], images[[0, 5, 9]]))


def test_other_class_mixing_adds_the_mask_of_an_image_of_another_class():
    data, masks = fill_case()
    masked = MaskedDataset(data, masks, mixing="own+other-class")
    torch.manual_seed(0)
    applied = masked.applied_masks(list(range(12)))
    for i in range(12):
        partners = [j for j in range(12) if data.labels[j] != data.labels[i]]
        assert any(torch.equal(applied[i], masks[i] | masks[j]) for j in partners)
    batch = masked.__getitems__([2])[0]
    assert ((batch == 0).all(1) >= masks[2]).all()  # at least its own mask


def test_each_fill_is_applied_before_the_batch_augmentation():
    data, masks = fill_case()
    for fill in (0.0, "mean", "random-image"):
        seen = []
        masked = MaskedDataset(data, masks, fill=fill)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(75, 3))
        torch.manual_seed(1)
        finetune(model, masked, TrainSettings(batch_size=12, progress=False, augment=lambda b: seen.append(b) or b))
        torch.manual_seed(1)
        order = list(EpochBatches(12, 12, seed=_epoch_seed(0, 0, finetune=True)))[0]
        reference = to_device(masked.__getitems__(order)[0], "cpu")
        assert torch.equal(seen[0], reference), fill


def test_leakage_of_each_fill_as_applied():
    data = two_classes()
    masks = region_masks(data.labels, slice(2, 4), slice(2, 4))
    assert leakage_percent(MaskedDataset(data, masks)) == 50.0
    assert leakage_percent(MaskedDataset(data, masks, fill="mean")) == 100.0  # a grey no other image shows
    assert leakage_percent(MaskedDataset(data, masks, fill="random-image")) is None  # no fill value to look for
    torch.manual_seed(0)
    assert leakage_percent(MaskedDataset(data, masks, mixing="own+other-class")) < 50.0


def test_heat_share_rule_takes_the_hottest_pixels_holding_the_share():
    from masktune import make_rule

    heat = torch.tensor([[[0.5, 0.25], [0.25, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    assert make_rule("heat-share", 50)(heat)[0].tolist() == [[True, False], [False, False]]
    assert make_rule("heat-share", 60)(heat)[0].tolist() == [[True, True], [False, False]]  # the crossing one too
    assert make_rule("heat-share", 100)(heat)[0].tolist() == [[True, True], [True, False]]  # never zero heat
    assert not make_rule("heat-share", 100)(heat)[1].any()
    big = torch.zeros(1, 4, 4)
    big[0, :3, :3] = 1.0  # heat spread evenly over 9 pixels: half of it needs 5 of them
    assert make_rule("heat-share", 50)(big).sum() == 5


def test_heat_removed_is_the_share_of_the_heat_the_masks_cover():
    from masktune import saliency_maps
    from masktune.evaluation.diagnostics import heat_removed

    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(20) % 2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2)).eval()
    masks = torch.rand(20, 8, 8, generator=g) < 0.3
    heat, _ = saliency_maps(model, data.images.float() / 255, model[1])
    expected = 100 * ((heat * masks).sum((1, 2)) / heat.sum((1, 2))).mean().item()
    assert abs(heat_removed(model, data, masks, "1", batch_size=7) - expected) < 1e-4
    assert abs(heat_removed(model, data, masks, "1", limit=5) - 100 * ((heat[:5] * masks[:5]).sum((1, 2))
                                                                        / heat[:5].sum((1, 2))).mean().item()) < 1e-4


def test_a_low_heat_share_is_said_in_the_printed_table():
    from masktune.report import results_table

    results = {"accuracy": {"masktune": {"test": {"accuracy": 50.0}}},
               "masking": {"masktune": {"masked_percent": 4.0, "heat_removed_percent": 11.8, "leakage_percent": 1.0}}}
    table = results_table(results)
    assert "cover only 12% of the ERM model's heat" in table and "large or diffuse cue" in table
    results["masking"]["masktune"]["heat_removed_percent"] = 30.7
    assert "heat:" not in results_table(results) and "cover only" not in results_table(results)


def test_guarded_mixing_mixes_only_where_the_own_masks_leave_a_mark():
    from masktune.evaluation.leakage import guarded_mixing

    data = two_classes()
    assert guarded_mixing(data, region_masks(data.labels, slice(2, 4), slice(2, 4))) == "own+other-class"  # 50%
    assert guarded_mixing(data, region_masks(data.labels, slice(0, 2), slice(0, 2))) == "own"  # shared background
    assert guarded_mixing(data, region_masks(data.labels, slice(2, 4), slice(2, 4)), "random-image") == "own"


def test_the_guarded_recipe_finetunes_as_the_mixing_it_chose(tiny_run, tmp_path, monkeypatch):
    from masktune.cli import main
    from masktune.pipeline.config import RECIPES
    from masktune.report import results_table
    from masktune.storage import load_torch, read_json

    monkeypatch.setenv("MASKTUNE_HOME", str(tiny_run.home))
    assert main(tiny_run.args(tmp_path / "guarded", "--recipe", "guarded", "--position", "centre",
                              "--methods", "erm,masktune", "--no-report")) == 0
    results = read_json(tmp_path / "guarded" / "results.json")
    chosen, masking = results["guarded_mixing"], results["masking"]["masktune"]
    own = masking.get("own_leakage_percent", masking["leakage_percent"])
    assert chosen == ("own+other-class" if own >= 100 * MARK_THRESHOLD else "own")
    assert results["config"]["mask_mixing"] == "guarded" and "guarded recipe" in results_table(results)
    assert main(tiny_run.args(tmp_path / "explicit", "--mask-mixing", chosen, "--position", "centre",
                              "--methods", "erm,masktune", "--no-report")) == 0
    weights = [load_torch(tmp_path / run / "checkpoints" / "masktune.pt")["model"] for run in ("guarded", "explicit")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert RECIPES["paper"]["mask_mixing"] == "own" and RECIPES["guarded"]["mask_mixing"] == "guarded"


def test_explicit_settings_override_a_recipe_and_the_paper_recipe_is_the_default():
    from masktune import make_config
    from masktune.pipeline.config import recipe_settings

    assert make_config("biased-mnist", recipe_settings("paper")) == make_config("biased-mnist")
    assert make_config("biased-mnist", recipe_settings("guarded") | {"mask_mixing": "own"}) == make_config("biased-mnist")
    assert make_config("biased-mnist", recipe_settings("guarded")).mask_mixing == "guarded"


def test_the_table_and_the_report_say_what_the_guarded_recipe_chose():
    from masktune.report import results_table
    from masktune.report.report import _leakage_verdicts

    runs = [{"masking": {"masktune": {"leakage_percent": 0.3, "own_leakage_percent": 41.0}},
             "guarded_mixing": "own+other-class"}]
    assert "own masks leave a mark that predicts the label (leakage 41.0%)" in _leakage_verdicts(runs)
    accuracy = {"accuracy": {"masktune": {"test": {"accuracy": 90.0}}}}
    assert "another class" in results_table(accuracy | runs[0])
    runs.append({"masking": {"masktune": {"leakage_percent": 2.0}}, "guarded_mixing": "own"})
    assert "a mark in 1 of 2 runs" in _leakage_verdicts(runs)
    assert "leave no mark (leakage 2.0%)" in results_table(accuracy | runs[1])


def test_a_sweep_can_compare_the_guarded_mixing_with_the_paper_recipe(tmp_path):
    from masktune.pipeline import sweep
    from masktune.pipeline.config import recipe_settings

    runs = sweep.plan("biased-mnist", [0], ["mask_mixing=own,guarded"], recipe_settings("paper"), tmp_path)
    assert [run.config.mask_mixing for run in runs] == ["own", "guarded"]
    with pytest.raises(ConfigError, match="unknown mask mixing 'other'.*guarded"):
        sweep.plan("biased-mnist", [0], ["mask_mixing=own,other"], {}, tmp_path)
    with pytest.raises(ConfigError, match="unknown recipe 'robust'; choose one of paper, guarded"):
        recipe_settings("robust")
