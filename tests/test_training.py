import copy

import pytest
import torch
from torch import nn

from masktune import TrainSettings, finetune, predict, train_erm
from masktune.errors import TrainingError
from masktune.storage import load_torch


class Bright(torch.utils.data.Dataset):
    """Label 1 when the left half is brighter than the right half: learnable in a few steps."""

    def __init__(self, n: int, seed: int = 0, nan: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 2, (n,), generator=g)
        self.images = torch.rand(n, 1, 6, 6, generator=g)
        self.images[self.labels == 1, :, :, :3] += 1
        self.images[self.labels == 0, :, :, 3:] += 1
        if nan:
            self.images[0, 0, 0, 0] = float("nan")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


def test_erm_learns_keeps_best_and_last_and_is_deterministic(tmp_path):
    train, val = Bright(256), Bright(128, seed=1)
    runs = []
    for _ in range(2):
        model = tiny_model()
        result = train_erm(model, train, val, TrainSettings(lr=0.05, batch_size=32, progress=False), epochs=4,
                           checkpoint_dir=tmp_path)
        runs.append(result)
    a, b = runs
    assert [h["val_accuracy"] for h in a.history] == [h["val_accuracy"] for h in b.history]
    assert all(torch.equal(a.last.model[k], b.last.model[k]) for k in a.last.model)
    assert a.history[-1]["val_accuracy"] > 80
    best = max(a.history, key=lambda h: h["val_accuracy"])
    assert a.best.val_accuracy == best["val_accuracy"] and a.best.epoch == a.history.index(best) + 1
    assert a.last.epoch == 4
    saved = load_torch(tmp_path / "erm_last.pt")
    assert saved["epoch"] == 4 and all(torch.equal(saved["model"][k], a.last.model[k]) for k in a.last.model)
    assert load_torch(tmp_path / "erm_best.pt")["epoch"] == a.best.epoch


def test_finetune_continues_the_optimizer_with_the_given_lr():
    train = Bright(128)
    model = tiny_model()
    erm = train_erm(model, train, settings=TrainSettings(lr=0.05, batch_size=32, progress=False), epochs=1)
    frozen = tiny_model()
    frozen.load_state_dict(erm.last.model)
    finetune(frozen, train, TrainSettings(lr=0.0, progress=False), optimizer_state=erm.last.optimizer)
    # lr 0 (weight decay and momentum scale with lr too): nothing moves
    assert all(torch.equal(frozen.state_dict()[k], erm.last.model[k]) for k in erm.last.model if "weight" in k)
    with_state, fresh = tiny_model(), tiny_model()
    for model, state in ((with_state, erm.last.optimizer), (fresh, None)):
        model.load_state_dict(erm.last.model)
        finetune(model, train, TrainSettings(lr=0.05, batch_size=32, progress=False), optimizer_state=state)
    # the momentum buffers of the ERM optimizer change the first steps
    assert not torch.equal(with_state[0].weight, fresh[0].weight)
    again = tiny_model()
    again.load_state_dict(erm.last.model)
    finetune(again, train, TrainSettings(lr=0.05, batch_size=32, progress=False), optimizer_state=erm.last.optimizer)
    # finetuning did not change the checkpoint's optimizer state: a second finetune from it is the same
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), with_state.state_dict().values()))


def test_finetune_leaves_the_given_optimizer_state_untouched():
    train = Bright(64)
    settings = TrainSettings(lr=0.05, batch_size=16, progress=False)
    erm = train_erm(tiny_model(), train, settings=settings, epochs=1)
    before = copy.deepcopy(erm.last.optimizer)
    model = tiny_model()
    model.load_state_dict(erm.last.model)
    finetune(model, train, settings, optimizer_state=erm.last.optimizer)
    buffers = [(before["state"][i]["momentum_buffer"], erm.last.optimizer["state"][i]["momentum_buffer"])
               for i in before["state"]]
    assert buffers and all(torch.equal(a, b) for a, b in buffers)


def test_non_finite_loss_stops_training():
    with pytest.raises(TrainingError, match="lower the learning rate"):
        train_erm(tiny_model(), Bright(64, nan=True), settings=TrainSettings(batch_size=16, progress=False), epochs=1)


def test_predict_returns_logits_in_dataset_order_and_restores_mode():
    model = tiny_model()
    model.train()
    data = Bright(50)
    logits = predict(model, data, batch_size=7)
    assert model.training
    model.eval()
    assert torch.allclose(logits, model(data.images), atol=1e-6)


def test_augment_transforms_every_training_batch_and_adam_is_available():
    batches = []

    def mirror(images):
        batches.append(images.shape[0])
        return images.flip(-1)  # swaps which half is bright: the labels become the opposite rule

    model = tiny_model()
    train = Bright(64)
    settings = TrainSettings(lr=0.01, batch_size=16, progress=False, augment=mirror, optimizer="adam")
    train_erm(model, train, settings=settings, epochs=3)
    assert batches == [16] * 12  # every batch of every epoch
    # the model learnt the mirrored rule, so it is wrong on the unmirrored images
    assert (predict(model, train).argmax(1) == train.labels).float().mean() < 0.2


class TwoChannels(Bright):
    """Bright with its channel twice (with one channel, both layouts are the same strides)."""

    def __getitem__(self, i):
        image, label = super().__getitem__(i)
        return image.repeat(2, 1, 1), label


class Recorder(nn.Module):
    """A conv net recording whether each training batch came channels-last; with
    ``needs_contiguous`` it flattens with ``view``, which channels-last input breaks."""

    def __init__(self, needs_contiguous: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.fc = nn.Conv2d(2, 4, 3), nn.Linear(4 * 4 * 4, 2)
        self.needs_contiguous = needs_contiguous
        self.layouts = []

    def forward(self, x):
        if self.training:
            self.layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        x = self.conv(x).relu()
        return self.fc(x.view(len(x), -1) if self.needs_contiguous else x.flatten(1))


def test_training_feeds_channels_last_batches_only_to_models_that_accept_them():
    train, val = TwoChannels(64), TwoChannels(32, seed=1)
    for needs_contiguous in (False, True):
        model = Recorder(needs_contiguous)
        result = train_erm(model, train, val, TrainSettings(lr=0.05, batch_size=16, progress=False), epochs=2)
        assert model.layouts == [not needs_contiguous] * 8
        assert result.history[-1]["val_accuracy"] > 70
    with pytest.raises(RuntimeError, match="view"):
        model(train.images[:4].repeat(1, 2, 1, 1).contiguous(memory_format=torch.channels_last))
