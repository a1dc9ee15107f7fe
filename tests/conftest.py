import functools
import math
import os
import pickle
import sys
from pathlib import Path

# Ray reads these when it is imported: every Ray process of the tests must agree (MACHINE-NOTES).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")   # as orchestrator.sweep.ray_environment sets it
# Local Ray instances of the tests listen on loopback only, like the ones the CLI starts.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np

import pytest
import torch

from entrannas.config import SearchConfig
from entrannas.supernet import SearchNetwork, SupernetSpec

# benchmarks/ (the bench's op counter) importable as top-level modules
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

TINY = dict(layers=3, init_channels=4, nodes=4)
#: Fields of an epoch record that the clock or the process decide: two runs of a seed differ there.
TIMED = ("seconds", "valid_seconds", "peak_memory_mb", "images_per_second")


def untimed(record: dict, also: tuple = ()) -> dict:
    """``record`` less its ``TIMED`` fields (and ``also``): what the seed decides."""
    return {k: v for k, v in record.items() if k not in TIMED + also}


def write_cifar(root, name: str, n_per_batch: int = 10):
    """A small copy of torchvision's on-disk CIFAR format, written here (no download)."""
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        key, classes = "labels", 10
    else:
        folder = root / "cifar-100-python"
        files, key, classes = ["train", "test"], "fine_labels", 100
    folder.mkdir(parents=True)
    for f in files:
        entry = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 key: rng.integers(0, classes, n_per_batch).tolist()}
        with open(folder / f, "wb") as fh:
            pickle.dump(entry, fh)


def tiny_config(**changes) -> SearchConfig:
    values = {**TINY, "epochs": 2, "batch_size": 32, **changes}
    return SearchConfig(**values).resolve()


def tiny_batch(seed: int, n: int = 8, dtype=torch.float32, device="cpu"):
    """Digits-shaped inputs (1 channel, 8x8) and labels, the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=gen).to(device=device, dtype=dtype),
            torch.randint(0, 10, (n,), generator=gen).to(device))


def cosine_lrs(lr: float, lr_min: float, epochs: int, n: int | None = None) -> list[float]:
    """The lr of epochs 0 .. n - 1 (n: ``epochs``) on the cosine from ``lr`` to ``lr_min`` over ``epochs``."""
    return [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(n or epochs)]


def loss_and_accuracy_by_hand(forward, loader) -> tuple[float, float, int]:
    """Mean cross-entropy, accuracy and number of samples of ``forward``'s logits over ``loader``,
    summed in Python a batch at a time: a reckoning apart from the ``runtime.loss_and_accuracy`` that
    the records come from."""
    loss, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = forward(x)
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            n += len(y)
    return loss / n, correct / n, n


def cotangent_loss(out: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A scalar whose gradient with respect to ``out`` is a fixed random tensor, another for every
    sample. Tests that compare two passes' gradients need that: a loss with the same gradient for
    every sample, such as ``(out * c).sum()``, has exactly zero gradient behind a batch norm that
    normalises with the batch's statistics (the super-net's last cell ends in them), so its
    gradients there are rounding noise and any two of them agree within a tolerance."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out * g.to(out.device)).sum()


def tiny_net(seed: int = 0, in_channels: int = 1, **changes) -> SearchNetwork:
    torch.manual_seed(seed)
    config = tiny_config(**changes)
    return SearchNetwork(SupernetSpec.from_config(config, num_classes=10, in_channels=in_channels, stem="cifar"))


def record_as_is(fn, net, plans, args, pool):
    """A stand-in recorder for ``CudaGraphs`` on the CPU: the 'recorded' pass is the eager one."""
    return functools.partial(fn, plans)


@pytest.fixture(autouse=True)
def _few_threads():
    """Two CPU threads per test, or ENTRANNAS_TEST_THREADS (the mutation audit's share of the cores
    when it runs several pytests at once: more threads than cores make OpenMP wait on itself)."""
    torch.set_num_threads(int(os.environ.get("ENTRANNAS_TEST_THREADS", "2")))
    yield


@pytest.fixture
def no_ray(monkeypatch):
    """Fails the test if Ray starts: for input that must be refused before it does."""
    import orchestrator.sweep

    def refuse(*a, **k):
        raise AssertionError("Ray was started for an invalid spec")

    monkeypatch.setattr(orchestrator.sweep, "start_ray", refuse)
    monkeypatch.setattr("ray.init", refuse)

