import numpy as np
import pytest
import torch

from entrannas.config import EvalConfig
from entrannas.data import (TensorBatches, build_eval_data, build_search_data, cutout, load_arrays,
                            load_digits_arrays, random_crop_flip, split_per_class)

from conftest import tiny_config, write_cifar


@pytest.mark.parametrize("name, n_train", [("cifar10", 50), ("cifar100", 10)])
def test_cifar_loader_reads_the_torchvision_format(tmp_path, name, n_train):
    write_cifar(tmp_path, name)
    (train_x, train_y), (test_x, test_y) = load_arrays(name, str(tmp_path))
    assert train_x.shape == (n_train, 3, 32, 32) and test_x.shape == (10, 3, 32, 32)
    assert train_y.dtype == torch.long and abs(train_x.mean().item()) < 0.5


def test_cifar_search_split_halves_the_training_set(tmp_path):
    write_cifar(tmp_path, "cifar10")
    data = build_search_data(tiny_config(dataset="cifar10", data_dir=str(tmp_path), batch_size=8),
                             torch.device("cpu"))
    assert len(data.train.labels) == 25 and len(data.valid.labels) == 25
    # the weights' half is the first 25 images and the arch's the other 25 (DARTS): disjoint
    (images, labels), _ = load_arrays("cifar10", str(tmp_path))
    position = {bytes(img.numpy()): i for i, img in enumerate(images)}
    assert len(position) == 50, "the written images are distinct"
    assert [position[bytes(img.numpy())] for img in data.train.images] == list(range(25))
    assert [position[bytes(img.numpy())] for img in data.valid.images] == list(range(25, 50))
    assert torch.equal(data.valid.labels, labels[25:])
    x, y = next(iter(data.train))
    assert x.shape == (8, 3, 32, 32) and data.info.num_classes == 10


