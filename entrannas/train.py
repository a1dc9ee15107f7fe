"""Train a genotype from scratch and report its test error (DARTS' recipes): a generator of epoch records."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterator, Optional

import torch

from .config import EvalConfig
from .data import build_eval_data
from .distributed import Shard, check_data_parallel, loss_share, synchronize_batchnorm
from .evalnet import NetworkCIFAR, NetworkImageNet, count_multiply_adds, count_parameters
from .genotype import Genotype
from .runtime import (EpochJob, evaluating, loss_and_accuracy, peak_memory_mb, reset_peak_memory, resolve_device,
                      rng_state, seed_everything, set_rng_state, use_fast_kernels, fused_available, where_it_ran)

class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


def build_network(genotype: Genotype, config: EvalConfig, num_classes: int, in_channels: int, stem: str):
    cls = NetworkImageNet if stem == "imagenet" else NetworkCIFAR
    return cls(genotype, C=config.init_channels, layers=config.layers, num_classes=num_classes,
               auxiliary=config.auxiliary, drop_path_prob=0.0, in_channels=in_channels)


def training_loss(logits: torch.Tensor, logits_aux: Optional[torch.Tensor], y: torch.Tensor,
                  config: EvalConfig, total: Optional[int] = None) -> torch.Tensor:
    """The classifier's cross-entropy plus ``auxiliary_weight`` times the auxiliary head's (DARTS),
    both with the recipe's label smoothing; ``logits_aux`` is None without the head. With ``total``
    (the global batch size), this process's share (``loss_share``)."""
    loss = loss_share(logits, y, total, label_smoothing=config.label_smoothing)
    if logits_aux is not None:
        loss = loss + config.auxiliary_weight * loss_share(logits_aux, y, total, label_smoothing=config.label_smoothing)
    return loss


class Evaluation(EpochJob):
    """Train ``genotype`` from scratch. ``run()`` yields one record per epoch; with a ``Shard`` of
    several processes, each runs its share of every batch (``entrannas.distributed``)."""

    def __init__(self, genotype: Genotype, config: EvalConfig, device: Optional[torch.device] = None,
                 shard: Optional[Shard] = None):
        config = config.resolve()
        self.genotype, self.config = genotype, config
        self.device = device or resolve_device(config.device)
        self.shard = shard or Shard()
        check_data_parallel(config, self.shard.world)
        use_fast_kernels(self.device)
        seed_everything(config.seed)
        self.data = build_eval_data(config, self.device)
        info = self.data.info
        self.input_shape = (info.in_channels, info.image_size, info.image_size)
        self.model = build_network(genotype, config, info.num_classes, info.in_channels, info.stem).to(self.device)
        synchronize_batchnorm(self.model, self.shard)
        self.shard.broadcast(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=config.lr, momentum=config.momentum,
                                         weight_decay=config.weight_decay,
                                         fused=fused_available(self.model.parameters()))
        if config.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, config.epochs,
                                                                        eta_min=config.lr_min)
        else:
            self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=config.lr_gamma)
        self.epoch = 0

    def cost(self) -> dict:
        """Parameters (millions, auxiliary head excluded) and multiply-adds (millions) at the input size."""
        return {"params_m": count_parameters(self.model) / 1e6,
                "multiply_adds_m": count_multiply_adds(self.model, self.input_shape) / 1e6}

    def run_epoch(self, on_step: Optional[Callable[[int, int], None]] = None) -> dict:
        c, model = self.config, self.model
        start = time.perf_counter()
        reset_peak_memory(self.device)
        model.drop_path_prob = c.drop_path_prob * self.epoch / c.epochs
        lr = self.optimizer.param_groups[0]["lr"]
        self.data.train.set_epoch(self.epoch)
        model.train()
        sums, n = torch.zeros(2, device=self.device), 0
        total = len(self.data.train)
        shard = self.shard
        for step, (x, y) in enumerate(self.data.train):
            size = len(y)   # the global batch's
            x, y, share_of = shard.split((x, y))
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            logits, logits_aux = model(x)
            loss = training_loss(logits, logits_aux, y, c, share_of)
            loss.backward()
            shard.reduce_gradients(model.parameters())
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip, foreach=True)
            self.optimizer.step()
            sums += torch.stack([loss.detach() * size, (logits.argmax(1) == y).sum().float()])
            n += size
            if on_step is not None:
                on_step(step + 1, total)
        self.scheduler.step()
        train_loss, train_correct = shard.sum(sums).tolist()
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"epoch {self.epoch}: training loss is {train_loss / n}; lower lr")
        train_seconds = time.perf_counter() - start
        test_loss, test_acc = self.test()
        record = {"epoch": self.epoch, "seed": c.seed, "lr": lr, "drop_path_prob": model.drop_path_prob,
                  "train_loss": train_loss / n, "train_acc": train_correct / n,
                  "test_loss": test_loss, "test_error": 1.0 - test_acc,
                  "seconds": time.perf_counter() - start, "peak_memory_mb": peak_memory_mb(self.device),
                  "images_per_second": n / train_seconds,
                  "workers": shard.world, **where_it_ran(self.device)}
        self.epoch += 1
        return record

    def test(self) -> tuple[float, float]:
        with evaluating(self.model):
            return loss_and_accuracy(lambda x: self.model(x)[0], self.data.test, self.device, self.shard)

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": self.CHECKPOINT_VERSION, "config": self.config.to_dict(),
                "genotype": self.genotype.to_dict(), "epoch": self.epoch, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(self.device)}

    def load_state_dict(self, state: dict) -> None:
        self._check_version(state)
        if Genotype.from_dict(state["genotype"]) != self.genotype:
            raise ValueError("the checkpoint trains a different genotype")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        set_rng_state(state["rng"], self.device)


def evaluate(genotype: Genotype, config: Optional[EvalConfig] = None, **overrides) -> Iterator[dict]:
    """Train ``genotype`` from scratch; yields one record per epoch (train loss/accuracy, test
    loss/error, lr, seconds). ``overrides`` are ``EvalConfig`` fields, e.g. ``epochs=5``."""
    config = (config or EvalConfig()).replace(**overrides) if overrides else (config or EvalConfig())
    yield from Evaluation(genotype, config).run()
