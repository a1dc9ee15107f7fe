"""Time steady-state search steps (arch step + weight step, first-order) per configuration.

    entrannas-tune bench --configs darts entrannas dst --layers 8 --channels 8 \\
        --batch-size 32 --image-size 16 --device cpu

(or ``python benchmarks/bench.py ...``). A configuration is a mode with its default placement,
sharing and bottleneck ratio, optionally followed by fast-path variants joined with ``+``: ``bf16``
(autocast), ``cl`` (channels_last), ``graphs`` (``cuda_graphs``: each hot derived architecture's
passes recorded as CUDA graphs), ``streams`` (``op_streams: 4``: the ops of a source on four CUDA
streams at once), e.g. ``dst+graphs+bf16+cl``, and by ``key=value``
parts that set any search setting for that configuration, e.g.
``entrannas+placement=all+bottleneck_ratio=1`` (``--set key=value`` sets one for every
configuration; the label's win). Prints one JSON document
(every measured figure; also written to ``--out`` after each configuration) and a short table.
The projected 50-epoch CIFAR-10 search counts the steps (25,000 training images an epoch, the
warm-up epochs at the weight step alone), and beside it
(``+ valid``) the same with each epoch's validation pass over the other 25,000 images, which a
search runs too (timed in eval mode without autograd, as ``Search.evaluate`` runs it).
Ratios are only meaningful within one run.

Each timed step does everything a search step does, the derivation of the structure included.
With ``--frozen-arch`` the arch optimizer's learning rate is 0: the arithmetic is the same, but the
derived structure cannot change while timing, as in a settled search (recorded graphs are reused).
That structure is the initial one: random for ``entrannas``, every op on every edge for ``dst``
(its thresholds keep everything at first), which is not what a search settles on. ``--arch G`` (a
genotype: a zoo name such as ``DARTS_V2``, a JSON file or a search directory) times the search
settled at G instead: alpha and beta are set so that the mode derives G
(``SearchNetwork.set_architecture``; ``--frozen-arch`` implied; ``MODE=G`` entries give one mode
its own, e.g. ``--arch DARTS_V2 dst=benchmarks/genotypes/dst-digits.json``, since the top-2 rule
derives two inputs per node and DST any number), and the projection counts the warm-up epochs at
the initial state's weight step, which is what a search runs then.
``--check`` compares each configuration's logits and gradients after the warm-up with the plain
fp32 eager path from the same weights, on the same device, beside two references that give the
gradient cosine a scale (the eager path with its input rounded to bf16, and on another batch).
``--profile N`` profiles N more steps and records where their time goes: on a GPU the kernels by
device time, on the CPU the aten ops by self time (the table prints the top few per configuration;
the JSON keeps the top 25).
``--count-ops`` counts, for one more step of each eager configuration, the aten ops that launch a
kernel (views and allocations left out) and the bytes their tensors hold (inputs and outputs): a
measure of the work that does not depend on the machine, for comparing code changes on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:   # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from entrannas.bilevel import BilevelOptimizer, full_precision  # noqa: E402
from entrannas.config import (MODES, ConfigError, SearchConfig, check_device_support, parse_overrides,  # noqa: E402
                              unknown_setting)
from entrannas.derive import arch_for_genotype  # noqa: E402
from entrannas.genotype import GenotypeError  # noqa: E402
from entrannas.ops import pool_grad_is_wrong  # noqa: E402
from entrannas.rundir import write_text_atomic  # noqa: E402
from entrannas.runtime import (evaluating, loss_and_correct, resolve_device, use_fast_kernels,  # noqa: E402
                               where_it_ran)
from entrannas.supernet import INITIAL_TAU, SearchNetwork, SupernetSpec  # noqa: E402
from entrannas.zoo import load_genotype  # noqa: E402

#: Images in a CIFAR-10 search epoch (train_portion 0.5 of 50,000), for the weights and again for validation.
STEPS_PER_EPOCH_CIFAR = 25_000
VARIANTS = {
    "bf16": {"precision": "bf16"},
    "cl": {"channels_last": True},
    "graphs": {"cuda_graphs": True},
    "streams": {"op_streams": 4},
}


#: Settings the bench fixes itself, and why (or which flag sets them).
BENCH_FIXED = {"mode": "a configuration's first part names it", "layers": "use --layers",
               "init_channels": "use --channels", "batch_size": "use --batch-size", "device": "use --device",
               "dataset": "the bench times random CIFAR-shaped inputs",
               "epochs": "the bench projects a 50-epoch search"}


def bench_settings(pairs: list[str], field: str, value=None) -> dict:
    """``KEY=VALUE`` settings (``--set``, or inside a label) as config changes; refuses the ones the
    bench fixes (its own flags set them) and unknown keys, naming ``field`` and ``value`` (the pair
    itself unless given: a label names the configuration)."""
    known = {f.name for f in dataclasses.fields(SearchConfig)}
    changes = {}
    for pair in pairs:
        key = pair.partition("=")[0].strip()
        if key in BENCH_FIXED:
            raise ConfigError(field, value or pair, f"{key} is fixed here: {BENCH_FIXED[key]}")
        if key not in known:
            raise ConfigError(field, value or pair,
                              unknown_setting(key, sorted(known - set(BENCH_FIXED)), f"setting {key!r}"))
        changes.update(parse_overrides([pair]))
    return changes


def parse_label(label: str, args: argparse.Namespace) -> SearchConfig:
    """``mode[+variant...][+key=value...]`` -> a resolved config (raises ConfigError naming the bad part).
    ``key=value`` parts set any search setting (placement, feature_sharing, bottleneck_ratio, ...) for
    this configuration, over ``--set``."""
    mode, *variants = label.split("+")
    if mode not in MODES:
        raise ConfigError("--configs", label, f"starts with a mode: {', '.join(MODES)}")
    changes = {"precision": args.precision, "channels_last": args.channels_last,
               **bench_settings(args.overrides or [], "--set")}
    for v in variants:
        if "=" in v:
            changes.update(bench_settings([v], "--configs", label))
        elif v in VARIANTS:
            changes.update(VARIANTS[v])
        else:
            raise ConfigError("--configs", label, f"unknown variant {v!r}; allowed: {', '.join(VARIANTS)}, "
                                                  "or key=value")
    fixed = dict(mode=mode, dataset="synthetic", layers=args.layers, init_channels=args.channels,
                 batch_size=args.batch_size, epochs=50)
    try:
        return SearchConfig.from_dict({"arch_warmup_epochs": 15, "settle_epochs": 0, **changes, **fixed}).resolve()
    except ConfigError as e:   # say which configuration has the bad value
        raise ConfigError(e.field, e.value, f"{e.allowed} (in --configs {label})") from None


def arch_of(arch: list[str] | None, mode: str) -> str | None:
    """The genotype ``--arch`` gives ``mode``: its ``MODE=GENOTYPE`` entry, else the plain one."""
    plain = None
    for entry in arch or ():
        key, sep, value = entry.partition("=")
        if sep and key in MODES:
            if key == mode:
                return value
        else:
            plain = entry
    return plain


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_block(fn, n: int, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    _sync(device)
    return (time.perf_counter() - start) / n


def _timed_validation(opt: BilevelOptimizer, batches, warmup: int, steps: int, repeats: int,
                      device: torch.device) -> float:
    """Seconds per batch of a search's validation pass, as ``Search.evaluate`` runs it (eval mode, no
    autograd, the loss and the correct count summed on the device), the median of ``repeats`` blocks
    of ``steps`` after ``warmup`` untimed passes (where a recorded pass of its kind is built)."""
    def valid_pass(i: int) -> torch.Tensor:
        x, y = batches[i % len(batches)][1]
        return loss_and_correct(opt.logits(x), y)

    with evaluating(opt.model):
        for i in range(warmup):
            valid_pass(i)
        return statistics.median_high(_timed_block(valid_pass, steps, device) for _ in range(repeats))


def _pass_result(opt: BilevelOptimizer, batch, arch_pass: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 logits and the flattened gradients (zeros where none) of one arch or weight pass, in
    the order of ``_pass_parameters``."""
    net = opt.model
    net.zero_grad(set_to_none=True)
    loss, logits = opt.frozen_arch_loss(*batch) if arch_pass else opt.weight_loss(*batch)
    loss.backward()
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().float()
                       for _, p in _pass_parameters(net, arch_pass)])
    net.zero_grad(set_to_none=True)
    return full_precision(logits).detach(), grads


