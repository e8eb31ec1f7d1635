import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from dataset_fixtures import (CATS_VS_DOGS_COUNTS, CELEBA_COUNTS, WATERBIRDS_COUNTS, colour,
                              write_cats_vs_dogs, write_celeba, write_cifar10, write_image, write_image_csv, write_in9l,
                              write_svhn, write_waterbirds)
from masktune.errors import DataError
from masktune.data import (ImageFiles, ImageView, holdout, load_cats_vs_dogs, load_celeba, load_cifar10, load_image_csv,
                           load_in9l, load_svhn, load_waterbirds, read_image)
from masktune.errors import CorruptImageError
from masktune.evaluation import group_counts


def counts_of(dataset) -> dict:
    return group_counts(dataset.labels, dataset.metadata)


def expected(counts: dict) -> dict:
    return {f"y={y},spurious={s}": n for (y, s), n in sorted(counts.items())}


def assert_images_match_labels(dataset, size, spurious=None):
    """Every fixture image decodes to its solid colour, which encodes its label (and attribute)."""
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.shape == (3, *size) and image.dtype == torch.float32
        s = int(dataset.metadata["spurious"][i]) if spurious is None else spurious
        want = torch.tensor(colour(label, s), dtype=torch.float32).view(3, 1, 1) / 255
        assert (image - want).abs().max() < 4 / 255, (i, label)


@pytest.mark.parametrize("size, resize, square_first", [
    ((8, 8), 10, False), ((6, 6), (9, 7), False), ((5, 5), (5, 5), True), ((7, 7), None, False)])
def test_read_image_matches_torchvision_transforms(tmp_path, size, resize, square_first):
    rng = np.random.default_rng(0)
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(path)
    steps = [T.CenterCrop(13)] if square_first else []
    steps += [T.Resize(resize, interpolation=T.InterpolationMode.BILINEAR)] if resize is not None else []
    reference = T.Compose([*steps, T.CenterCrop(size), T.PILToTensor()])(Image.open(path).convert("RGB"))
    ours = read_image(path, ImageView(size, resize, square_first))
    assert torch.equal(ours, reference.float() / 255)


def test_waterbirds_splits_groups_and_images(tmp_path):
    sets = load_waterbirds(write_waterbirds(tmp_path), image_size=8)
    assert list(sets) == ["train", "val", "test"]
    for split, dataset in sets.items():
        assert counts_of(dataset) == expected(WATERBIRDS_COUNTS[split])
        assert_images_match_labels(dataset, (8, 8))


def test_celeba_attributes_partitions_and_options(tmp_path):
    sets = load_celeba(write_celeba(tmp_path), image_size=6)
    for partition, split in enumerate(("train", "val", "test")):
        assert counts_of(sets[split]) == expected(CELEBA_COUNTS[partition])
    assert_images_match_labels(sets["train"], (6, 6))
    smiling = load_celeba(tmp_path, target="Smiling", spurious="Blond_Hair", image_size=6)["train"]
    ids = [int(p.rsplit("/", 1)[1][:6]) for p in smiling.paths]
    assert smiling.labels.tolist() == [i % 2 for i in ids]
    assert smiling.metadata["spurious"].tolist() == sets["train"].labels.bool().tolist()
    with pytest.raises(DataError, match="no attribute 'Blond'.*Blond_Hair, Male, Smiling"):
        load_celeba(tmp_path, target="Blond")


def test_celeba_kaggle_layout(tmp_path):
    sets = load_celeba(write_celeba(tmp_path, kaggle_layout=True), image_size=6)
    assert counts_of(sets["test"]) == expected(CELEBA_COUNTS[2])
    assert sets["test"][0][0].shape == (3, 6, 6)


def test_in9l_train_val_and_the_four_test_variants(tmp_path):
    sets = load_in9l(write_in9l(tmp_path), image_size=8)
    assert list(sets) == ["train", "val", "original", "mixed_same", "mixed_rand", "mixed_next"]
    for split, dataset in sets.items():
        per_class = 2 if split == "train" else 1
        assert torch.bincount(dataset.labels).tolist() == [per_class] * 9, split
        assert all(p.endswith((".png", ".JPEG")) for p in dataset.paths)
    assert_images_match_labels(sets["mixed_rand"], (8, 8), spurious=0)


def test_in9l_class_mismatch_and_missing_variant(tmp_path):
    write_in9l(tmp_path)
    (tmp_path / "val" / "09_extra").mkdir()
    with pytest.raises(DataError, match="class folders .*09_extra"):
        load_in9l(tmp_path)
    with pytest.raises(DataError, match="IN-9L mixed_tiny folder not found.*bg_challenge/mixed_tiny/val"):
        load_in9l(write_in9l(tmp_path / "b"), tests=("mixed_tiny",))


