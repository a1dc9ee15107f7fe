"""Data-parallel search and evaluation: one job on several processes, each taking a share of every batch.

A ``Shard`` is this process's place among ``world`` processes of a ``torch.distributed`` group (gloo
on CPUs, NCCL on GPUs; Ray Train, ``torchrun`` or any launcher that initialises the group). Every
process builds the same job from the same seed and reads the same global batches; each runs its
share (``take``), and the job's result is that of one process on the whole batch:

- the loss of a share is its samples' summed loss over the global batch size, and the gradients
  of the weights and of alpha and beta are summed over the processes (``reduce_gradients``), so
  that every process steps with the gradient of the global batch's mean loss;
- batch normalisation computes its statistics over the global batch (``SyncedBatchNorm``, which
  ``synchronize_batchnorm`` puts in place of every BatchNorm): the search's BN always normalises
  with batch statistics, and per-process statistics would make a different search (docs/method.md,
  Data-parallel search, has the measurement);
- alpha and beta are then equal on every process at every step, so each derives the same
  architecture; ``check_in_step`` verifies it once an epoch.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


class Shard:
    """Process ``rank`` of ``world``; collectives go to ``group`` (the default group when None).
    ``Shard()`` alone is the single process: every collective is the identity."""

    def __init__(self, rank: int = 0, world: int = 1, group=None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.rank, self.world, self.group = rank, world, group

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This process's share of a global batch (the first dimension split as evenly as it goes)."""
        return torch.tensor_split(t, self.world)[self.rank] if self.world > 1 else t

    def split(self, batch) -> tuple[torch.Tensor, torch.Tensor, Optional[int]]:
        """This process's share of a global batch ``(x, y)``, and the global batch size that its loss
        is a share of (``loss_share``; None for a single process: the plain mean)."""
        x, y = batch
        if self.world == 1:
            return x, y, None
        return self.take(x), self.take(y), len(y)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(t, group=self.group)
        return t

    def reduce_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes, in one collective. Parameters without
        a gradient (ops a Transit-cell left out) have none on every process: all derive alike."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = self.sum(torch.cat([g.reshape(-1) for g in grads]))
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def broadcast(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers on every process."""
        if self.world > 1:
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0, group=self.group)

    def check_in_step(self, tensors: list[torch.Tensor], what: str) -> None:
        """Raise if ``tensors`` differ between the processes (the processes drifted apart)."""
        if self.world == 1:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        mine = flat.clone()
        dist.broadcast(flat, 0, group=self.group)
        differs = self.sum((mine != flat).any().float().reshape(1))
        if differs.item() > 0:
            raise RuntimeError(f"data-parallel: {what} differ between the {self.world} processes")


class _GlobalNorm(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps)`` per channel, with mean and (biased) variance over the global
    batch: each process's count, mean and sum of squared deviations, merged exactly (Chan et al.),
    in one collective; its backward sums the two per-channel reductions over the processes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float, shard: Shard):
        dims = [0] + list(range(2, x.dim()))
        C = x.shape[1]
        n = x.numel() // C
        xf = x.float()
        mean = xf.sum(dims) / max(n, 1)
        m2 = ((xf - mean.view(1, C, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        table = x.new_zeros(shard.world, 3, C, dtype=torch.float32)
        table[shard.rank] = torch.stack([torch.full_like(mean, n), mean, m2])
        counts, means, m2s = shard.sum(table).unbind(1)
        total = counts.sum(0)
        g_mean = (counts * means).sum(0) / total
        var = (m2s + counts * (means - g_mean) ** 2).sum(0) / total
        invstd = torch.rsqrt(var + eps)
        shape = (1, C) + (1,) * (x.dim() - 2)
        y = ((xf - g_mean.view(shape)) * invstd.view(shape)).to(x.dtype)
        ctx.save_for_backward(y, invstd, total)
        ctx.shard, ctx.dims = shard, dims
        unbiased = var * total / (total - 1).clamp_min(1)
        ctx.mark_non_differentiable(g_mean, unbiased)
        return y, g_mean, unbiased

    @staticmethod
    def backward(ctx, gy, _mean, _var):
        y, invstd, total = ctx.saved_tensors
        shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
        gf, yf = gy.float(), y.float()
        sums = ctx.shard.sum(torch.stack([gf.sum(ctx.dims), (gf * yf).sum(ctx.dims)]))
        mean_g, mean_gy = (sums / total).unbind(0)
        gx = (gf - mean_g.view(shape) - yf * mean_gy.view(shape)) * invstd.view(shape)
        return gx.to(gy.dtype), None, None


class SyncedBatchNorm(nn.BatchNorm2d):
    """A BatchNorm whose batch statistics are the global batch's (``_GlobalNorm``); running
    statistics, where tracked, are updated from them, alike on every process. With running
    statistics in eval mode it is the plain BatchNorm. Works on every device and backend."""

    shard: Shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training or self.running_mean is None):
            return super().forward(x)
        y, mean, var = _GlobalNorm.apply(x, self.eps, self.shard)
        if self.training and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                # momentum None: the cumulative average, as BatchNorm (a tensor weight: no host sync)
                m = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked.float()
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(var.to(self.running_var.dtype), m)
        if self.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def synchronize_batchnorm(module: nn.Module, shard: Shard) -> nn.Module:
    """Make every 2-d BatchNorm of ``module`` a ``SyncedBatchNorm`` over ``shard``'s processes (the
    same parameters and buffers, so checkpoints load either way). A single process keeps them."""
    if shard.world > 1:
        for m in module.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = SyncedBatchNorm
                m.shard = shard
    return module


def check_data_parallel(config, workers: int, field: str = "workers") -> None:
    """Raise ``ConfigError`` for a setting a data-parallel job cannot run with, before it starts."""
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(field, workers, "a whole number of processes >= 1")
    if workers == 1:
        return
    for name, default, reason in (
            ("unrolled", False, "the unrolled step's virtual weight steps are not reduced over processes"),
            ("cuda_graphs", False, "recorded graphs would hold the processes' collectives"),
            ("op_streams", 1, "side streams would run the collectives of batch normalisation")):
        value = getattr(config, name, default)
        if value != default:
            raise ConfigError(name, value, f"not with {field}: {workers} ({reason}); use {field}: 1")


def loss_share(logits: torch.Tensor, y: torch.Tensor, total: Optional[int], **kwargs) -> torch.Tensor:
    """The cross-entropy of this process's share: its samples' summed loss over the global batch size
    ``total``; the plain mean when ``total`` is None (one process)."""
    if total is None:
        return nn.functional.cross_entropy(logits, y, **kwargs)
    return nn.functional.cross_entropy(logits, y, reduction="sum", **kwargs) / total


def _local_process(rank: int, fn: Callable, world: int, rendezvous: str, threads: int, args: tuple) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        fn(Shard(rank, world), *args)
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable, world: int, *args, threads: int = 1) -> None:
    """``fn(shard, *args)`` in ``world`` new CPU processes of one gloo group on this machine, without
    Ray (tests and benchmarks; a module-level ``fn``). Raises if any process fails."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_local_process, args=(fn, world, os.path.join(tmp, "rendezvous"), threads, args), nprocs=world)
