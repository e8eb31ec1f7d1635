from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from masktune import SmallCNN, resolve_cam_layer
from masktune.errors import LayerError


def test_small_cnn_shapes_and_cam_layer():
    model = SmallCNN()
    x = torch.rand(4, 3, 28, 28)
    assert model(x).shape == (4, 2)
    name, layer = resolve_cam_layer(model, None, x)
    assert name == "block4"
    shapes = []
    layer.register_forward_hook(lambda m, i, o: shapes.append(o.shape) and None)
    model(x)
    assert shapes == [(4, 32, 8, 8)]


def test_automatic_layer_is_last_spatial_non_pooling_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    assert resolve_cam_layer(model, None, torch.rand(1, 3, 10, 10))[0] == "1"
    resnet = torchvision.models.resnet18(num_classes=3)
    # the last residual block: its output is no single layer's (the block adds its shortcut)
    assert resolve_cam_layer(resnet, None, torch.rand(1, 3, 64, 64))[0] == "layer4.1"


def test_automatic_layer_is_a_leaf_never_a_pooled_output():
    conv = lambda: nn.Conv2d(3, 4, 3)  # noqa: E731
    head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.rand(1, 3, 10, 10)
    # a block ending in pooling: its output is pooled, so the ReLU inside it, not the block
    blocks = nn.Sequential(OrderedDict(features=nn.Sequential(conv(), nn.ReLU(), nn.MaxPool2d(2)), head=head))
    assert resolve_cam_layer(blocks, None, x)[0] == "features.1"
    # a parameter-free layer on a pooled map (dropout) is still pooled
    dropout = nn.Sequential(conv(), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout2d(0.1), head)
    assert resolve_cam_layer(dropout, None, x)[0] == "1"
    # an in-place ReLU returns its input tensor with new values: the ReLU, not the convolution before it
    inplace = nn.Sequential(OrderedDict(block=nn.Sequential(conv(), nn.ReLU(inplace=True)), pool=nn.MaxPool2d(2),
                                        head=head))
    assert resolve_cam_layer(inplace, None, x)[0] == "block.1"


def test_layer_given_as_name_or_module():
    model = SmallCNN()
    x = torch.rand(1, 3, 28, 28)
    assert resolve_cam_layer(model, "block3.0", x)[0] == "block3.0"
    assert resolve_cam_layer(model, model.block2, x) == ("block2", model.block2)


def test_bad_layer_names_list_candidates():
    model = SmallCNN()
    x = torch.rand(1, 3, 28, 28)
    with pytest.raises(LayerError, match="no layer named 'block9'.*block4"):
        resolve_cam_layer(model, "block9", x)
    with pytest.raises(LayerError, match="does not produce a spatial.*block1"):
        resolve_cam_layer(model, "classifier.1", x)
    with pytest.raises(LayerError, match="not a submodule"):
        resolve_cam_layer(model, nn.ReLU(), x)
    with pytest.raises(LayerError, match="no layer with a spatial"):
        resolve_cam_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), None, torch.rand(1, 3, 2, 2))


def test_cifar_resnet32_size_shapes_and_cam_layer():
    from masktune.models import CifarResNet, resnet32

    model = resnet32(10)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 0.46  # He et al. 2016, table 6
    for size, cells in ((32, 8), (64, 16)):
        x = torch.rand(2, 3, size, size)
        assert model(x).shape == (2, 10)
        name, layer = resolve_cam_layer(model, None, x)
        assert name == "layer3.4"
        shapes = []
        handle = layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)) and None)
        model(x)
        handle.remove()
        assert shapes == [(2, 64, cells, cells)]
    assert CifarResNet(2, depth=8).cam_layer == "layer3.0"
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(2, depth=30)


def test_normalized_wrapper_feeds_the_model_normalised_pixels():
    from masktune.models import Normalized

    inner = nn.Conv2d(3, 2, 1)
    model = Normalized(inner, (0.5, 0.25, 0.0), (2.0, 1.0, 0.5))
    x = torch.rand(2, 3, 4, 4)
    reference = inner((x - torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 1.0, 0.5]).view(1, 3, 1, 1))
    assert torch.allclose(model(x), reference)
    assert set(model.state_dict()) == {"model.weight", "model.bias"}  # the statistics are not weights


def test_resnet50_without_pretrained_weights_and_its_cam_layer():
    from masktune.models import Normalized, resnet50

    torch.manual_seed(0)
    model = resnet50(3, pretrained=False)
    assert isinstance(model, Normalized) and model.model.fc.out_features == 3
    x = torch.rand(1, 3, 64, 64)  # layer4 is 2 x 2 here (1 x 1, no CAM, below 64 px)
    assert model.eval()(x).shape == (1, 3)
    assert resolve_cam_layer(model, None, x)[0] == "model.layer4.2"


def test_unloadable_resnet50_weights_explain_where_to_put_them(tmp_path, monkeypatch):
    from masktune.models import WeightsError, resnet50

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "resnet50-0676ba61.pth").write_bytes(b"not a checkpoint")  # a broken download
    with pytest.raises(WeightsError) as error:
        resnet50(2, pretrained=True)
    message = str(error.value)
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in message
    assert str(checkpoints / "resnet50-0676ba61.pth") in message and "--no-pretrained" in message