def _pass_parameters(net: SearchNetwork, arch_pass: bool) -> list[tuple[str, torch.nn.Parameter]]:
    """What a pass updates, with names: the architecture parameters, or the weights."""
    wanted = {id(p) for p in (net.arch_parameters() if arch_pass else net.weight_parameters())}
    return [(name, p) for name, p in net.named_parameters() if id(p) in wanted]


def _per_parameter_sums(named: list[tuple[str, torch.nn.Parameter]], fast: torch.Tensor,
                        ref: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """Per parameter, ``(|fast - ref|^2, |ref|^2, |fast|^2, fast . ref)`` of two flattened gradients:
    summed on the device, read in one copy."""
    sizes = [p.numel() for _, p in named]

    def per_parameter(v: torch.Tensor) -> torch.Tensor:
        return torch.stack([part.sum() for part in v.split(sizes)])

    sums = torch.stack([per_parameter(v) for v in ((fast - ref).square(), ref.square(), fast.square(), fast * ref)])
    return [tuple(column) for column in sums.double().t().tolist()]


def _cosine(dot: float, fast_sq: float, ref_sq: float, eps: float = 1e-8) -> float:
    """As F.cosine_similarity: each norm at least eps."""
    return dot / (max(fast_sq ** 0.5, eps) * max(ref_sq ** 0.5, eps))


def _largest_differences(named, sums, top: int) -> list[dict]:
    diff_total = max(sum(s[0] for s in sums), 1e-300)
    ref_total = max(sum(s[1] for s in sums), 1e-300)
    rows = [{"parameter": name, "share_of_difference": diff / diff_total, "share_of_gradient": ref_sq / ref_total,
             "cosine": _cosine(dot, fast_sq, ref_sq)}
            for (name, _), (diff, ref_sq, fast_sq, dot) in zip(named, sums)]
    return sorted(rows, key=lambda r: -r["share_of_difference"])[:top]


def block_of(name: str) -> str:
    """The part of the network a parameter belongs to: ``cells.3`` for anything of cell 3, else the
    top-level module (``stem0``, ``classifier``...)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "cells" else parts[0]


def _differences_by_block(named, sums) -> list[dict]:
    blocks: dict[str, list[float]] = {}
    for (name, _), values in zip(named, sums):
        acc = blocks.setdefault(block_of(name), [0.0, 0.0, 0.0, 0.0])
        for i, v in enumerate(values):
            acc[i] += v
    diff_total = max(sum(b[0] for b in blocks.values()), 1e-300)
    rows = [{"block": block, "cosine": _cosine(dot, fast_sq, ref_sq), "share_of_difference": diff / diff_total}
            for block, (diff, ref_sq, fast_sq, dot) in blocks.items()]
    return rows[::-1]


def gradient_differences(named: list[tuple[str, torch.nn.Parameter]], fast: torch.Tensor, ref: torch.Tensor,
                         top: int = 3) -> dict[str, list[dict]]:
    """Where two flattened gradients (``named``'s parameters, in the network's order) differ, from
    one read of per-parameter sums:

    - ``largest_differences``: the ``top`` parameters that hold most of ``|fast - ref|^2``, each with
      its share of it, its cosine and its share of ``|ref|^2`` (a gradient that differs a lot but
      weighs little bends the whole cosine little);
    - ``by_block``: the cosine and share of the difference per block of the network (``block_of``),
      from the output back to the input, as the backward pass runs. A backward kernel that goes
      wrong in one cell bends the gradients of that cell and of everything before it and leaves the
      later ones alone, so the first block whose cosine drops is where to look; the weights' own
      gradients say nothing of ops without weights (pools), this does."""
    sums = _per_parameter_sums(named, fast, ref)
    return {"largest_differences": _largest_differences(named, sums, top),
            "by_block": _differences_by_block(named, sums)}


def check_against_eager(opt: BilevelOptimizer, batch, other_batch=None) -> dict:
    """Logits and gradients of this configuration's arch and weight passes vs the fp32 eager path
    with sparse Transit-cells, from the same state: the largest error relative to the eager logits'
    scale, and the cosine similarity of the gradients.

    Two references put that cosine in scale (``reference``), both of the fp32 eager path against
    itself: with its input rounded to bf16, the gradient's sensitivity to a perturbation the size of
    one bf16 rounding (bf16 rounds at every layer, so expect it lower than this), and on
    ``other_batch``, how far apart the gradients of two batches are (SGD's own noise)."""
    model = opt.model
    eager_layout = {"channels_last": False, "op_streams": 1}   # in the spec and the config
    reference = SearchNetwork(dataclasses.replace(model.spec, **eager_layout)).to(next(model.parameters()).device)
    reference.load_state_dict(model.state_dict())
    reference.tau = model.tau
    plain = BilevelOptimizer(reference, opt.config.replace(precision="fp32", cuda_graphs=False, **eager_layout))
    cosine = lambda a, b: F.cosine_similarity(a, b, dim=0).item()   # noqa: E731
    x, y = batch
    rounded = (x.to(torch.bfloat16).to(x.dtype), y)
    out = {}
    for name, arch_pass in (("arch_pass", True), ("weight_pass", False)):
        # the losses of the search step itself, so recorded graphs are reused
        fast_logits, fast_grads = _pass_result(opt, batch, arch_pass)
        logits, grads = _pass_result(plain, batch, arch_pass)
        reference_cosines = {"input_rounded_to_bf16": cosine(_pass_result(plain, rounded, arch_pass)[1], grads)}
        if other_batch is not None:
            reference_cosines["other_batch"] = cosine(_pass_result(plain, other_batch, arch_pass)[1], grads)
        out[name] = {"logits_max_rel_error": ((fast_logits - logits).abs().max() / logits.abs().max()).item(),
                     "grad_cosine": cosine(fast_grads, grads), "reference": reference_cosines,
                     **gradient_differences(_pass_parameters(reference, arch_pass), fast_grads, grads)}
    return out


def profile_steps(step, n: int, device: torch.device, top: int = 25) -> dict:
    """Run ``step(i)`` n times under the profiler: per step, how many kernels (GPU) or aten ops (CPU,
    nested calls included) ran and how long they took, with the ``top`` biggest by time."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(n):
            step(i)
        _sync(device)
    if cuda:   # kernels (and copies) on the device, by their own device time
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        time_of = lambda e: e.self_device_time_total   # noqa: E731
    else:
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        time_of = lambda e: e.self_cpu_time_total      # noqa: E731
    total = sum(time_of(e) for e in events) or 1.0
    events.sort(key=time_of, reverse=True)
    return {"events": "CUDA kernels" if cuda else "aten ops",
            "timed_by": "self device time" if cuda else "self CPU time",
            "calls_per_step": sum(e.count for e in events) / n, "ms_per_step": total / 1000 / n,
            "top": [{"name": e.key[:160], "calls_per_step": e.count / n, "ms_per_step": time_of(e) / 1000 / n,
                     "share": time_of(e) / total} for e in events[:top]]}


class OpCounter(TorchDispatchMode):
    """While active, counts the aten ops that launch a kernel (``calls``, by op name) and the bytes of
    their input and output tensors (``bytes``); views and allocations are left out."""

    NO_KERNEL = {"empty", "empty_like", "empty_strided", "_unsafe_view", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.NO_KERNEL:
            self.calls[name] += 1
            self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                    if isinstance(t, torch.Tensor))
        return out


def count_ops(step, top: int = 12) -> dict:
    """The aten ops of one ``step(0)`` that launch a kernel, and the bytes of their tensors."""
    with OpCounter() as counter:
        step(0)
    return {"ops_per_step": sum(counter.calls.values()), "gb_per_step": sum(counter.bytes.values()) / 1e9,
            "top": [{"op": name, "calls": n, "gb": counter.bytes[name] / 1e9}
                    for name, n in counter.calls.most_common(top)]}


def search_setup(config: SearchConfig, args: argparse.Namespace, device: torch.device
                 ) -> tuple[SearchNetwork, BilevelOptimizer, Callable[[], tuple[torch.Tensor, torch.Tensor]]]:
    """The bench's super-net (seed 0, with CUDA graphs if ``config`` says so), its optimizer, and a function that
    makes the next random CIFAR-shaped batch (``args.batch_size``, ``args.image_size``; seed 0)."""
    torch.manual_seed(0)
    model = SearchNetwork(SupernetSpec.from_config(config, num_classes=10, in_channels=3, stem="cifar")).to(device)
    model.use_cuda_graphs(config.cuda_graphs, after=1)
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=gen).to(device))

    return model, BilevelOptimizer(model, config), batch


class _Memory:
    """The CUDA memory one configuration uses while others stay allocated beside it (configurations
    are timed in turns): its peak above what was allocated when it began, plus what it holds itself."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device, self.held, self.peak = device, 0, 0

    def allocated(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.cuda else 0

    def begin(self) -> int:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self.allocated()

    def end(self, start: int, own_at_start: int) -> None:
        """After a phase that began with ``start`` bytes allocated, ``own_at_start`` of them this
        configuration's."""
        if self.cuda:
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - start + own_at_start)


class Timed:
    """One configuration, built and warmed up, then timed a block of ``--steps`` steps at a time: the
    bench times the configurations in turns (A B C A B C ...), so that a change in the machine's
    load falls on all of them alike. Each block records wall time and the process's CPU time."""

    def __init__(self, config: SearchConfig, label: str, args: argparse.Namespace, device: torch.device):
        self.config, self.label, self.args, self.device = config, label, args, device
        self.memory = _Memory(device)
        start = self.memory.begin()
        model, opt, batch = search_setup(config, args, device)
        self.model, self.opt = model, opt
        self.arch = arch_of(args.arch, config.mode)
        if args.frozen_arch or self.arch:
            for group in (g for o in opt.arch_optimizers() for g in o.param_groups):
                group["lr"] = 0.0
        self.batches = batches = [(batch(), batch()) for _ in range(4)]
        self.full_step = lambda i: opt.step(*batches[i % 4], update_arch=True)      # noqa: E731
        self.weight_step = lambda i: opt.step(*batches[i % 4], update_arch=False)   # noqa: E731
        self.initial_warm = self.initial_valid = None
        if self.arch:
            # The warm-up epochs run weight steps at the initial state, whatever the search settles on
            # (their memory counts in the peak too).
            for i in range(args.warmup):
                self.weight_step(i)
            self.initial_warm = _timed_block(self.weight_step, args.steps, device)
            self.initial_valid = _timed_validation(opt, batches, args.warmup, args.steps, args.repeats, device)
            model.set_architecture(load_genotype(self.arch))
        self.warmup_seconds = _timed_block(self.full_step, args.warmup, device) * args.warmup
        self.memory.end(start, 0)
        self.memory.held = self.memory.allocated() - start
        self.derivations, self.architectures = model.derivations, set()
        self.blocks: list[float] = []
        self.cpu_blocks: list[float] = []

    def _step(self, i: int) -> None:
        self.full_step(i)
        self.architectures.add(self.model.derived.key)

    def block(self) -> None:
        """One timed block: seconds a step, in wall time and in the process's CPU time (every thread's)."""
        start = self.memory.begin()
        cpu = time.process_time()
        self.blocks.append(_timed_block(self._step, self.args.steps, self.device))
        self.cpu_blocks.append((time.process_time() - cpu) / self.args.steps)
        self.memory.end(start, self.memory.held)

    def row(self) -> dict:
        """The configuration's figures, after its blocks (the passes measured here come after them)."""
        config, args, device, model, opt = self.config, self.args, self.device, self.model, self.opt
        derivations_per_step = (model.derivations - self.derivations) / (len(self.blocks) * args.steps)
        start = self.memory.begin()
        self.weight_step(0)   # the weight-only pass of the warm-up epochs (recorded here if it is a new kind)
        warm = _timed_block(self.weight_step, args.steps, device)
        valid = _timed_validation(opt, self.batches, args.warmup, args.steps, args.repeats, device)
        self.memory.end(start, self.memory.held)
        per_step = statistics.median_high(self.blocks)
        cpu_per_step = statistics.median_high(self.cpu_blocks)
        steps = -(-STEPS_PER_EPOCH_CIFAR // args.batch_size)

        def search_seconds(warmup_batch: float, full_batch: float) -> float:
            """Seconds of a search's epochs, ``steps`` batches each: ``warmup_batch`` seconds a batch in the
            warm-up epochs, ``full_batch`` in the others."""
            return steps * (config.arch_warmup_epochs * warmup_batch
                            + (config.epochs - config.arch_warmup_epochs) * full_batch)

        projected = search_seconds(warm if self.initial_warm is None else self.initial_warm, per_step)
        # Every epoch ends with a validation pass over the other 25,000 images (the warm-up epochs' at
        # the initial state, as their steps).
        validation = search_seconds(valid if self.initial_valid is None else self.initial_valid, valid)
        row = {"config": self.label, "arch": self.arch, "mode": config.mode, "placement": config.placement,
               "feature_sharing": config.feature_sharing, "bottleneck_ratio": config.bottleneck_ratio,
               "precision": config.precision, "channels_last": config.channels_last,
               "cuda_graphs": config.cuda_graphs, "op_streams": config.op_streams,
               # the median over the rounds, their spread ((max - min) / median), and each round's
               "seconds_per_step": per_step, "seconds_per_step_spread": _spread(self.blocks),
               "seconds_per_step_blocks": self.blocks,
               "cpu_seconds_per_step": cpu_per_step, "cpu_seconds_per_step_spread": _spread(self.cpu_blocks),
               "cpu_seconds_per_step_blocks": self.cpu_blocks,
               "seconds_per_warmup_step": warm, "warmup_seconds": self.warmup_seconds,
               # --arch: the weight step at the initial state, which the projection's warm-up epochs use
               "seconds_per_warmup_step_initial": self.initial_warm,
               "seconds_per_valid_batch": valid, "seconds_per_valid_batch_initial": self.initial_valid,
               # CUDA: this configuration's own peak (the others' memory left out); the CPU has only
               # the process's, which the end-to-end benchmark gives per configuration
               "peak_memory_mb": self.memory.peak / 2**20 if device.type == "cuda" else None,
               "projected_50_epoch_minutes": projected / 60,
               "projected_50_epoch_minutes_with_validation": (projected + validation) / 60,
               "derivations_per_step": derivations_per_step, "architectures_while_timing": len(self.architectures),
               "genotype": model.genotype().to_dict(),   # derived at the end of timing
               "cuda_graph_stats": dict(model.cuda_graphs.stats) if model.cuda_graphs is not None else None}
        if args.count_ops and not config.cuda_graphs:
            row["op_count"] = count_ops(self.full_step)
        if args.profile:
            row["profile"] = profile_steps(self.full_step, args.profile, device)
        if args.check:
            row["check"] = check_against_eager(opt, self.batches[0][1], self.batches[1][1])
        return row


def _spread(values: list[float]) -> float:
    """(max - min) / median: how far apart the rounds of one configuration were."""
    return (max(values) - min(values)) / statistics.median(values)


def _release(device: torch.device) -> None:
    """Free what one configuration left behind, its CUDA-graph pools included."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entrannas-tune bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["darts", "entrannas", "dst"],
                   help="MODE[+VARIANT...][+KEY=VALUE...]: modes with their default placement, sharing and ratio "
                        "unless KEY=VALUE sets them; "
                        f"variants: {', '.join(VARIANTS)}")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks; the median block is reported")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="default for every config")
    p.add_argument("--channels-last", action="store_true", help="NHWC for every config")
    p.add_argument("--frozen-arch", action="store_true", help="arch lr 0 while timing: a settled structure")
    p.add_argument("--arch", nargs="+", default=None, metavar="[MODE=]GENOTYPE",
                   help="time the search settled at this genotype (zoo name, JSON file or search directory) "
                        "instead of the initial state; MODE=GENOTYPE for one mode only "
                        "(e.g. DARTS_V2 dst=dst.json); implies --frozen-arch")
    p.add_argument("--check", action="store_true", help="compare with the fp32 eager path after timing")
    p.add_argument("--no-tf32", dest="tf32", action="store_false",
                   help="full fp32 convolutions on a GPU (torch's default lets cuDNN use TF32 for them)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile N more steps per config: kernels (GPU) or aten ops (CPU) by time")
    p.add_argument("--count-ops", action="store_true",
                   help="count the kernel-launching aten ops and their bytes in one step (eager configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a search setting for every config (placement, feature_sharing, bottleneck_ratio, "
                        "arch_warmup_epochs, ...); MODE+KEY=VALUE in --configs sets one config's")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default on the CPU: 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (after each config)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        for name in ("layers", "channels", "batch_size", "image_size", "steps", "repeats", "warmup"):
            if getattr(args, name) < 1:
                raise ConfigError("--" + name.replace("_", "-"), getattr(args, name), "must be >= 1")
        if args.profile < 0:
            raise ConfigError("--profile", args.profile, "must be >= 0 (0: no profile)")
        configs = [parse_label(label, args) for label in args.configs]
        device = resolve_device(args.device)
        for config in configs:
            check_device_support(config, device)
        for label, config in zip(args.configs, configs):
            source = arch_of(args.arch, config.mode)
            if source:
                try:   # at the tau the bench times (nothing anneals it)
                    arch_for_genotype(load_genotype(source), config.mode, config.primitives, config.nodes,
                                      tau=INITIAL_TAU)
                except GenotypeError as e:
                    raise ConfigError("--arch", source, f"{label} cannot derive it: {e}") from None
    except (ConfigError, ValueError) as e:
        print(f"entrannas-tune bench: {e}", file=sys.stderr)
        return 2
    # CPU timings on a fixed thread count (1 unless --threads): torch's default follows the cores
    # the machine reports, and a shared machine's second core is not the bench's to count on
    threads, previous_threads = args.threads or (1 if device.type == "cpu" else None), torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    use_fast_kernels(device)
    if not args.tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    doc = {**where_it_ran(device), "date": time.strftime("%Y-%m-%d"),
           # how fp32 convolutions and matrix products ran on a GPU (the check's fp32 reference too)
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
           # whether avg_pool_3x3 runs in NCHW on this device in channels_last configurations (ops.AvgPool)
           "channels_last_pool_grad_wrong": pool_grad_is_wrong(device),
           "command": _command_line(argv),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "results": []}
    if device.type != "cuda":   # the epoch records leave a CPU unnamed; a benchmark names it
        doc["device_name"] = platform.processor() or "cpu"
    rows = doc["results"]
    exit_status = None
    # `timeout` stops a run with SIGTERM: then, as after Ctrl-C, print what was measured so far
    previous = signal.signal(signal.SIGTERM, _stop) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        run_in_turns(args, configs, device, rows, doc)
    except (KeyboardInterrupt, _Stopped) as e:
        how, exit_status = ("interrupted", 130) if isinstance(e, KeyboardInterrupt) else ("stopped (SIGTERM)", 143)
        doc["stopped"] = f"{how} after {len(rows)} of {len(configs)} configurations"
        if args.out is not None:
            write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        torch.set_num_threads(previous_threads)   # a caller in the same process keeps its own
    print(json.dumps(doc, indent=2))
    print(table(rows), file=sys.stderr)
    if exit_status is not None:   # 128 + the signal's number
        print(f"entrannas-tune bench: {doc['stopped']}", file=sys.stderr)
        return exit_status
    return 1 if any("error" in r for r in rows) else 0


def run_in_turns(args: argparse.Namespace, configs: list[SearchConfig], device: torch.device, rows: list[dict],
                 doc: dict) -> None:
    """Build and warm up every configuration, time them in ``--repeats`` rounds of one block each
    (A B C A B C ...), then add a row per configuration to ``rows`` in ``--configs`` order. A
    configuration that fails (a recording error, out of memory) gets an error row and spares the others."""
    timed: list = []
    for label, config in zip(args.configs, configs):
        timed.append(_try(lambda: Timed(config, label, args, device), label))
    for _ in range(args.repeats):
        for i, t in enumerate(timed):
            if isinstance(t, Timed):
                timed[i] = _try(t.block, t.label) or t   # its error row, if the block failed
    for i, config in enumerate(configs):
        t, timed[i] = timed[i], None
        rows.append(_try(t.row, t.label) if isinstance(t, Timed) else t)
        t = None   # its memory is freed with the others' before the next row
        _finish_row(rows, args, doc, device, config)


def _try(make, label: str):
    """``make()``, or an error row for ``label`` (its traceback printed)."""
    try:
        return make()
    except Exception as e:
        traceback.print_exc()
        return {"config": label, "error": f"{type(e).__name__}: {e}"}


class _Stopped(BaseException):
    """SIGTERM while timing (a BaseException, as KeyboardInterrupt: a failing configuration's
    ``except Exception`` must not take it for an error and go on)."""


def _stop(signum, frame):
    raise _Stopped()


def _finish_row(rows: list[dict], args: argparse.Namespace, doc: dict, device: torch.device,
                config: SearchConfig) -> None:
    """After each configuration: the ratios, the JSON so far, and its memory freed."""
    base = next((r for r in rows if r["config"] == "darts" and "error" not in r), None)
    for r in rows:
        if "error" not in r:
            r["speedup_vs_darts"] = base["seconds_per_step"] / r["seconds_per_step"] if base else None
            r["speedup_vs_darts_cpu_time"] = (base["cpu_seconds_per_step"] / r["cpu_seconds_per_step"]
                                              if base else None)
    if args.out is not None:
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    _release(device)


def _command_line(argv) -> str:
    """How this bench was started: the CLI passes ``argv``; a script run leaves it to ``sys.argv``."""
    if argv is not None:
        return " ".join(["entrannas-tune bench", *argv])
    return " ".join([f"python {sys.argv[0]}", *sys.argv[1:]])


def _both_passes(check: dict, key: str) -> str:
    """``arch / weight`` of a check's figure ``key`` (its own or one of its references; - if absent)."""
    values = [check[p].get(key, check[p]["reference"].get(key)) for p in ("arch_pass", "weight_pass")]
    return " / ".join("-" if v is None else f"{v:.3f}" for v in values)


def table(rows: list[dict]) -> str:
    lines = [f"{'config':<28} {'s/step':>8} {'spread':>7} {'x darts':>8} {'x cpu t':>8} {'peak MB':>9} "
             f"{'50 ep (min)':>12} {'+ valid':>8} {'warm-up s':>10} {'archs':>10}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:<28} failed: {r['error'][:80]}")
            continue
        speed = f"{r['speedup_vs_darts']:.2f}" if r.get("speedup_vs_darts") else "-"
        cpu_speed = f"{r['speedup_vs_darts_cpu_time']:.2f}" if r.get("speedup_vs_darts_cpu_time") else "-"
        spread = f"{100 * r['seconds_per_step_spread']:.0f}%" if r.get("seconds_per_step_spread") is not None else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        with_valid = r.get("projected_50_epoch_minutes_with_validation")   # a row built elsewhere may lack it
        with_valid = f"{with_valid:.1f}" if with_valid is not None else "-"
        lines.append(f"{r['config']:<28} {r['seconds_per_step']:>8.3f} {spread:>7} {speed:>8} {cpu_speed:>8} {peak:>9} "
                     f"{r['projected_50_epoch_minutes']:>12.1f} {with_valid:>8} {r['warmup_seconds']:>10.1f} "
                     f"{r['architectures_while_timing']:>10}")
    lines.append("(s/step: the median of the rounds, in which the configurations took turns; spread: (max - min) / "
                 "median over the rounds; x cpu t: the speed-up in process CPU time)")
    lines.append("(+ valid: the 50-epoch projection with each epoch's validation pass; archs: derived "
                 "architectures seen while timing; with graphs each new one is recorded when first seen: use "
                 "--frozen-arch or --arch for a settled search)")
    settled = {r["config"]: r["arch"] for r in rows if r.get("arch")}
    if settled:
        where = ", ".join(f"{config} at {arch}" for config, arch in settled.items())
        lines.append(f"(timed settled: {where}; the 50-epoch projection counts the warm-up epochs at the initial "
                     "state's weight step and validation pass)")
    counted = [r for r in rows if r.get("op_count")]
    if counted:
        lines.append("")
    for r in counted:
        c = r["op_count"]
        lines.append(f"{r['config']}: {c['ops_per_step']} kernel-launching ops per step, {c['gb_per_step']:.2f} GB "
                     f"in their tensors; most: " + ", ".join(f"{t['op']} {t['calls']}" for t in c["top"][:4]))
    checked = [r for r in rows if r.get("check")]
    if checked:
        lines.append("\ncheck against fp32 eager: logits error, gradient cosine arch / weight pass "
                     "(references, fp32 eager against itself: input rounded to bf16; another batch)")
    for r in checked:
        c = r["check"]
        lines.append(f"  {r['config']:<28} {max(c[p]['logits_max_rel_error'] for p in c):.1e}  "
                     f"{_both_passes(c, 'grad_cosine')}  "
                     f"(rounded input {_both_passes(c, 'input_rounded_to_bf16')}; "
                     f"other batch {_both_passes(c, 'other_batch')})")
        worst = c["weight_pass"].get("largest_differences")
        if worst and c["weight_pass"]["grad_cosine"] < 0.999:
            lines.append("    weight pass, most of the difference: " + ", ".join(
                f"{w['parameter']} ({w['share_of_difference']:.0%}; cosine {w['cosine']:.2f}, "
                f"{w['share_of_gradient']:.0%} of the gradient)" for w in worst))
            lines.append("    weight pass, cosine by block from the output back: " + ", ".join(
                f"{b['block']} {b['cosine']:.3f}" for b in c["weight_pass"].get("by_block", ())))
    for r in rows:
        prof = r.get("profile")
        if prof:
            lines.append(f"\n{r['config']}: {prof['calls_per_step']:.0f} {prof['events']} per step, "
                         f"{prof['ms_per_step']:.1f} ms per step in them; the biggest:")
            lines.extend(f"  {t['share']:6.1%} {t['ms_per_step']:8.2f} ms {t['calls_per_step']:7.0f} x  "
                         f"{t['name'][:70]}" for t in prof["top"][:8])
    return "\n" + "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
