"""The search loop: a plain generator of one record per epoch, with exact checkpoint and resume."""

from __future__ import annotations

import time
from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from .bilevel import BilevelOptimizer
from .config import SearchConfig, check_device_support
from .data import build_search_data
from .derive import thresholds
from .distributed import Shard, check_data_parallel, synchronize_batchnorm
from .genotype import Genotype, genotype_from_masks, random_genotype
from .runtime import (EpochJob, evaluating, loss_and_accuracy, peak_memory_mb, reset_peak_memory, resolve_device,
                      rng_state, seed_everything, set_rng_state, use_fast_kernels, where_it_ran)
from .supernet import DegenerateArchitecture, SearchNetwork, SupernetSpec
from .temperature import temperature

def genotype_stability(before: Genotype, after: Genotype) -> float:
    """The share of (cell, node, op, input) choices two genotypes have in common (of those either
    has): 1.0 when the derived architecture did not change."""
    a, b = before.choices(), after.choices()
    return len(a & b) / len(a | b)


class SearchDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class Search(EpochJob):
    """One architecture search. ``run()`` yields a record per epoch (docs/method.md). With a ``Shard``
    of several processes, each runs its share of every batch and all end alike (``entrannas.distributed``)."""

    def __init__(self, config: SearchConfig, device: Optional[torch.device] = None, shard: Optional[Shard] = None):
        config = config.resolve()   # idempotent: fills any unset default, validates
        self.config = config
        self.device = device or resolve_device(config.device)
        self.shard = shard or Shard()
        check_device_support(config, self.device)
        check_data_parallel(config, self.shard.world)
        use_fast_kernels(self.device)
        seed_everything(config.seed)
        self.data = build_search_data(config, self.device)
        info = self.data.info
        spec = SupernetSpec.from_config(config, info.num_classes, info.in_channels, info.stem)
        self.model = SearchNetwork(spec).to(self.device)
        synchronize_batchnorm(self.model, self.shard)
        self.shard.broadcast(self.model)
        self.model.use_cuda_graphs(config.cuda_graphs)
        self.optimizer = BilevelOptimizer(self.model, config, shard=self.shard)
        self.epoch = 0
        self.last_genotype: Optional[Genotype] = None   # the previous epoch's, for genotype_stability
        self.model.tau = self.tau

    @property
    def tau(self) -> float:
        """tau of this epoch: annealed over the epochs before the settling ones, then held at tau_end."""
        c = self.config
        return temperature(c.tau_schedule, self.epoch, c.epochs - c.settle_epochs, c.tau_start, c.tau_end)

    def updates_arch(self) -> bool:
        """Whether this epoch's steps update alpha and beta: after the warm-up, before the settling epochs."""
        c = self.config
        return c.arch_warmup_epochs <= self.epoch < c.epochs - c.settle_epochs

    def run_epoch(self, on_step: Optional[Callable[[int, int], None]] = None) -> dict:
        """Train one epoch, then evaluate the super-net on the architecture split."""
        model = self.model
        start = time.perf_counter()
        derivations = model.derivations
        graphs = Counter(model.cuda_graphs.stats) if model.cuda_graphs is not None else None
        reset_peak_memory(self.device)
        model.tau = self.tau
        update_arch = self.updates_arch()
        self.data.train.set_epoch(self.epoch)
        self.data.valid.set_epoch(self.epoch)
        model.train()
        lr = self.optimizer.w_optimizer.param_groups[0]["lr"]
        sums = torch.zeros(2, device=self.device)  # loss * n, correct: summed on the device, no sync
        n_train = 0
        n_steps = min(len(self.data.train), len(self.data.valid))
        architectures = set()   # derived architectures the weight steps ran (read on the host anyway)
        for step, (train_batch, valid_batch) in enumerate(zip(self.data.train, self.data.valid)):
            train_batch = tuple(t.to(self.device, non_blocking=True) for t in train_batch)
            valid_batch = tuple(t.to(self.device, non_blocking=True) for t in valid_batch)
            try:
                out = self.optimizer.step(train_batch, valid_batch, update_arch)
            except DegenerateArchitecture as e:
                raise SearchDiverged(f"epoch {self.epoch}, step {step}: {e}; lower lr or arch_lr") from None
            architectures.add(model.derived.key)
            n = train_batch[1].shape[0]
            n_train += n
            sums += torch.stack([out["train_loss"] * n, out["train_correct"].float()])
            if on_step is not None:
                on_step(step + 1, n_steps)
        self.optimizer.w_scheduler.step()
        train_loss, train_correct = self.shard.sum(sums).tolist()
        self.shard.check_in_step(self.model.arch_parameters(), "alpha and beta")
        if not np.isfinite(train_loss):
            raise SearchDiverged(f"epoch {self.epoch}: training loss is {train_loss / n_train}; "
                                 "lower lr or arch_lr")
        valid_start = time.perf_counter()
        valid_loss, valid_acc = self.evaluate()   # ends in a sync, as the training loop's sums did
        _, derived_acc = self.evaluate(derived=True)
        end = time.perf_counter()
        record = self._record(train_loss / n_train, train_correct / n_train, valid_loss, valid_acc,
                              lr, update_arch, end - start)
        record["derived_valid_acc"] = derived_acc
        record["supernet_gap"] = valid_acc - derived_acc
        record["valid_seconds"] = end - valid_start   # the validation pass's share of "seconds"
        record["images_per_second"] = n_train / (valid_start - start)
        # Host syncs to read a derived architecture, and recorded/eager passes, in this epoch.
        record["derivations"] = model.derivations - derivations
        record["architectures"] = len(architectures)
        record["cuda_graphs"] = None if graphs is None else {
            k: model.cuda_graphs.stats[k] - graphs[k] for k in ("captures", "recorded_calls", "eager_calls")}
        self.epoch += 1
        return record

    def evaluate(self, derived: bool = False) -> tuple[float, float]:
        """Super-net loss and accuracy on the architecture split; ``derived``: those of the derived
        architecture with the super-net's weights (every cell a Transit-cell)."""
        self.data.valid.set_epoch(self.epoch)
        logits = self.optimizer.derived_logits if derived else self.optimizer.logits
        with evaluating(self.model):
            return loss_and_accuracy(logits, self.data.valid, self.device, self.shard)

    def _record(self, train_loss, train_acc, valid_loss, valid_acc, lr, arch_updated, seconds) -> dict:
        m = self.model
        # what the epoch's last steps ran: derive() read it after the last arch step, no second read
        genotype = genotype_from_masks(*(m.derived or m.derive()).masks, m.primitives, m.spec.nodes)
        thr = None
        if m.beta_normal is not None:
            thr = {"normal": thresholds(m.beta_normal.detach()).tolist(),
                   "reduce": thresholds(m.beta_reduce.detach()).tolist()}
        stability = None if self.last_genotype is None else genotype_stability(self.last_genotype, genotype)
        self.last_genotype = genotype
        return {
            "epoch": self.epoch,
            "seed": self.config.seed,
            "tau": m.tau,
            "lr": lr,
            "arch_updated": arch_updated,
            "train_loss": train_loss, "train_acc": train_acc,
            "valid_loss": valid_loss, "valid_acc": valid_acc,
            "genotype": genotype.to_dict(),
            "genotype_stability": stability,
            "kept_connections": {"normal": genotype.inputs_per_node("normal"),
                                 "reduce": genotype.inputs_per_node("reduce")},
            "thresholds": thr,
            "seconds": seconds,
            "peak_memory_mb": peak_memory_mb(self.device),
            "workers": self.shard.world,
            **where_it_ran(self.device),
        }

    def genotype(self) -> Genotype:
        """The architecture derived now (at the end of the last epoch run)."""
        return self.model.genotype()

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": self.CHECKPOINT_VERSION, "config": self.config.to_dict(), "epoch": self.epoch,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "last_genotype": self.last_genotype and self.last_genotype.to_dict(),
                "rng": rng_state(self.device)}

    def load_state_dict(self, state: dict) -> None:
        self._check_version(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = state["epoch"]
        self.last_genotype = state["last_genotype"] and Genotype.from_dict(state["last_genotype"])
        self.model.tau = self.tau
        set_rng_state(state["rng"], self.device)


class RandomSearch(EpochJob):
    """``mode: random``: a genotype drawn from the search space by the seed, with no training
    (Li & Talwalkar's sanity baseline). Its one record holds the genotype and no losses."""

    def __init__(self, config: SearchConfig, device: Optional[torch.device] = None):
        self.config = config.resolve()
        self.device = device or resolve_device(self.config.device)
        self.epoch = 0
        self._genotype = random_genotype(self.config.primitives, self.config.nodes, self.config.seed)

    def genotype(self) -> Genotype:
        return self._genotype

    def run_epoch(self, on_step: Optional[Callable[[int, int], None]] = None) -> dict:
        g = self._genotype
        record = {"epoch": self.epoch, "seed": self.config.seed, "arch_updated": False, "genotype": g.to_dict(),
                  "kept_connections": {"normal": g.inputs_per_node("normal"), "reduce": g.inputs_per_node("reduce")},
                  "seconds": 0.0, **where_it_ran(self.device)}
        self.epoch += 1
        return record

    def state_dict(self) -> dict:
        return {"version": self.CHECKPOINT_VERSION, "config": self.config.to_dict(), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self._check_version(state)
        self.epoch = state["epoch"]


def search_job(config: SearchConfig, device: Optional[torch.device] = None, shard: Optional[Shard] = None):
    """The job that runs ``config``: a ``Search``, or a ``RandomSearch`` for ``mode: random`` (which
    trains nothing: every process of a ``shard`` draws the same genotype)."""
    if config.mode == "random":
        return RandomSearch(config, device)
    return Search(config, device, shard)