@pytest.mark.parametrize("stage", ["search", "evaluate"])
def test_cifar_training_batches_are_random_crops_of_the_4_padded_images_some_mirrored(tmp_path, stage):
    """The DARTS recipe: each training image is a 32x32 window of the image zero-padded by 4, at a
    random offset, mirrored half the time. Every image of an epoch is matched to its window here."""
    write_cifar(tmp_path, "cifar10")
    settings = dict(dataset="cifar10", data_dir=str(tmp_path), batch_size=8)
    if stage == "search":
        batches = build_search_data(tiny_config(**settings), torch.device("cpu")).train
    else:   # without cutout, which would hide the window
        batches = build_eval_data(EvalConfig(**settings, cutout=0), torch.device("cpu")).train
    n = len(batches.labels)
    padded = torch.nn.functional.pad(batches.images, (4,) * 4).double()            # [n, 3, 40, 40]
    # A random fingerprint of every 32x32 window (one conv), mirrored ones too, [n, 2, 9, 9]: each
    # image of the epoch finds its window by the nearest fingerprint, then is compared exactly.
    w = torch.randn(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prints = torch.nn.functional.conv2d(padded, torch.cat([w, w.flip(-1)])).flatten()
    x = torch.cat([x for x, _ in batches]).double()
    index = ((x * w).sum((1, 2, 3))[:, None] - prints).abs().argmin(dim=1)
    image, flipped, row, col = (t.tolist() for t in torch.unravel_index(index, (n, 2, 9, 9)))
    windows = torch.stack([padded[i, :, r:r + 32, c:c + 32] for i, r, c in zip(image, row, col)])
    mirrored = torch.tensor(flipped, dtype=torch.bool)[:, None, None, None]
    windows = torch.where(mirrored, windows.flip(-1), windows)
    assert torch.equal(windows, x), "each image is a window of its padded image"
    assert len(x) == n and set(flipped) == {0, 1}, "every image in the epoch; some mirrored, some not"
    assert set(row + col) - set(range(2, 7)), "shifts of 3 or 4 pixels, which only a padding of 4 gives"


def test_missing_cifar_files_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_arrays("cifar10", str(tmp_path))


def test_digits_are_real_and_split_1500_297():
    (tx, ty), (vx, vy) = load_digits_arrays()
    assert tx.shape == (1500, 1, 8, 8) and vx.shape == (297, 1, 8, 8)
    assert set(ty.tolist()) == set(range(10))


def test_subset_fraction_shrinks_the_search_split_and_each_class_of_the_evaluation_set():
    cpu = torch.device("cpu")
    search = build_search_data(tiny_config(dataset="digits", subset_fraction=0.5), cpu)
    assert len(search.train.labels) == len(search.valid.labels) == 375, "1500 images x 0.5 x half each"
    (_, labels), _ = load_digits_arrays()
    evaluation = build_eval_data(EvalConfig(dataset="digits", subset_fraction=0.5).resolve(), cpu)
    per_class = torch.bincount(labels, minlength=10)
    assert torch.bincount(evaluation.train.labels, minlength=10).tolist() == \
        [int(round(n * 0.5)) for n in per_class.tolist()]
    assert len(evaluation.test.labels) == 297, "the test set is never sub-sampled"


def test_each_epoch_draws_its_own_order_and_augmentation_and_repeats_when_asked_again():
    images = torch.rand(40, 3, 8, 8)
    batches = TensorBatches(images, torch.arange(40), 16, shuffle=True, seed=0, augment="crop_flip")

    def epoch(e):
        batches.set_epoch(e)
        x, y = zip(*batches)
        return torch.cat(x), torch.cat(y)

    (x0, y0), (x1, y1) = epoch(0), epoch(1)
    assert sorted(y0.tolist()) == sorted(y1.tolist()) == list(range(40)), "each image once an epoch"
    assert y0.tolist() != y1.tolist(), "another order"
    assert not torch.equal(x0[y0.argsort()], x1[y1.argsort()]), "other crops and flips of the same images"
    x0_again, y0_again = epoch(0)
    assert torch.equal(y0, y0_again) and torch.equal(x0, x0_again), "an epoch is a function of (seed, epoch)"


def test_crop_flip_takes_the_window_at_its_offsets_mirrored_where_asked():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    offsets = torch.tensor([[0, 3], [4, 1]])       # [row, column] x image: (0, 4) and (3, 1)
    out = random_crop_flip(x, 2, offsets, torch.tensor([True, False]))
    padded = torch.nn.functional.pad(x, (2,) * 4)
    assert torch.equal(out[0], padded[0, :, 0:6, 4:10].flip(-1))
    assert torch.equal(out[1], padded[1, :, 3:9, 1:7])


def test_per_class_subsample_and_split():
    labels = torch.arange(10).repeat_interleave(40)
    first, second = split_per_class(labels, fraction=0.5, portion=0.8, seed=0)
    assert len(first) == 160 and len(second) == 40 and not set(first.tolist()) & set(second.tolist())
    assert torch.bincount(labels[first]).tolist() == [16] * 10


@pytest.mark.slow
def test_imagenet_folder_search_data_and_224_forward(tmp_path):
    from PIL import Image

    from entrannas.supernet import SearchNetwork, SupernetSpec

    for c in range(3):
        (tmp_path / "train" / f"n{c:08d}").mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((40, 48, 3), 30 * c + i, dtype=np.uint8)).save(
                tmp_path / "train" / f"n{c:08d}" / f"{i}.png")
    config = tiny_config(dataset="imagenet", data_dir=str(tmp_path), batch_size=4, num_workers=0,
                         subset_fraction=0.5, train_portion=0.5)
    data = build_search_data(config, torch.device("cpu"))
    assert data.info.num_classes == 3 and len(data.train.dataset) == 6 and len(data.valid.dataset) == 6
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 224, 224)
    net = SearchNetwork(SupernetSpec.from_config(config, 3, 3, "imagenet"))
    assert net(x).shape == (4, 3)


def test_cutout_zeroes_a_square_clipped_at_the_border():
    x = torch.ones(2, 1, 8, 8)
    out = cutout(x, 4, torch.tensor([[4, 0], [4, 0]]))
    assert out[0, 0, 2:6, 2:6].sum() == 0 and out[0].sum() == 64 - 16
    assert out[1, 0, :2, :2].sum() == 0 and out[1].sum() == 64 - 4, "clipped at the corner"
    out = cutout(x, 4, torch.tensor([[1, 6], [5, 2]]))   # [row, column] x image: (1, 5) and (6, 2)
    expected = torch.ones(2, 1, 8, 8)
    expected[0, :, 0:3, 3:7] = 0
    expected[1, :, 4:8, 0:4] = 0
    assert torch.equal(out, expected)


def test_noisy_digits_are_the_digits_with_fixed_pixel_noise():
    from entrannas.data import DIGITS_NOISE, load_arrays
    (x, y), (xt, yt) = load_arrays("digits")
    (nx, ny), (nxt, nyt) = load_arrays("noisy_digits")
    assert torch.equal(y, ny) and torch.equal(yt, nyt)
    noise = torch.cat([nx - x, nxt - xt])
    assert noise.std().item() == pytest.approx(DIGITS_NOISE, rel=0.02) and abs(noise.mean().item()) < 0.02
    assert torch.equal(load_arrays("noisy_digits")[0][0], nx)   # the same noise in every run
