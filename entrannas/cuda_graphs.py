"""The fast path (``cuda_graphs: true``, CUDA only): each hot derived architecture's passes recorded
as CUDA graphs from the eager kernels, with ``torch.cuda.make_graphed_callables``.

A Transit-cell runs another graph whenever the derived architecture changes, so a recording is
specialised to one derived architecture and one kind of pass (arch step, weight step, evaluation;
the input's shape and dtype). Early in a search the architecture can change at every step;
recording costs about one eager step, so an architecture is recorded once it has run ``AFTER``
times in a row for one kind of pass, and the ``CAPACITY`` most recently used are kept. The same arithmetic as the eager pass: the tests
compare outputs, gradients and whole training trajectories.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

#: Uses in a row before a derived architecture is recorded (recording costs about one eager step).
AFTER = 3
#: Recorded architectures kept, the most recently used.
CAPACITY = 16
#: Eager passes ``make_graphed_callables`` runs on its side stream before recording (the architecture has
#: run eagerly already, so cuDNN's algorithm choice is made).
WARMUP = 1


class _StructurePass(nn.Module):
    """One derived architecture's pass as a module whose parameters are the net's, so that the graphed
    callable returns their gradients."""

    def __init__(self, fn: Callable, net: nn.Module, plans):
        super().__init__()
        self.fn, self.net, self.plans = fn, net, plans

    def forward(self, *args) -> torch.Tensor:
        return self.fn(self.plans, *args)


def capture_cuda_graphs(fn: Callable, net: nn.Module, plans, args: tuple, pool) -> Callable:
    """Record one pass of ``fn(plans, *args)`` as CUDA graphs; returns a drop-in callable.

    With autograd on, the forward and the backward are recorded (gradients for the inputs that require
    them and for the net's parameters that do); without (evaluation), the forward alone. Inputs are
    copied into the graph's own tensors at each call; parameters are read in place, so optimizer
    updates are seen. The output is the graph's tensor, overwritten by its next replay: a step consumes
    it before then. The parameters' ``.grad`` are the graph's buffers too, overwritten by the next
    backward of the same graph, so a loop must set ``.grad`` to None before each backward and never
    accumulate over two (pytorch/pytorch#181723); the search does. All graphs share ``pool``: a pass's
    forward and backward run one right after the other, so no replay overwrites memory another graph
    still needs."""
    static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    if torch.is_grad_enabled():
        return torch.cuda.make_graphed_callables(_StructurePass(fn, net, plans), static, num_warmup_iters=WARMUP,
                                                 allow_unused_input=True, pool=pool)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(WARMUP):
            fn(plans, *static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(plans, *static)

    def replay(*inputs: torch.Tensor) -> torch.Tensor:
        for s, x in zip(static, inputs):
            s.copy_(x)
        graph.replay()
        return out

    return replay


class CudaGraphs:
    """Runs ``fn(derived.plans, *args)`` eagerly, or through its recorded graphs once the derived
    architecture is hot. ``capture`` records one pass (the tests pass a stand-in to check the policy on the CPU).
    ``stats`` counts ``recorded_calls``, ``eager_calls``, ``captures``, ``evictions`` and
    ``capture_failures``."""

    def __init__(self, fn: Callable, net: nn.Module, after: int = AFTER, capacity: int = CAPACITY,
                 capture: Callable = capture_cuda_graphs):
        if after < 1 or capacity < 1:
            raise ValueError(f"after ({after}) and capacity ({capacity}) must be >= 1")
        self.fn, self.net, self.after, self.capacity, self.capture = fn, net, after, capacity, capture
        self._streak: dict[tuple, tuple[bytes, int]] = {}   # kind -> (architecture key, uses in a row)
        # LRU: architecture key -> kind of pass -> its graphed pass (None where recording failed)
        self._graphs: OrderedDict[bytes, dict[tuple, Optional[Callable]]] = OrderedDict()
        self._pool = None
        self._params: Optional[list[nn.Parameter]] = None
        self.stats: Counter = Counter()

    def kind(self, args) -> tuple:
        """What besides the architecture needs another recording: the input's shape, dtype and device,
        autograd, which inputs and parameters require gradients (the arch step freezes the weights),
        autocast, and training or evaluation mode (how batch norms normalise)."""
        if self._params is None:
            self._params = list(self.net.parameters())
        x, weights = args[0], args[1:]
        return (tuple(x.shape), x.dtype, x.device, torch.is_grad_enabled(), tuple(w.requires_grad for w in weights),
                torch.is_autocast_enabled(x.device.type), tuple(p.requires_grad for p in self._params),
                self.net.training)

    def __call__(self, derived, *args) -> torch.Tensor:
        recorded = self._recorded(derived, self.kind(args), args)
        if recorded is None:
            self.stats["eager_calls"] += 1
            return self.fn(derived.plans, *args)
        self.stats["recorded_calls"] += 1
        return recorded(*args)

    def _hot(self, key: bytes, kind: tuple) -> bool:
        """Counts this use; whether the architecture ``key`` has now run ``after`` times in a row."""
        last, uses = self._streak.get(kind, (None, 0))
        uses = uses + 1 if last == key else 1
        self._streak[kind] = (key, uses)
        return uses >= self.after

    def _recorded(self, derived, kind: tuple, args) -> Optional[Callable]:
        passes = self._graphs.get(derived.key)
        if passes is not None:
            self._graphs.move_to_end(derived.key)
            if kind in passes:
                return passes[kind]   # None: recording it failed
        if not self._hot(derived.key, kind):
            return None
        if passes is None:
            if len(self._graphs) >= self.capacity:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
            passes = self._graphs[derived.key] = {}
        if self._pool is None and args[0].is_cuda:
            self._pool = torch.cuda.graph_pool_handle()
        self.stats["captures"] += 1
        try:
            passes[kind] = self.capture(self.fn, self.net, derived.plans, args, self._pool)
        except Exception as e:   # a pass CUDA cannot record runs eagerly; the search goes on
            passes[kind] = None
            self.stats["capture_failures"] += 1
            warnings.warn(f"recording a derived architecture's pass as CUDA graphs failed; it runs eagerly "
                          f"({type(e).__name__}: {e})", stacklevel=3)
        return passes[kind]

    def clear(self) -> None:
        """Forget every recording (the parameters they read may have been replaced)."""
        self._graphs.clear()
        self._streak.clear()
        self._params = None
