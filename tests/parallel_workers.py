"""What the processes of the data-parallel tests run (``entrannas.distributed.run_local`` starts them:
a gloo group of CPU processes, without Ray)."""

from __future__ import annotations

from pathlib import Path

import torch

from entrannas.config import SearchConfig
from entrannas.distributed import Shard, synchronize_batchnorm
from entrannas.search import Search


def first_arch_steps(shard: Shard, config: dict, steps: int, out: str) -> None:
    """Build the search of ``config`` on ``shard``, run ``steps`` steps with architecture updates,
    and save alpha and beta to ``out/rank<r>.pt``."""
    search = Search(SearchConfig.from_dict(config), torch.device("cpu"), shard)
    batches = zip(search.data.train, search.data.valid)
    for _, (train, valid) in zip(range(steps), batches):
        search.optimizer.step(train, valid, update_arch=True)
    torch.save([p.detach().clone() for p in search.model.arch_parameters()],
               Path(out) / f"rank{shard.rank}.pt")


def batchnorm_shares(shard: Shard, out: str) -> None:
    """A batch-normalised share of a 7-sample batch, its input gradient and weight gradient, saved."""
    torch.manual_seed(0)
    x, g = torch.randn(7, 3, 4, 4) * 3 + 1, torch.randn(7, 3, 4, 4)
    norm = torch.nn.BatchNorm2d(3, track_running_stats=False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(3)), norm.bias.copy_(torch.rand(3))
    synchronize_batchnorm(norm, shard)
    share = shard.take(x).clone().requires_grad_(True)
    y = norm(share)
    y.backward(shard.take(g))
    torch.save({"y": y.detach(), "grad": share.grad, "weight_grad": norm.weight.grad},
               Path(out) / f"rank{shard.rank}.pt")
