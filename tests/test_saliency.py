import numpy as np
import pytest
import torch
from torch import nn

from masktune import saliency_maps
from masktune.errors import MaskTuneError

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402


def small_model() -> nn.Module:
    # no global pooling, so every spatial cell gets its own gradient
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(6 * 8 * 11, 4),
    )


@pytest.mark.parametrize("given_targets", [False, True])
def test_xgradcam_matches_pytorch_grad_cam(given_targets):
    model = small_model()
    x = torch.randn(5, 3, 20, 26)  # non-square
    targets = torch.tensor([0, 1, 2, 3, 0]) if given_targets else None
    ours, used = saliency_maps(model, x, model[4], targets=targets)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets] if given_targets else None
    reference = pytorch_grad_cam.XGradCAM(model=model, target_layers=[model[4]])(x, targets=cam_targets)
    assert ours.shape == (5, 20, 26)
    assert np.abs(ours.numpy() - reference).max() < 1e-5
    if not given_targets:
        assert torch.equal(used, model(x).argmax(1))


def test_model_modes_and_hooks_are_restored_even_on_error():
    model = small_model()
    model.train()
    model[1].eval()  # a mixed state must come back exactly
    modes = [m.training for m in model.modules()]
    saliency_maps(model, torch.randn(3, 3, 20, 26), model[4])
    assert [m.training for m in model.modules()] == modes
    assert not model[4]._forward_hooks
    with pytest.raises(RuntimeError):
        saliency_maps(model, torch.randn(3, 3, 20, 26), model[4], targets=torch.tensor([9, 9, 9]))
    assert [m.training for m in model.modules()] == modes
    assert not model[4]._forward_hooks
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients accumulated


def test_layer_that_never_runs_is_reported():
    model = small_model()
    with pytest.raises(MaskTuneError, match="did not run"):
        saliency_maps(model, torch.randn(3, 3, 20, 26), nn.ReLU())
