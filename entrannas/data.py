"""Datasets for search (and evaluation): the bi-level split, device-resident batches.

Small datasets (digits, synthetic, CIFAR) are held as tensors on the training device and batched
there, with augmentation done per batch on the device; ImageNet streams from an image folder.
Every shuffle and augmentation draws from a generator seeded by (seed, epoch), so an epoch is the
same whether or not the run was interrupted before it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from .config import CIFAR_FOLDERS

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_PADDING = 4   # random-crop padding of the CIFAR recipes


@dataclass(frozen=True)
class DataInfo:
    """What the network needs to know about a dataset."""

    num_classes: int
    in_channels: int
    image_size: int
    stem: str  # "cifar" (small images) or "imagenet" (224 inputs, stride-8 stem)


class TensorBatches:
    """Mini-batches of an in-memory tensor dataset, shuffled per epoch, optionally augmented."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool,
                 seed: int, augment: Optional[str] = None, cutout: int = 0):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.augment, self.cutout = augment, cutout
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.images.device
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        # All of the epoch's random draws at once: one host-to-device copy per epoch, none per batch.
        order = torch.randperm(n, generator=gen).to(device) if self.shuffle else torch.arange(n, device=device)
        H, W = self.images.shape[-2:]
        if self.augment == "crop_flip":
            offsets = torch.randint(0, 2 * CROP_PADDING + 1, (2, n), generator=gen).to(device)
            flips = (torch.rand(n, generator=gen) < 0.5).to(device)
        if self.cutout:
            centers = torch.stack([torch.randint(0, H, (n,), generator=gen),
                                   torch.randint(0, W, (n,), generator=gen)]).to(device)
        for start in range(0, n, self.batch_size):
            batch = slice(start, start + self.batch_size)
            idx = order[batch]
            x, y = self.images[idx], self.labels[idx]
            if self.augment == "crop_flip":
                x = random_crop_flip(x, CROP_PADDING, offsets[:, batch], flips[batch])
            if self.cutout:
                x = cutout(x, self.cutout, centers[:, batch])
            yield x, y


