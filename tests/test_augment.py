import pytest
import torch

from masktune.data.augment import IMAGENET_EIGVAL, IMAGENET_EIGVEC, BatchAugment


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[r, c] = image[r + dy, c + dx], zero outside: RandomCrop with padding, by hand."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (w, w, h, h))
    return padded[:, h + dy: 2 * h + dy, w + dx: 2 * w + dx]


def test_pad_crop_is_a_whole_pixel_shift_with_zero_fill():
    torch.manual_seed(0)
    images = torch.rand(16, 3, 7, 9)
    out = BatchAugment(pad_crop=3)(images)
    seen = set()
    for image, result in zip(images, out):
        matches = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                   if torch.allclose(shifted(image, dy, dx), result, atol=1e-5)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 8  # shifts differ between the images of a batch


def test_flip_mirrors_about_half_of_the_images():
    torch.manual_seed(1)
    images = torch.rand(64, 3, 5, 6)
    out = BatchAugment(flip=True)(images)
    flipped = [torch.allclose(o, i.flip(-1), atol=1e-5) for o, i in zip(out, images)]
    kept = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))
    assert 20 < sum(flipped) < 44


def test_full_crop_is_identity_and_a_half_crop_zooms_in():
    torch.manual_seed(2)
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(BatchAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))(images), images, atol=1e-5)
    # a crop of a quarter of the area (half the side) of a left/right two-colour image shows more of
    # one colour: the edge moves out of the centre or leaves the crop entirely
    two_tone = torch.zeros(32, 1, 8, 8)
    two_tone[..., 4:] = 1
    out = BatchAugment(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0))(two_tone)
    assert out.shape == two_tone.shape
    assert ((out.mean((1, 2, 3)) - 0.5).abs() > 0.1).float().mean() > 0.5


def test_rotation_keeps_the_centre_and_zero_fills_corners():
    torch.manual_seed(3)
    images = torch.ones(8, 3, 9, 9)
    out = BatchAugment(degrees=45)(images)
    assert torch.allclose(out[:, :, 4, 4], torch.ones(8, 3))
    assert (out[:, :, 0, 0] < 1).float().mean() > 0.5  # corners rotate out of the image for most angles


def test_colour_jitter_stays_in_range_and_lighting_adds_a_pca_offset():
    torch.manual_seed(4)
    images = torch.rand(6, 3, 5, 5)
    jittered = BatchAugment(jitter=0.4)(images)
    assert jittered.min() >= 0 and jittered.max() <= 1 and not torch.allclose(jittered, images)
    grey = images.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    assert torch.allclose(BatchAugment(jitter=0.0)(grey), grey)
    lit = BatchAugment(lighting=0.1)(images)
    offset = lit - images
    assert torch.allclose(offset, offset[..., :1, :1].expand_as(offset), atol=1e-6)  # one RGB offset per image
    eigvec = torch.tensor(IMAGENET_EIGVEC)
    alpha = torch.linalg.solve(eigvec, offset[:, :, 0, 0].T).T / torch.tensor(IMAGENET_EIGVAL)
    assert alpha.abs().max() < 0.6  # alpha ~ N(0, 0.1): the offset lies along the scaled eigenvectors


def test_seeded_augmentation_is_reproducible():
    augment = BatchAugment(crop_scale=(0.08, 1.0), flip=True, jitter=0.1, lighting=0.05)
    images = torch.rand(4, 3, 16, 16)
    torch.manual_seed(5)
    a = augment(images)
    torch.manual_seed(5)
    assert torch.equal(a, augment(images))


@pytest.mark.parametrize("augment", [BatchAugment(flip=True, degrees=15, translate=0.1), BatchAugment(pad_crop=4)])
def test_masked_pixels_stay_masked_under_shifts_and_flips(augment):
    """Augmenting after masking moves the zeroed pixels with the image they belong to."""
    torch.manual_seed(6)
    images = torch.rand(8, 3, 12, 12) + 0.5
    masked = images.clone()
    masked[..., 2:6, 3:7] = 0
    torch.manual_seed(7)
    out_masked = augment(masked)
    torch.manual_seed(7)
    out_images = augment(images)
    zero_region = torch.zeros_like(images[:, :1])
    zero_region[..., 2:6, 3:7] = 1
    torch.manual_seed(7)
    moved_region = augment(zero_region.expand(-1, 3, -1, -1))[:, :1]
    inside = moved_region > 0.999
    assert inside.any()
    assert out_masked.masked_select(inside.expand_as(out_masked)).abs().max() < 1e-5
    outside = moved_region < 1e-6
    assert torch.allclose(out_masked.masked_select(outside.expand_as(out_masked)),
                          out_images.masked_select(outside.expand_as(out_images)), atol=1e-5)
