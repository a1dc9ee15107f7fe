"""Fast passes for the super-net, one per derived structure: ``torch.compile`` or CUDA-graph capture.

A Transit-cell runs a different graph whenever the derived architecture changes, so a compiled or
captured super-net is specialised to one structure (and to the kind of pass: arch step, weight
step, evaluation; the input shape and dtype). Early in a search the structure can change every
step, and building for each one would cost more than it saves; once the search settles it changes
rarely (an EnTranNAS search measured on digits had not settled after 40 epochs: BENCHMARKS.md; a
super-net with masked Transit-cells has one structure throughout). So a structure runs eagerly
until it has been used ``after`` times in a row for one kind of pass, and is built then
(``HotStructures``); with ``transit: auto`` the masked structure's built pass runs instead of the
eager one meanwhile (a ``fallback``). Two ways to build:

- ``CompiledStructures``: ``torch.compile`` (dynamo, AOTAutograd, a backend). Costly to build (tens
  of seconds per structure on a GPU), so at most ``capacity`` structures are built and later ones
  stay eager (with a warning).
- ``CapturedStructures`` (``compile: capture``, CUDA only): the eager kernels of each pass recorded
  as CUDA graphs with ``torch.cuda.make_graphed_callables``, no tracing or code generation, so a
  build costs about one eager step. The ``capacity`` most recently used structures are kept.

Either way the same arithmetic is scheduled differently: the tests compare outputs, gradients and
whole training trajectories with the eager path.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from typing import Callable, Optional, Union

import torch
from torch import nn

#: ``torch.compile`` modes; the ones that capture CUDA graphs replay a whole pass as one launch.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: The ``compile`` setting that records CUDA graphs directly instead of calling ``torch.compile``.
CAPTURE = "capture"
#: Steps in a row at one derived structure before it is compiled. Compiling pays only once a
#: structure has run long enough to win back the time spent building its graphs; waiting that long
#: first (the ski-rental rule) costs at most twice the best choice made in hindsight. On an H200,
#: EnTranNAS with CUDA graphs and bf16 wins back its ~51 s of building after ~370 steps
#: (BENCHMARKS.md), hence 400.
DEFAULT_AFTER = 400
#: The same rule for ``capture``: recording runs ``CAPTURE_WARMUP`` eager pass of each kind and then
#: the host's half of one more (the kernels are recorded, not run), about one eager step in all. On
#: an H200 4 warm-up steps with the recording took 0.7-1.9 s (session 8), an eager bf16 channels_last
#: EnTranNAS step about 0.2 s (sessions 3 and 8) and a recorded one 0.046 s, so a recording is won
#: back after a few steps.
#: Early in a search the derived architecture lasts only a few steps (BENCHMARKS.md), so a short wait
#: matters.
CAPTURE_AFTER = 3
#: At most this many derived structures are built.
DEFAULT_CAPACITY = 16
#: Eager passes ``make_graphed_callables`` runs on its side stream before recording: the structure
#: has already run eagerly, so cuDNN's algorithm choice and lazy initialisation are done except the
#: side stream's own handles.
CAPTURE_WARMUP = 1


def compile_backends() -> list[str]:
    """Every registered ``torch.compile`` backend, the debugging ones (``aot_eager``...) included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def default_after(mode: str) -> int:
    return CAPTURE_AFTER if mode == CAPTURE else DEFAULT_AFTER


