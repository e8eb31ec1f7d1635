import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from masktune import saliency_maps
from masktune.errors import MaskTuneError
from masktune.errors import CAMMethodError
from masktune.saliency import METHODS, GradCAMPlusPlus, LibraryCAM, get_method

pytorch_grad_cam = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

REFERENCE = {
    "xgradcam": pytorch_grad_cam.XGradCAM,
    "gradcam": pytorch_grad_cam.GradCAM,
    "gradcam++": pytorch_grad_cam.GradCAMPlusPlus,
    "hirescam": pytorch_grad_cam.HiResCAM,
    "layercam": pytorch_grad_cam.LayerCAM,
}


def small_model() -> nn.Module:
    # no global pooling, so every spatial cell gets its own gradient
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2), nn.ReLU(inplace=True),
        nn.Flatten(), nn.Linear(6 * 8 * 11, 4),
    )


def test_every_native_method_is_checked():
    assert set(METHODS) == set(REFERENCE)


@pytest.mark.parametrize("name", sorted(REFERENCE))
@pytest.mark.parametrize("given_targets", [False, True])
def test_native_methods_match_pytorch_grad_cam(name, given_targets):
    model = small_model()
    x = torch.randn(5, 3, 20, 26)  # non-square
    targets = torch.tensor([0, 1, 2, 3, 0]) if given_targets else None
    ours, used = saliency_maps(model, x, model[4], method=name, targets=targets)
    cam_targets = [ClassifierOutputTarget(int(t)) for t in targets] if given_targets else None
    reference = REFERENCE[name](model=model, target_layers=[model[4]])(x, targets=cam_targets)
    assert ours.shape == (5, 20, 26)
    assert np.abs(ours.numpy() - reference).max() < 1e-5
    assert (ours.amax((1, 2)) > 0.99).sum() >= 3  # not a degenerate all-zero comparison
    if not given_targets:
        assert torch.equal(used, model(x).argmax(1))


def test_method_names_are_forgiving():
    assert isinstance(get_method("Grad-CAM++"), GradCAMPlusPlus)
    assert get_method("gradcamplusplus").name == "gradcam++"
    assert isinstance(get_method("Score_CAM"), LibraryCAM)
    with pytest.raises(CAMMethodError, match=r"unknown CAM method 'nosuchcam'.*gradcam\+\+, .*scorecam.*xgradcam"):
        get_method("nosuchcam")


def post_process(maps: torch.Tensor, size) -> torch.Tensor:
    """pytorch-grad-cam's documented post-processing, written out: ReLU, min-max, bilinear resize, min-max."""
    def norm(m):
        m = m - m.amin((-2, -1), keepdim=True)
        return m / (m.amax((-2, -1), keepdim=True) + 1e-7)
    resized = F.interpolate(norm(maps.relu())[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return norm(resized.relu())


def layer_output(model, layer, x):
    store = []
    handle = layer.register_forward_hook(lambda _m, _i, out: store.append(out.detach().clone()))
    with torch.no_grad():
        logits = model.eval()(x)
    handle.remove()
    return store[0], logits


def test_scorecam_through_the_adapter_matches_its_definition():
    model = small_model()
    x = torch.randn(3, 3, 20, 26)
    ours, used = saliency_maps(model, x, model[4], method="scorecam")
    activations, logits = layer_output(model, model[4], x)
    assert torch.equal(used, logits.argmax(1))
    # ScoreCAM: each channel, upsampled (align_corners=True) and min-max normalised, masks the input;
    # the channel weights are the softmax of the target-class scores of those masked inputs.
    up = F.interpolate(activations, size=(20, 26), mode="bilinear", align_corners=True)
    low, high = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
    up = (up - low) / (high - low + 1e-8)
    with torch.no_grad():
        scores = torch.stack([model(x[b] * up[b][:, None])[:, used[b]] for b in range(3)])
    expected = post_process(torch.einsum("bk,bkhw->bhw", scores.softmax(1), activations), (20, 26))
    assert (ours - expected).abs().max() < 1e-5


def test_eigencam_through_the_adapter_matches_its_definition():
    model = small_model()
    x = torch.randn(3, 3, 20, 26)
    ours, _ = saliency_maps(model, x, model[4], method="EigenCAM")
    activations, _ = layer_output(model, model[4], x)
    projections = []
    for a in activations.numpy():  # first principal component of the centred pixel x channel matrix
        pixels = a.reshape(len(a), -1).T
        pixels = pixels - pixels.mean(0)
        projections.append((pixels @ np.linalg.svd(pixels)[2][0]).reshape(a.shape[1:]))
    expected = post_process(torch.from_numpy(np.float32(projections)), (20, 26))
    assert (ours - expected).abs().max() < 1e-5


def test_adapter_restores_model_state_and_gradients():
    model = small_model()
    model.train()
    loss = model(torch.randn(2, 3, 20, 26)).sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    saliency_maps(model, torch.randn(3, 3, 20, 26), model[4], method="gradcamelementwise")
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert not model[4]._forward_hooks


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)  # makes the import fail
    with pytest.raises(CAMMethodError, match=r"pytorch-grad-cam.*pip install 'masktune\[cam\]'"):
        get_method("scorecam")
    model = small_model()
    maps, _ = saliency_maps(model, torch.randn(2, 3, 20, 26), model[4], method="layercam")  # native: no extra
    assert maps.shape == (2, 20, 26)


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