def test_cifar10_batches(tmp_path):
    sets = load_cifar10(write_cifar10(tmp_path))
    assert len(sets["train"]) == 50 and len(sets["test"]) == 10
    assert sets["train"].labels.tolist() == list(range(10)) * 5
    image, label = sets["test"][3]
    assert label == 3 and image.shape == (3, 32, 32)
    assert image[0].eq((40 + 60) / 255).all()
    assert image[1, :16].eq(200 / 255).all() and image[1, 16:].eq(0).all()


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"cos\nsystem\n(S'echo hacked'\ntR.")
    with pytest.raises(DataError, match="test_batch.*refusing to load os.system"):
        load_cifar10(tmp_path)


def test_svhn_mat_files(tmp_path):
    sets = load_svhn(write_svhn(tmp_path))
    assert sets["train"].labels.tolist() == list(range(10)) * 2  # 10 in the file is the digit 0
    image, label = sets["test"][0]
    assert label == 0 and image.shape == (3, 32, 32)
    assert image[0].eq(40 / 255).all() and image[1, :16].eq(200 / 255).all() and image[1, 16:].eq(0).all()


def test_cats_vs_dogs_class_folders(tmp_path):
    sets = load_cats_vs_dogs(write_cats_vs_dogs(tmp_path), image_size=8)
    for split, counts in CATS_VS_DOGS_COUNTS.items():
        assert torch.bincount(sets[split].labels).tolist() == list(counts.values())
    assert_images_match_labels(sets["test"], (8, 8), spurious=0)


def test_image_csv_generic_dataset(tmp_path):
    sets = load_image_csv(write_image_csv(tmp_path), image_size=8)
    assert list(sets) == ["train", "val", "test", "test_ood"]
    assert counts_of(sets["train"]) == {"y=0,spurious=0": 1, "y=0,spurious=1": 2, "y=1,spurious=0": 2,
                                        "y=1,spurious=1": 1}  # camel = 0, cow = 1 (sorted names)
    assert counts_of(sets["test_ood"]) == {"y=0,spurious=0": 1, "y=1,spurious=1": 1}
    assert_images_match_labels(sets["test"], (8, 8))
    without_groups = load_image_csv(tmp_path, spurious_column="place", image_size=8)
    assert without_groups["train"].metadata == {}
    with pytest.raises(DataError, match="lacks the column.*file.*columns: path, label, split, spurious"):
        load_image_csv(tmp_path, path_column="file")


def test_holdout_is_seeded_and_disjoint(tmp_path):
    train = load_cats_vs_dogs(write_cats_vs_dogs(tmp_path), image_size=8)["train"]
    rest, held = holdout(train, 0.2, seed=3)
    assert len(held) == 2 and len(rest) == 8
    assert sorted(rest.paths + held.paths) == sorted(train.paths)
    assert holdout(train, 0.2, seed=3)[1].paths == held.paths
    cifar = load_cifar10(write_cifar10(tmp_path / "c"))["train"]
    rest, held = holdout(cifar, 0.2, seed=0)
    assert len(held) == 10 and torch.equal(torch.sort(torch.cat([rest.labels, held.labels])).values,
                                           torch.sort(cifar.labels).values)


@pytest.mark.parametrize("load, words", [
    (load_waterbirds, ["metadata.csv", "waterbird_complete95_forest2water2"]),
    (load_celeba, ["list_attr_celeba.csv", "kaggle"]),
    (load_in9l, ["train", "backgrounds_challenge"]),
    (load_cifar10, ["data_batch_1", "cifar-10-python.tar.gz"]),
    (load_svhn, ["train_32x32.mat", "ufldl.stanford.edu"]),
    (load_cats_vs_dogs, ["train", "dogs-vs-cats"]),
    (load_image_csv, ["metadata.csv", "columns path, label, split"]),
])
def test_missing_datasets_say_what_and_where(tmp_path, load, words):
    with pytest.raises(DataError) as error:
        load(tmp_path / "nothing")
    message = str(error.value)
    assert str(tmp_path / "nothing") in message
    for word in words:
        assert word in message


def test_corrupt_and_truncated_images_raise_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    write_image(good, 1, size=(64, 64))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    dataset = ImageFiles([good, truncated, garbage, tmp_path / "gone.png"], torch.tensor([1, 1, 0, 0]),
                         ImageView((8, 8), (8, 8)))
    assert dataset[0][1] == 1
    for i, path in enumerate((truncated, garbage, tmp_path / "gone.png"), 1):
        with pytest.raises(CorruptImageError, match=f"cannot read image {path}"):
            dataset[i]
