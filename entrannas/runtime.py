"""What every training job shares: device choice, seeding, RNG state, memory figures, atomic saves."""

from __future__ import annotations

import os
import random
import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def use_fast_kernels(device: torch.device) -> None:
    """Let cuDNN time its convolution algorithms once per shape and keep the fastest (CUDA only).
    Shapes are fixed within a search or a training run, as in the DARTS code."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def fused_available(params) -> Optional[bool]:
    """``fused=True`` for torch's SGD and Adam where they have fused kernels (CPU and CUDA), else
    ``None`` (torch's default)."""
    return True if all(p.device.type in ("cpu", "cuda") for p in params) else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every random generator's state, in types that ``torch.load(weights_only=True)`` reads back
    (NumPy's key array as a tensor)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


#: The keys of ``where_it_ran``, which every epoch record carries.
WHERE_IT_RAN = ("device", "device_name", "torch", "threads")


def where_it_ran(device: torch.device) -> dict:
    """What beside the config and the seed decides a run's numbers, for its epoch records: the
    device, torch's version and its CPU thread count (reductions split over more threads add up
    in another order, so the same seed ends elsewhere)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    # str(): torch.__version__ is a TorchVersion, which a weights-only load refuses
    return dict(zip(WHERE_IT_RAN, (str(device), name, str(torch.__version__), torch.get_num_threads())))


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory for CUDA; the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_atomic(obj, path: os.PathLike) -> None:
    """``torch.save`` through a temporary file, so a crash mid-write keeps the previous file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
    except RuntimeError as e:   # torch reports a full disk as a RuntimeError ('iostream error')
        tmp.unlink(missing_ok=True)
        raise OSError(f"cannot write {tmp}: {str(e).strip().splitlines()[0]}") from None
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read: truncated, corrupt, or holding more than weights and plain data."""


def load_checkpoint(path: os.PathLike, device: Optional[torch.device] = None) -> dict:
    """A checkpoint, read weights-only: tensors and plain containers, never code to run."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:   # torch raises several kinds (UnpicklingError, RuntimeError, EOFError)
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # a refused pickle: the line that names what it holds beyond weights and plain data
        cause = next((line for line in lines if "Unsupported global" in line), lines[0])
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({cause[:200]})") from None


class EpochJob:
    """What a search and an evaluation share: an epoch generator and atomic checkpoints.

    Subclasses set ``config`` (with ``epochs``), ``device``, ``epoch`` and implement ``run_epoch``,
    ``state_dict`` and ``load_state_dict``."""

    CHECKPOINT_VERSION = 2

    def run(self, on_step=None):
        """Yield one record per remaining epoch; ``on_step(step, steps)`` is called after each step."""
        while self.epoch < self.config.epochs:
            yield self.run_epoch(on_step)

    def save(self, path: os.PathLike) -> None:
        save_atomic(self.state_dict(), path)

    def load(self, path: os.PathLike) -> None:
        self.load_state_dict(load_checkpoint(path, self.device))

    def _check_version(self, state: dict) -> None:
        if state.get("version") != self.CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')} is not {self.CHECKPOINT_VERSION}")


@contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """An evaluation pass: ``model`` in eval mode and autograd off inside, back to training mode after."""
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train()


def loss_and_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[summed cross-entropy, correct predictions]`` of one batch, left on the device."""
    return torch.stack([torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
                        (logits.argmax(1) == y).sum().float()])


@torch.no_grad()
def loss_and_accuracy(forward, loader, device: torch.device, shard=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``forward(x) -> logits`` over a loader, one sync at the end.
    With a ``Shard`` (``entrannas.distributed``) each process runs its share of every batch and the
    sums are added up over the processes."""
    sums, n = torch.zeros(2, device=device), 0
    for x, y in loader:
        if shard is not None:
            x, y, _ = shard.split((x, y))
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        sums += loss_and_correct(forward(x), y)
        n += len(y)
    if shard is None:
        loss, correct = sums.tolist()
    else:   # summed over the processes, with the samples counted, in one collective
        loss, correct, n = shard.sum(torch.cat([sums, sums.new_tensor([n])])).tolist()
    return loss / n, correct / n