class HotStructures:
    """Call ``fn(structure.plans, *args)``, through a built fast pass once the structure is hot.

    ``stats`` counts ``compiled_calls`` (fast passes), ``eager_calls``, ``fallback_calls`` (passes
    handed to a caller's ``fallback``) and ``compiles`` (structures built; each is built once per
    kind of pass)."""

    def __init__(self, fn: Callable, after: int, capacity: int):
        if after < 1 or capacity < 1:
            raise ValueError(f"after ({after}) and capacity ({capacity}) must be >= 1")
        self.fn, self.after, self.capacity = fn, after, capacity
        self._streak: dict[tuple, tuple[bytes, int]] = {}   # kind -> (structure, uses in a row)
        self.stats: Counter = Counter()

    def kind(self, args) -> tuple:
        """What besides the structure needs another build."""
        x, weights = args[0], args[1:]
        return (tuple(x.shape), x.dtype, x.device, torch.is_grad_enabled(),
                tuple(w.requires_grad for w in weights), torch.is_autocast_enabled(x.device.type))

    def __call__(self, structure, *args, fallback: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
        """The pass for ``structure``: its fast pass where built, else ``fallback()`` if given (it must
        compute the same), else the eager pass. The use counts towards the structure's streak either way."""
        kind = self.kind(args)
        fast = self._fast(structure, kind, args)
        if fast is None:
            if fallback is not None:
                self.stats["fallback_calls"] += 1
                return fallback()
            self.stats["eager_calls"] += 1
            return self.fn(structure.plans, *args)
        self.stats["compiled_calls"] += 1
        return fast(*args)

    def _hot(self, structure: bytes, kind: tuple) -> bool:
        """Counts this use; whether the structure has now run ``after`` times in a row."""
        last, uses = self._streak.get(kind, (None, 0))
        uses = uses + 1 if last == structure else 1
        self._streak[kind] = (structure, uses)
        return uses >= self.after

    def _fast(self, structure, kind: tuple, args) -> Optional[Callable]:
        """The fast pass to run, or None for the eager one."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget what was built (the parameters it reads may have been replaced)."""


class CompiledStructures(HotStructures):
    """``torch.compile`` per hot structure; once ``capacity`` structures are compiled, later ones
    stay eager."""

    def __init__(self, fn: Callable, mode: str = "default", backend: Union[str, Callable] = "inductor",
                 after: int = DEFAULT_AFTER, capacity: int = DEFAULT_CAPACITY):
        if mode not in COMPILE_MODES or mode == "off":
            raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES[1:])}")
        super().__init__(fn, after, capacity)
        self.mode, self.backend = mode, backend
        options = {"mode": mode} if backend == "inductor" else {}
        # dynamic=False: a smaller last batch gets its own graph instead of making every graph dynamic.
        self._compiled = torch.compile(fn, backend=backend, dynamic=False, **options)
        self._built: set[tuple] = set()          # (structure, kind) pairs that run compiled
        self._structures: set[bytes] = set()     # structures compiled at all, for the capacity
        self._warned = False
        # Every structure is a recompilation of the same function for dynamo: lift its limits
        # (graphs per structure: kinds of pass x batch shapes, with room). Older names as fallback.
        limit = 12 * capacity
        config = torch._dynamo.config
        names = (("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit")
                 else ("cache_size_limit", "accumulated_cache_size_limit"))
        self._limits = {name: max(getattr(config, name), limit) for name in names if hasattr(config, name)}

    def _fast(self, structure, kind: tuple, args) -> Optional[Callable]:
        key = (structure.key, kind)
        if key not in self._built:
            if not (self._hot(structure.key, kind) and self._admit(structure.key)):
                return None
            self._built.add(key)
        return lambda *a: self._run(structure.plans, *a)

    def _admit(self, structure: bytes) -> bool:
        if structure in self._structures:
            return True
        if len(self._structures) < self.capacity:
            self._structures.add(structure)
            self.stats["compiles"] += 1
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.capacity} derived structures are compiled already (compile_cache); "
                          "new ones are not compiled (they run eagerly, or with transit auto through the masked "
                          "structure's pass). Raise compile_cache or compile_after.", stacklevel=4)
        return False

    def _run(self, plans, *args) -> torch.Tensor:
        if (self.mode in CUDA_GRAPH_MODES or self.backend == "cudagraphs") and args[0].is_cuda:
            # Each pass starts a new CUDA-graph generation: the outputs of the previous pass are
            # consumed by then (losses and gradients are computed right after each forward).
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(self._limits):
            return self._compiled(plans, *args)


class _StructurePass(nn.Module):
    """One structure's pass as a module whose parameters are the net's, so that the graphed
    callable returns their gradients."""

    def __init__(self, fn: Callable, net: nn.Module, plans):
        super().__init__()
        self.fn, self.net, self.plans = fn, net, plans

    def forward(self, *args) -> torch.Tensor:
        return self.fn(self.plans, *args)


