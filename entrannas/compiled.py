"""``torch.compile`` for the super-net, one compiled graph per derived structure.

A Transit-cell runs a different graph whenever the derived architecture changes, so a compiled
super-net is specialised to one structure (and to the kind of pass: arch step, weight step,
evaluation; the input shape and dtype). Early in a search the structure can change every step, and
compiling each one would cost more than it saves; once the search settles it changes rarely. So a
structure runs eagerly until it has been used ``after`` times in a row for one kind of pass, and is
compiled then; at most ``capacity`` structures are compiled, later ones stay eager (with a warning).

Compiling changes how the same arithmetic is scheduled, not what it computes: the tests compare
outputs, gradients and whole training trajectories with the eager path.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Callable, Union

import torch

#: ``torch.compile`` modes; the ones that capture CUDA graphs replay a whole pass as one launch.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
#: Steps in a row at one derived structure before it is compiled. Compiling pays only once a
#: structure has run long enough to win back the time spent building its graphs; waiting that long
#: first (the ski-rental rule) costs at most twice the best choice made in hindsight. On an H200,
#: EnTranNAS with CUDA graphs and bf16 wins back its ~51 s of building after ~370 steps
#: (BENCHMARKS.md), hence 400.
DEFAULT_AFTER = 400
#: At most this many derived structures are compiled; later ones run eagerly.
DEFAULT_CAPACITY = 16


def compile_backends() -> list[str]:
    """Every registered ``torch.compile`` backend, the debugging ones (``aot_eager``...) included."""
    import torch._dynamo

    return sorted(torch._dynamo.list_backends(exclude_tags=()))


class CompiledStructures:
    """Call ``fn(structure.plans, *args)``, compiled per structure once it is hot.

    ``stats`` counts ``compiled_calls``, ``eager_calls`` and ``compiles`` (structures handed to the
    compiler; each is traced once per kind of pass)."""

    def __init__(self, fn: Callable, mode: str = "default", backend: Union[str, Callable] = "inductor",
                 after: int = DEFAULT_AFTER, capacity: int = DEFAULT_CAPACITY):
        if mode not in COMPILE_MODES or mode == "off":
            raise ValueError(f"compile mode {mode!r}: allowed {', '.join(COMPILE_MODES[1:])}")
        if after < 1 or capacity < 1:
            raise ValueError(f"after ({after}) and capacity ({capacity}) must be >= 1")
        self.fn, self.mode, self.backend, self.after, self.capacity = fn, mode, backend, after, capacity
        options = {"mode": mode} if backend == "inductor" else {}
        # dynamic=False: a smaller last batch gets its own graph instead of making every graph dynamic.
        self._compiled = torch.compile(fn, backend=backend, dynamic=False, **options)
        self._hot: set[tuple] = set()            # (structure, kind) pairs that run compiled
        self._structures: set[bytes] = set()     # structures compiled at all, for the capacity
        self._streak: dict[tuple, tuple[bytes, int]] = {}   # kind -> (structure, uses in a row)
        self.stats: Counter = Counter()
        self._warned = False
        # Every structure is a recompilation of the same function for dynamo: lift its limits
        # (graphs per structure: kinds of pass x batch shapes, with room). Older names as fallback.
        limit = 12 * capacity
        config = torch._dynamo.config
        names = (("recompile_limit", "accumulated_recompile_limit") if hasattr(config, "recompile_limit")
                 else ("cache_size_limit", "accumulated_cache_size_limit"))
        self._limits = {name: max(getattr(config, name), limit) for name in names if hasattr(config, name)}

    @staticmethod
    def kind(args) -> tuple:
        """What besides the structure makes dynamo trace a new graph."""
        x, weights = args[0], args[1:]
        return (tuple(x.shape), x.dtype, x.device, torch.is_grad_enabled(),
                tuple(w.requires_grad for w in weights), torch.is_autocast_enabled(x.device.type))

    def __call__(self, structure, *args) -> torch.Tensor:
        kind = self.kind(args)
        key = (structure.key, kind)
        if key not in self._hot and self._becomes_hot(structure.key, kind):
            self._hot.add(key)
            if structure.key not in self._structures:
                self._structures.add(structure.key)
                self.stats["compiles"] += 1
        if key not in self._hot:
            self.stats["eager_calls"] += 1
            return self.fn(structure.plans, *args)
        self.stats["compiled_calls"] += 1
        if (self.mode in CUDA_GRAPH_MODES or self.backend == "cudagraphs") and args[0].is_cuda:
            # Each pass starts a new CUDA-graph generation: the outputs of the previous pass are
            # consumed by then (losses and gradients are computed right after each forward).
            torch.compiler.cudagraph_mark_step_begin()
        with torch._dynamo.config.patch(self._limits):
            return self._compiled(structure.plans, *args)

    def _becomes_hot(self, structure: bytes, kind: tuple) -> bool:
        last, uses = self._streak.get(kind, (None, 0))
        uses = uses + 1 if last == structure else 1
        self._streak[kind] = (structure, uses)
        if uses < self.after:
            return False
        if structure in self._structures:
            return True
        if len(self._structures) < self.capacity:
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(f"{self.capacity} derived structures are compiled already (compile_cache); "
                          "new ones run eagerly. Raise compile_cache or compile_after.", stacklevel=3)
        return False
