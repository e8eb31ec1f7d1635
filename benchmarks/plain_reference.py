"""Biased MNIST without masktune: an independent plain-PyTorch pipeline with the authors' mechanics.

A cross-check of the package's figures (README, "How close we come to the authors' figures"). It
shares nothing with masktune but the MNIST arrays: the dataset is built as the authors' code
builds it (images sorted by digit, squares on the first images of each class, a random 12,000
validation split), ERM keeps the best and last states, the masks come from pytorch-grad-cam's
``XGradCAM`` and the mean + 2 std rule in numpy, and the finetune continues the last state's SGD
optimizer for one epoch. Needs ``pip install -e ".[bench]"``.

    python benchmarks/plain_reference.py --seeds 0 1 2 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import XGradCAM
from torch import nn

from masktune.data import load_mnist


def biased(images: np.ndarray, digits: np.ndarray, ratio: float, square: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images in [0, 1] sorted by digit, labels digit >= 5; a red square on the first
    (1 - ratio) of class 0 and the first ratio of class 1."""
    order = np.concatenate([np.flatnonzero(digits == d) for d in range(10)])
    rgb = np.repeat(images[order][..., None], 3, axis=-1)
    labels = (digits[order] >= 5).astype(np.int64)
    if square:
        for cls, share in ((0, 1 - ratio), (1, ratio)):
            members = np.flatnonzero(labels == cls)
            rgb[members[: round(len(members) * share)], :4, :4] = (255, 0, 0)
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


class Net(nn.Module):
    """The paper's small CNN; its CAM layer is ``backbone[-3]``, the ReLU after the fourth conv."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()]

        self.backbone = nn.Sequential(*block(3, 16), *block(16, 16), nn.MaxPool2d(2), *block(16, 32),
                                      *block(32, 32), nn.MaxPool2d(2), nn.Flatten())
        self.linear = nn.Sequential(nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.backbone(x))


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    model.train()
    for batch in torch.randperm(len(x)).split(128):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100 * torch.cat([model(part).argmax(1) for part in x.split(1000)]).eq(y).float().mean().item()


def keep_masks(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel is kept, 0 where its XGradCAM heat exceeds mean + 2 std of the positive heat."""
    kept = []
    with XGradCAM(model=model, target_layers=[model.backbone[-3]]) as cam:
        for start in range(0, len(x), 128):
            heat = cam(input_tensor=x[start:start + 128], targets=None)
            positive = np.where(heat > 0, heat, np.nan)
            threshold = np.nanmean(positive, axis=(1, 2), keepdims=True) + 2 * np.nanstd(positive, axis=(1, 2), keepdims=True)
            kept.append(torch.from_numpy(np.where(heat > threshold, 0.0, 1.0)).float())
    return torch.cat(kept).unsqueeze(1)


def run(seed: int, arrays, epochs: int) -> dict[str, float]:
    torch.manual_seed(seed)
    x, y = biased(arrays.train_images, arrays.train_labels, 0.01)
    val = np.random.default_rng(seed).choice(len(x), 12000, replace=False)
    train = np.setdiff1d(np.arange(len(x)), val)
    tests = {"original": biased(arrays.test_images, arrays.test_labels, 1.0, square=False),
             "biased": biased(arrays.test_images, arrays.test_labels, 1.0)}
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    best_accuracy, best = -1.0, None
    for _ in range(epochs):
        train_epoch(model, optimizer, x[train], y[train])
        val_accuracy = accuracy(model, x[val], y[val])
        if val_accuracy > best_accuracy:
            best_accuracy, best = val_accuracy, copy.deepcopy(model.state_dict())
    last, last_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    model.load_state_dict(best)
    kept = keep_masks(model, x[train])
    model.load_state_dict(last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    optimizer.load_state_dict(last_optimizer)
    train_epoch(model, optimizer, x[train] * kept, y[train])
    return {**{name: accuracy(model, *test) for name, test in tests.items()},
            "masked_pixels_per_image": (1 - kept).sum((1, 2, 3)).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    arrays = load_mnist(None)
    results = []
    for seed in args.seeds:
        results.append(run(seed, arrays, args.epochs))
        print(f"seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[-1].items()), flush=True)
    for key in results[0]:
        values = [r[key] for r in results]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{key}: {statistics.mean(values):.2f} +- {spread:.2f} (se {spread / len(values) ** 0.5:.2f}, "
              f"{len(values)} seeds)")


if __name__ == "__main__":
    main()