def capture_cuda_graphs(fn: Callable, net: nn.Module, plans, args: tuple, pool) -> Callable:
    """Record one pass of ``fn(plans, *args)`` as CUDA graphs; returns a drop-in callable.

    With autograd on: ``make_graphed_callables`` records the forward and the backward (gradients for
    the inputs that require them and for the net's parameters that do). Without (evaluation): the
    forward alone. Inputs are copied into the graph's own tensors at each call; the parameters are
    read in place, so optimizer updates are seen. The output is the graph's tensor, overwritten by
    the next replay of the same graph: a step consumes it before then.

    The parameters' gradients are handed back the same way: ``AccumulateGrad`` keeps them as their
    ``.grad`` without a copy, so a ``.grad`` is overwritten by the next backward of the same graph and
    must not be accumulated into across two of them (pytorch/pytorch#181723). The weight step sets
    every ``.grad`` to None first, and the frozen-weight arch pass computes none.

    All graphs share ``pool``. That is safe because a pass's forward and backward always run one
    right after the other, so no replay can overwrite memory that another graph still needs
    between its two halves, and the memory every graph keeps (its inputs, outputs, gradients) is
    never handed to another."""
    static = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in args)
    if torch.is_grad_enabled():
        return torch.cuda.make_graphed_callables(_StructurePass(fn, net, plans), static,
                                                 num_warmup_iters=CAPTURE_WARMUP, allow_unused_input=True,
                                                 pool=pool)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CAPTURE_WARMUP):
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


class CapturedStructures(HotStructures):
    """CUDA graphs per hot structure and kind of pass (``compile: capture``); the ``capacity`` most
    recently used structures are kept, an older one is dropped when a new one is built.

    ``capture(fn, net, plans, args, pool)`` builds one (``capture_cuda_graphs``; the tests pass a
    stand-in to check this policy on the CPU)."""

    def __init__(self, fn: Callable, net: nn.Module, after: int = CAPTURE_AFTER,
                 capacity: int = DEFAULT_CAPACITY, capture: Callable = capture_cuda_graphs):
        super().__init__(fn, after, capacity)
        self.net, self.capture = net, capture
        # LRU: structure -> kind of pass -> its graphed pass (None where recording failed)
        self._graphs: OrderedDict[bytes, dict[tuple, Optional[Callable]]] = OrderedDict()
        self._pool = None
        self._params: Optional[list[nn.Parameter]] = None

    def kind(self, args) -> tuple:
        # A graph computes gradients for the parameters that required them when it was recorded
        # (the arch step freezes the weights), and its batch norms normalise as they did then (by
        # the batch in training mode, by the running statistics in evaluation mode): both are part
        # of the kind too.
        if self._params is None:
            self._params = list(self.net.parameters())
        return super().kind(args) + (tuple(p.requires_grad for p in self._params), self.net.training)

    def _fast(self, structure, kind: tuple, args) -> Optional[Callable]:
        passes = self._graphs.get(structure.key)
        if passes is not None:
            self._graphs.move_to_end(structure.key)
            if kind in passes:
                return passes[kind]   # None: recording it failed
        if not self._hot(structure.key, kind):
            return None
        if passes is None:
            if len(self._graphs) >= self.capacity:
                self._graphs.popitem(last=False)
                self.stats["evictions"] += 1
            passes = self._graphs[structure.key] = {}
            self.stats["compiles"] += 1
        if self._pool is None and args[0].is_cuda:
            self._pool = torch.cuda.graph_pool_handle()
        self.stats["captures"] += 1
        try:
            passes[kind] = self.capture(self.fn, self.net, structure.plans, args, self._pool)
        except Exception as e:   # a pass CUDA cannot record runs eagerly; the search goes on
            passes[kind] = None
            self.stats["capture_failures"] += 1
            warnings.warn(f"recording a derived structure's pass as CUDA graphs failed; it runs eagerly "
                          f"({type(e).__name__}: {e})", stacklevel=4)
        return passes[kind]

    def clear(self) -> None:
        self._graphs.clear()
        self._streak.clear()
        self._params = None
