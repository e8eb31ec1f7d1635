"""The device contract: every function that computes puts the model, and every batch, on the device
it is given, itself. Tested on the CPU: with the ``meta`` device where the function can run there,
else by recording where the model was asked to go before its first forward pass."""

import pytest
import torch
from torch import nn

from masktune import (MaskSet, TrainSettings, compute_masks, finetune, masktune_finetune, predict, resolve_cam_layer,
                      saliency_maps, train_erm)
from masktune.data import ImageDataset
from masktune.models import model_device, place


class Tracked(nn.Module):
    """A small CNN that records each device it is moved to, and the device of its parameters and of
    its input at every forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
        self.moves: list[torch.device] = []
        self.forwards: list[tuple[torch.device, torch.device]] = []

    def to(self, *args, **kwargs):
        self.moves.append(torch._C._nn._parse_to(*args, **kwargs)[0])
        return super().to(*args, **kwargs)

    def forward(self, x):
        if isinstance(x, torch.Tensor):  # not while torch.fx traces it
            self.forwards.append((x.device, self.head[1].weight.device))
        return self.head(self.features(x))


def images(n=16):
    g = torch.Generator().manual_seed(0)
    return ImageDataset(torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 2)


def test_place_moves_the_model_and_returns_its_device():
    model = nn.Linear(2, 2)
    assert place(model) == torch.device("cpu")
    assert place(model, "meta") == torch.device("meta") and model.weight.device.type == "meta"
    assert model_device(model).type == "meta" and model_device(nn.ReLU()) == torch.device("cpu")


def test_cam_layer_lookup_and_saliency_run_on_the_device_given():
    model = Tracked()
    assert resolve_cam_layer(model, None, torch.rand(1, 3, 8, 8), device="meta")[0] == "features.2"
    assert model_device(model).type == "meta"
    model = Tracked()
    heat, targets = saliency_maps(model, torch.rand(2, 3, 8, 8), model.features[2], device="meta")
    assert heat.device.type == "meta" and targets.device.type == "meta" and model_device(model).type == "meta"
    assert all(x == weights == torch.device("meta") for x, weights in model.forwards)


@pytest.mark.parametrize("name", ["predict", "train_erm", "finetune", "masktune_finetune", "compute_masks"])
def test_each_function_puts_the_model_on_the_device_before_computing(name):
    model, data, cpu = Tracked(), images(), torch.device("cpu")
    settings = TrainSettings(batch_size=8, device=cpu, progress=False)
    masks = MaskSet.from_bool(torch.zeros(16, 8, 8, dtype=torch.bool))
    calls = {
        "predict": lambda: predict(model, data, device=cpu),
        "train_erm": lambda: train_erm(model, data, data, settings, epochs=1),
        "finetune": lambda: finetune(model, data, settings),
        "masktune_finetune": lambda: masktune_finetune(model, data, masks, settings),
        "compute_masks": lambda: compute_masks(model, data, device=cpu, progress=False),
    }
    calls[name]()
    assert model.moves and model.moves[0] == cpu  # asked to move before anything ran
    assert model.forwards and all(x == weights == cpu for x, weights in model.forwards)
