import pytest
import torch
import torchvision
from torch import nn

from masktune import SmallCNN, resolve_cam_layer
from masktune.models import LayerError


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
    assert resolve_cam_layer(resnet, None, torch.rand(1, 3, 64, 64))[0] == "layer4"


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
