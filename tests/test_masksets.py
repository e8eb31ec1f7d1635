import numpy as np
import pytest
import torch
from torch import nn

from masktune import MaskSet
from masktune.masks import model_fingerprint
from masktune.errors import MaskSetError
from masktune.masks import pack_bits, unpack_bits


class Images(torch.utils.data.Dataset):
    def __init__(self, n, height, width):
        self.n, self.size = n, (height, width)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.zeros(3, *self.size), 0


def random_masks(n, height, width, seed=0):
    return torch.rand(n, height, width, generator=torch.Generator().manual_seed(seed)) < 0.3


@pytest.mark.parametrize("height, width", [(28, 28), (7, 9), (1, 3)])
def test_packing_matches_numpy_packbits_and_round_trips(height, width):
    masks = random_masks(6, height, width)
    packed = pack_bits(masks)
    expected = np.packbits(masks.reshape(6, -1).numpy(), axis=1)  # row-major, most significant bit first
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_bits(packed, height, width), masks)
    masks_set = MaskSet.from_bool(masks)
    assert masks_set.shape == (6, height, width)
    assert torch.equal(masks_set[4], masks[4])
    assert torch.equal(masks_set[[5, 0, 2]], masks[[5, 0, 2]])
    assert torch.equal(masks_set[torch.tensor([1, 3])], masks[[1, 3]])


def test_save_load_round_trips_exactly(tmp_path):
    masks = MaskSet.from_bool(random_masks(50, 13, 17), cam_method="gradcam", layer="block4", rule="mean-std(k=2)",
                              model_fingerprint="ab" * 32)
    masks.save(tmp_path / "m.pt")
    loaded = MaskSet.load(tmp_path / "m.pt")
    assert loaded == masks
    assert torch.equal(loaded.unpack(), masks.unpack())
    assert loaded.meta == {"cam_method": "gradcam", "layer": "block4", "rule": "mean-std(k=2)",
                           "model_fingerprint": "ab" * 32}


def test_a_10000_image_set_takes_at_most_1_05_bits_per_pixel(tmp_path):
    model = nn.Conv2d(3, 8, 3)
    masks = MaskSet.from_bool(random_masks(10_000, 28, 28), cam_method="xgradcam", layer="block4",
                              rule="mean-std(k=2)", model_fingerprint=model_fingerprint(model))
    masks.save(tmp_path / "m.pt")
    bits_per_pixel = (tmp_path / "m.pt").stat().st_size * 8 / (10_000 * 28 * 28)
    assert bits_per_pixel <= 1.05
    assert MaskSet.load(tmp_path / "m.pt") == masks


def test_fingerprint_sees_weights_and_buffers_not_identity():
    torch.manual_seed(0)
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert model_fingerprint(a) != model_fingerprint(b)
    b.load_state_dict(a.state_dict())
    assert model_fingerprint(a) == model_fingerprint(b)
    b[1].running_mean[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_mismatches_are_refused_with_the_reason(tmp_path):
    torch.manual_seed(0)
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    MaskSet.from_bool(random_masks(20, 8, 6), cam_method="xgradcam", model_fingerprint=model_fingerprint(model)).save(
        tmp_path / "m.pt")
    MaskSet.load(tmp_path / "m.pt", dataset=Images(20, 8, 6), model=model, expect={"cam_method": "xgradcam"})
    with pytest.raises(MaskSetError, match="holds 20 masks but the dataset has 21 images"):
        MaskSet.load(tmp_path / "m.pt", dataset=Images(21, 8, 6))
    with pytest.raises(MaskSetError, match="masks are 8 x 6 but the dataset's images are 6 x 8"):
        MaskSet.load(tmp_path / "m.pt", dataset=Images(20, 6, 8))
    with pytest.raises(MaskSetError, match="model whose weights differ"):
        MaskSet.load(tmp_path / "m.pt", model=other)
    with pytest.raises(MaskSetError, match="its cam_method is 'xgradcam', not 'gradcam'"):
        MaskSet.load(tmp_path / "m.pt", expect={"cam_method": "gradcam"})


def test_unreadable_files_are_explained(tmp_path):
    with pytest.raises(MaskSetError, match="does not exist"):
        MaskSet.load(tmp_path / "missing.pt")
    MaskSet.from_bool(random_masks(20, 8, 6)).save(tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(MaskSetError, match="damaged or not a mask set"):
        MaskSet.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(MaskSetError, match="not written by masktune"):
        MaskSet.load(tmp_path / "other.pt")


def test_union_is_the_pixelwise_or():
    a, b = random_masks(9, 5, 7, seed=1), random_masks(9, 5, 7, seed=2)
    union = MaskSet.from_bool(a) | MaskSet.from_bool(b, rule="new")
    assert torch.equal(union.unpack(), a | b)
    assert union.meta == {"rule": "new"}
    with pytest.raises(MaskSetError, match="shapes"):
        MaskSet.from_bool(a) | MaskSet.from_bool(a[:3])