def random_crop_flip(x: torch.Tensor, padding: int, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Per-image crop of the zero-padded image at ``offsets`` ``[2, B]`` (row, column, each in
    0..2*padding) and horizontal flip where ``flips`` ``[B]`` is true; batched on x's device."""
    B, C, H, W = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    rows = (offsets[0, :, None] + torch.arange(H, device=x.device))                      # [B, H]
    cols = (offsets[1, :, None] + torch.arange(W, device=x.device))                      # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=x.device)[:, None, None, None]
    c = torch.arange(C, device=x.device)[None, :, None, None]
    return padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(x: torch.Tensor, length: int, centers: torch.Tensor) -> torch.Tensor:
    """Zero a ``length`` x ``length`` square per image (DeVries & Taylor) around ``centers`` ``[2, B]``
    (row, column), clipped at the borders; batched."""
    _, _, H, W = x.shape
    cy, cx = centers[0], centers[1]
    ys = torch.arange(H, device=x.device)[None, :]
    xs = torch.arange(W, device=x.device)[None, :]
    in_y = ((ys >= cy[:, None] - length // 2) & (ys < cy[:, None] + length - length // 2))    # [B, H]
    in_x = ((xs >= cx[:, None] - length // 2) & (xs < cx[:, None] + length - length // 2))    # [B, W]
    hole = in_y[:, :, None] & in_x[:, None, :]
    return x * (~hole)[:, None].to(x.dtype)


# -- raw datasets ----------------------------------------------------------------------------------
def _normalize(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


#: ``noisy_digits``: the pixel noise's standard deviation, in units of the normalised images' spread.
#: Chosen so that a 3-epoch proxy evaluation ranks DARTS_V2 clearly above parameter-free genotypes
#: (docs/method.md, "The quick-start task"); plain digits is too easy for that.
DIGITS_NOISE = 0.8


def load_digits_arrays(noise: float = 0.0) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's handwritten digits (1797 8x8 images): a fixed 1500/297 train/test split.
    ``noise`` adds fixed Gaussian pixel noise (drawn once, the same in every run) of that standard
    deviation."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0        # [N, 1, 8, 8] in [0, 1]
    images = (images - 0.3) / 0.4   # near zero mean, unit std over the set
    labels = torch.from_numpy(digits.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    if noise:
        images = images + noise * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    train, test = order[:1500], order[1500:]
    return (images[train], labels[train]), (images[test], labels[test])


def load_synthetic_arrays(n_train: int = 2048, n_test: int = 512, num_classes: int = 10, size: int = 32):
    """CIFAR-shaped random images whose label is a fixed linear function of the pixels (learnable)."""
    gen = torch.Generator().manual_seed(1234)
    images = torch.randn(n_train + n_test, 3, size, size, generator=gen)
    projection = torch.randn(3 * size * size, num_classes, generator=gen)
    labels = (images.flatten(1) @ projection).argmax(1)
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def _read_cifar_batches(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for f in files:
        with open(f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return np.concatenate(images), np.asarray(labels, dtype=np.int64)


def load_cifar_arrays(name: str, data_dir: str, download: bool = False):
    """CIFAR-10/100 from torchvision's on-disk format (``cifar-10-batches-py`` / ``cifar-100-python``).

    The pickles are read directly (no checksum), so a small test copy in the same format loads too.
    """
    root = Path(data_dir)
    folder = root / CIFAR_FOLDERS[name]
    if not folder.is_dir():
        if not download:
            raise FileNotFoundError(f"data_dir: {root} has no {CIFAR_FOLDERS[name]}/ folder; "
                                    "set download: true to fetch it")
        import torchvision

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(str(root), train=True, download=True)
    if name == "cifar10":
        train_files = sorted(folder.glob("data_batch_*"))
        test_files = [folder / "test_batch"]
    else:
        train_files, test_files = [folder / "train"], [folder / "test"]
    missing = [str(f) for f in train_files + test_files if not f.is_file()]
    if missing or not train_files:
        raise FileNotFoundError(f"data_dir: CIFAR files missing: {', '.join(missing) or folder}")
    train_x, train_y = _read_cifar_batches(train_files)
    test_x, test_y = _read_cifar_batches(test_files)
    return ((_normalize(train_x, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(train_y)),
            (_normalize(test_x, CIFAR_MEAN, CIFAR_STD), torch.from_numpy(test_y)))


DATA_INFO = {
    "digits": DataInfo(10, 1, 8, "cifar"),
    "noisy_digits": DataInfo(10, 1, 8, "cifar"),
    "synthetic": DataInfo(10, 3, 32, "cifar"),
    "cifar10": DataInfo(10, 3, 32, "cifar"),
    "cifar100": DataInfo(100, 3, 32, "cifar"),
    "imagenet": DataInfo(1000, 3, 224, "imagenet"),
}


def load_arrays(dataset: str, data_dir: Optional[str] = None, download: bool = False):
    """``((train_x, train_y), (test_x, test_y))`` of an in-memory dataset, on the CPU."""
    if dataset == "digits":
        return load_digits_arrays()
    if dataset == "noisy_digits":
        return load_digits_arrays(DIGITS_NOISE)
    if dataset == "synthetic":
        return load_synthetic_arrays()
    if dataset in CIFAR_FOLDERS:
        return load_cifar_arrays(dataset, data_dir, download)
    raise ValueError(f"dataset: {dataset!r} is not an in-memory dataset")


def split_per_class(labels: torch.Tensor, fraction: float, portion: float, seed: int):
    """Indices of a per-class sub-sample of ``fraction``, split ``portion`` / rest (stratified)."""
    gen = torch.Generator().manual_seed(seed)
    first, second = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = max(2, int(round(len(idx) * fraction))) if fraction < 1 else len(idx)
        n_first = int(round(n * portion))
        first.append(idx[:n_first])
        second.append(idx[n_first:n])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


@dataclass
class SearchData:
    info: DataInfo
    train: object   # batches for the weight step
    valid: object   # batches for the architecture step


def build_search_data(config, device: torch.device) -> SearchData:
    """The search split (bi-level, docs/method.md): the training set halved (``train_portion``), weights / arch."""
    info = DATA_INFO[config.dataset]
    if config.dataset == "imagenet":
        return _imagenet_search_data(config, info)
    (images, labels), _ = load_arrays(config.dataset, config.data_dir, config.download)
    n = len(labels)
    n_train = int(n * config.train_portion * config.subset_fraction)
    n_valid = int(n * (1 - config.train_portion) * config.subset_fraction)
    # DARTS takes the first half for the weights and the second for alpha (no shuffle before).
    images, labels = images.to(device), labels.to(device)
    augment = "crop_flip" if config.dataset.startswith("cifar") else None
    train = TensorBatches(images[:n_train], labels[:n_train], config.batch_size, shuffle=True,
                          seed=config.seed, augment=augment)
    valid = TensorBatches(images[n - n_valid:], labels[n - n_valid:], config.batch_size, shuffle=True,
                          seed=config.seed + 7919, augment=augment)
    return SearchData(info, train, valid)


class _EpochLoader:
    """A DataLoader whose shuffle order is a function of (seed, epoch), like ``TensorBatches``."""

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True,
                                             generator=gen, num_workers=self.num_workers,
                                             pin_memory=torch.cuda.is_available(),
                                             persistent_workers=False)
        return iter(loader)


def imagenet_transforms(train: bool):
    from torchvision import transforms as T

    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if train:
        return T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
                          T.ColorJitter(0.4, 0.4, 0.4, 0.2), T.ToTensor(), normalize])
    return T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])


def imagenet_folder(data_dir: str, split: str, train_transforms: bool):
    from torchvision.datasets import ImageFolder

    root = Path(data_dir) / split
    if not root.is_dir():
        raise FileNotFoundError(f"data_dir: {data_dir} has no {split}/ folder of class sub-folders")
    return ImageFolder(str(root), transform=imagenet_transforms(train_transforms))


def _imagenet_search_data(config, info: DataInfo) -> SearchData:
    folder = imagenet_folder(config.data_dir, "train", train_transforms=True)
    labels = torch.tensor(folder.targets)
    info = DataInfo(len(folder.classes), 3, 224, "imagenet")
    w_idx, a_idx = split_per_class(labels, config.subset_fraction, config.train_portion, config.seed)
    sub = torch.utils.data.Subset
    return SearchData(info,
                      _EpochLoader(sub(folder, w_idx.tolist()), config.batch_size, config.seed, config.num_workers),
                      _EpochLoader(sub(folder, a_idx.tolist()), config.batch_size, config.seed + 7919,
                                   config.num_workers))


@dataclass
class EvalData:
    info: DataInfo
    train: object
    test: object


def build_eval_data(config, device: torch.device) -> EvalData:
    """Training set (optionally a per-class ``subset_fraction``) and test set for evaluation."""
    info = DATA_INFO[config.dataset]
    if config.dataset == "imagenet":
        train = imagenet_folder(config.data_dir, "train", train_transforms=True)
        test = imagenet_folder(config.data_dir, "val", train_transforms=False)
        if config.subset_fraction < 1:
            idx, _ = split_per_class(torch.tensor(train.targets), config.subset_fraction, 1.0, config.seed)
            train = torch.utils.data.Subset(train, idx.tolist())
            classes = len(train.dataset.classes)
        else:
            classes = len(train.classes)
        info = DataInfo(classes, 3, 224, "imagenet")
        return EvalData(info, _EpochLoader(train, config.batch_size, config.seed, config.num_workers),
                        _OrderedLoader(test, config.batch_size, config.num_workers))
    (train_x, train_y), (test_x, test_y) = load_arrays(config.dataset, config.data_dir, config.download)
    if config.subset_fraction < 1:
        idx, _ = split_per_class(train_y, config.subset_fraction, 1.0, config.seed)
        train_x, train_y = train_x[idx], train_y[idx]
    augment = "crop_flip" if config.dataset.startswith("cifar") else None
    train = TensorBatches(train_x.to(device), train_y.to(device), config.batch_size, shuffle=True,
                          seed=config.seed, augment=augment, cutout=config.cutout)
    test = TensorBatches(test_x.to(device), test_y.to(device), config.batch_size, shuffle=False, seed=0)
    return EvalData(info, train, test)


class _OrderedLoader(_EpochLoader):
    """A test-set loader: fixed order, no augmentation randomness."""

    def __init__(self, dataset, batch_size: int, num_workers: int):
        super().__init__(dataset, batch_size, 0, num_workers)

    def __iter__(self):
        return iter(torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False,
                                                num_workers=self.num_workers,
                                                pin_memory=torch.cuda.is_available()))
