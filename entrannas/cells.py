"""The search cell (Sec. 2.2-2.5): one class for Engine-cells (Eq. 6, every op weighted) and
Transit-cells (Eq. 3, the plain sum of the derived ops), with feature sharing and the bottleneck.

``reference_cell`` is the method as the paper writes it, edge by edge and op by op; ``SearchCell``
computes the same faster (each op feature once per source, one matrix product per source for an
Engine-cell's nodes, a Transit-cell's partial sums shared between nodes), and a test holds the two
equal. A ``CellPlan`` says what one cell computes for one derived architecture.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import derive
from .genotype import N_INPUTS
from .ops import FactorizedReduce, ReLUConvBN, ReLUFirst, build_op


class DegenerateArchitecture(RuntimeError):
    """A derived cell that cannot run: with finite alpha and beta this cannot happen (Eq. 8 keeps one input a node)."""


class CellPlan:
    """What one cell computes for one derived architecture (``mask[e, k]``: op k on edge e is used).

    With feature sharing a *slot* is a source state (ops indexed by source node, Sec. 2.3); without it,
    a slot is an edge. An Engine-cell computes ``slot_ops[s]`` (op indices) on slot s, stacked, and
    mixes them for every node that takes the slot in one matrix product: ``mixes[m]`` is
    ``(slot, source state, lo, n_rows, n_ops)``, whose coefficients ``coef[lo:lo + n_rows * n_ops]``
    form an ``[n_rows, n_ops]`` matrix, one row per node; ``terms[j]`` lists the ``(mix, row)`` node
    j adds up. ``rows``/``cols`` index those coefficients in an ``[E, K]`` weight matrix.

    A Transit-cell adds up the derived ops themselves (Eq. 3: no coefficients): ``kept[j]`` lists
    the ``(slot, source state, op)`` summed into node j. Summed per source first: ``groups`` are the
    distinct ``(slot, source state, ops)`` partial sums and ``node_groups[j]`` the ones node j adds
    up, so that a partial sum several nodes take (DST's dense cells: every op of a source into every
    later node) is added once, and its gradient is accumulated once rather than once per op.
    """

    def __init__(self, mask: torch.Tensor, n_nodes: int, sharing: bool, device: torch.device):
        layout = derive.edge_layout(n_nodes, N_INPUTS)
        slot_of_edge = [i if sharing else e for e, (i, _) in enumerate(layout)]
        kept = [[k for k, on in enumerate(row) if on] for row in mask.tolist()]   # per edge
        used: dict[int, set[int]] = {}
        uses: dict[int, list[int]] = {}          # slot -> the kept edges that take it, in edge order
        self.kept: list[list[tuple[int, int, int]]] = [[] for _ in range(n_nodes)]
        for e, (i, j) in enumerate(layout):
            if kept[e]:
                used.setdefault(slot_of_edge[e], set()).update(kept[e])
                uses.setdefault(slot_of_edge[e], []).append(e)
                self.kept[j] += [(slot_of_edge[e], i, k) for k in kept[e]]
        self.slot_ops = {s: tuple(sorted(ks)) for s, ks in used.items()}

        self.mixes: list[tuple[int, int, int, int, int]] = []
        self.terms: list[list[tuple[int, int]]] = [[] for _ in range(n_nodes)]
        rows, cols = [], []
        # Slots in order of their first edge, so each node's terms come source by source, as its edges
        # do; a slot's coefficient rows are contiguous.
        for slot, edges in uses.items():
            ks = self.slot_ops[slot]
            for r, e in enumerate(edges):
                self.terms[layout[e][1]].append((len(self.mixes), r))
            self.mixes.append((slot, layout[edges[0]][0], len(rows), len(edges), len(ks)))
            for e in edges:
                rows += [e] * len(ks)
                cols += ks

        index: dict[tuple[int, int, tuple[int, ...]], int] = {}
        self.node_groups: list[list[int]] = []
        for node_kept in self.kept:
            by_source: dict[tuple[int, int], list[int]] = {}
            for slot, i, k in node_kept:
                by_source.setdefault((slot, i), []).append(k)
            self.node_groups.append([index.setdefault((slot, i, tuple(ks)), len(index))
                                     for (slot, i), ks in by_source.items()])
        self.groups: list[tuple[int, int, tuple[int, ...]]] = sorted(index, key=index.__getitem__)
        for j, node_kept in enumerate(self.kept):
            if not node_kept:
                raise DegenerateArchitecture(f"the derived cell leaves node {j + N_INPUTS} without inputs "
                                             "(non-finite architecture parameters?)")
        self.rows = _index_tensor(rows, device)
        self.cols = _index_tensor(cols, device)


def _index_tensor(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor on ``device``. To a GPU through page-locked memory, without
    waiting: a copy from pageable memory would sync, and a new derived architecture builds its plans
    inside a search step (its one sync, the derivation, has already happened)."""
    index = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def weighted_sums(weights: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``[n, K]`` weights times stacked features ``[K, B, C, H, W]`` -> ``[n, B, C, H, W]``, one
    matrix product in the features' memory order (channels_last stays channels_last, with no copy)."""
    one = feats[0]
    if not one.is_contiguous() and one.is_contiguous(memory_format=torch.channels_last):
        return torch.tensordot(weights, feats.permute(0, 1, 3, 4, 2), dims=1).permute(0, 1, 4, 2, 3)
    return torch.tensordot(weights, feats, dims=1)


class OpStreams:
    """Runs the candidate ops of one source on up to ``n`` CUDA streams at once (``op_streams``).

    After the bottleneck an op works on a few channels, so its kernels leave most of a GPU idle, and
    on one stream (or in a CUDA graph recorded from one) each waits for the previous. Here the side
    streams wait for the current one, the ops are dealt out round-robin (the first to the current
    stream), and the current stream waits for every side stream before anything reads the results:
    a fork and a join per source. Backward ops run on their forward op's stream (autograd's rule),
    so the backward pass forks the same way, and a CUDA graph recorded from this keeps the branches.
    Between fork and join the current stream has no other work and the sources stay referenced, so
    no memory changes hands between streams while in use. One stream, or a CPU, runs them in turn.
    """

    def __init__(self, n: int):
        self.n = n
        self._side: dict[torch.device, list] = {}

    def prepare(self, device: torch.device) -> None:
        """Create the side streams for ``device`` (before any recording: creating one is no stream work)."""
        if self.n > 1 and device.type == "cuda" and device not in self._side:
            self._side[device] = [torch.cuda.Stream(device) for _ in range(self.n - 1)]

    def run(self, fns: Sequence, device: torch.device) -> list[torch.Tensor]:
        """``[fn() for fn in fns]``, on several streams where there are several and ``device`` is CUDA."""
        side = self._side.get(device) if len(fns) > 1 else None
        if not side:
            return [fn() for fn in fns]
        main = torch.cuda.current_stream(device)
        lanes = [main] + side[:len(fns) - 1]
        for stream in lanes[1:]:
            stream.wait_stream(main)
        out = []
        for index, fn in enumerate(fns):
            with torch.cuda.stream(lanes[index % len(lanes)]):
                out.append(fn())
        for stream in lanes[1:]:
            main.wait_stream(stream)
        return out




class Conv1x1BN(nn.Sequential):
    """The bottleneck's channel-changing 1x1 conv (Sec. 2.5); conv + BN is our choice of layers."""

    def __init__(self, C_in: int, C_out: int):
        super().__init__(nn.Conv2d(C_in, C_out, 1, bias=False), nn.BatchNorm2d(C_out, affine=False))


class SearchCell(nn.Module):
    def __init__(self, primitives: Sequence[str], n_nodes: int, C_pp: int, C_p: int, C: int,
                 reduction: bool, reduction_prev: bool, sharing: bool, ratio: int, engine: bool):
        super().__init__()
        self.reduction, self.engine, self.sharing, self.n_nodes = reduction, engine, sharing, n_nodes
        self.preprocess0 = (FactorizedReduce(C_pp, C, affine=False) if reduction_prev
                            else ReLUConvBN(C_pp, C, 1, 1, 0, affine=False))
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0, affine=False)
        C_op = C // ratio
        n_sources = N_INPUTS + n_nodes - 1   # the last node feeds no op
        if ratio > 1:
            self.squeeze = nn.ModuleList(Conv1x1BN(C, C_op) for _ in range(n_sources))
            self.expand = nn.ModuleList(Conv1x1BN(C_op, C) for _ in range(n_nodes))
        else:
            self.squeeze = self.expand = None
        sources = (range(n_sources) if sharing
                   else [i for i, _ in derive.edge_layout(n_nodes, N_INPUTS)])
        self.ops = nn.ModuleList(
            nn.ModuleList(build_op(name, C_op, 2 if reduction and i < N_INPUTS else 1, affine=False,
                                   search=True) for name in primitives)
            for i in sources)

    def unused_parameters(self, plan: CellPlan) -> list[nn.Parameter]:
        """The parameters this cell leaves unused when it runs ``plan`` sparsely: the ops outside
        its derived set, and the bottleneck convs of the sources that feed none of them."""
        used_sources = {source for _, source, _, _, _ in plan.mixes}
        unused = [p for slot, ops in enumerate(self.ops) for k, op in enumerate(ops)
                  if k not in plan.slot_ops.get(slot, ()) for p in op.parameters()]
        if self.squeeze is not None:
            unused += [p for i, conv in enumerate(self.squeeze) if i not in used_sources for p in conv.parameters()]
        return unused

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, plan: CellPlan,
                coef: Optional[torch.Tensor] = None, streams: Optional[OpStreams] = None,
                inputs_relu: bool = False) -> torch.Tensor:
        """An Engine-cell's output with the coefficients ``coef`` (see ``CellPlan``), or with
        ``coef=None`` a Transit-cell's: the plain sum of the derived ops. ``streams`` runs the ops of a
        source side by side. ``inputs_relu``: ``s0`` and ``s1`` have been through the ReLU that begins
        both preprocessings (the network applies it once to each state, for the two cells that take it)."""
        if not inputs_relu:   # a cell called on its own
            s0, s1 = F.relu(s0), F.relu(s1)
        states = [self.preprocess0.forward_from_relu(s0), self.preprocess1.forward_from_relu(s1)]
        squeezed: dict[int, torch.Tensor] = {}
        activated: dict[int, torch.Tensor] = {}
        features: dict[tuple[int, int], torch.Tensor] = {}   # (slot, op) -> [B, C, H, W]

        def source(i: int) -> torch.Tensor:
            if i not in squeezed:
                squeezed[i] = states[i] if self.squeeze is None else self.squeeze[i](states[i])
            return squeezed[i]

        def slot_features(slot: int, i: int) -> list[torch.Tensor]:
            """Every op the plan runs on ``slot`` (source state ``i``), computed together the first time."""
            ks = plan.slot_ops[slot]
            if (slot, ks[0]) not in features:
                x = source(i)
                if i not in activated and any(isinstance(self.ops[slot][k], ReLUFirst) for k in ks):
                    activated[i] = F.relu(x)   # one ReLU per source for all the ops that begin with one
                fns = [functools.partial(run, slot, i, k) for k in ks]
                outs = streams.run(fns, x.device) if streams is not None else [fn() for fn in fns]
                features.update(zip(((slot, k) for k in ks), outs))
            return [features[slot, k] for k in ks]

        def run(slot: int, i: int, k: int) -> torch.Tensor:
            op = self.ops[slot][k]
            if isinstance(op, ReLUFirst):
                return op.forward_from_relu(activated[i])
            return op(source(i))

        if coef is None:
            partial: dict[int, torch.Tensor] = {}                # group -> the sum of its ops
            for j in range(self.n_nodes):
                node = None
                for g in plan.node_groups[j]:
                    if g not in partial:
                        slot, i, ks = plan.groups[g]
                        slot_features(slot, i)
                        partial[g] = functools.reduce(torch.add, (features[slot, k] for k in ks))
                    node = partial[g] if node is None else node + partial[g]
                states.append(node if self.expand is None else self.expand[j](node))
        else:
            # mix -> its n_rows weighted sums, each [B, C, H, W]. Unbound rather than indexed: the
            # backward pass then stacks their gradients in one op, where indexing would give each row
            # a zero-filled gradient of the whole mix and add them up.
            mixed: dict[int, tuple[torch.Tensor, ...]] = {}
            for j in range(self.n_nodes):
                node = None
                for m, r in plan.terms[j]:
                    if m not in mixed:
                        slot, i, lo, n_rows, n_ops = plan.mixes[m]
                        feats = torch.stack(slot_features(slot, i))
                        weights = coef[lo:lo + n_rows * n_ops].view(n_rows, n_ops).to(feats.dtype)
                        mixed[m] = weighted_sums(weights, feats).unbind(0)
                    node = mixed[m][r] if node is None else node + mixed[m][r]
                states.append(node if self.expand is None else self.expand[j](node))
        return torch.cat(states[N_INPUTS:], dim=1)


def use_batch_statistics(module: nn.Module) -> None:
    """Make every BatchNorm normalise with the current batch's statistics, in eval mode too.

    Our choice for the super-net: Transit-cells switch ops from one iteration to the next, so an op's
    running statistics are stale whenever it is switched back in, and an eval-mode validation pass
    would measure the staleness, not the architecture. Training is unchanged (it always uses batch
    statistics)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def reference_cell(cell: "SearchCell", s0: torch.Tensor, s1: torch.Tensor,
                   coef: Callable[[int, int], float]) -> torch.Tensor:
    """A cell as the paper writes it: node j is ``sum over edges (i, j) and ops k of coef(e, k) *
    o_k(x_i)``, edge by edge and op by op. An Engine-cell takes ``coef(e, k) = p[e, k]`` (Eq. 6,
    p = softmax(alpha / tau), Eq. 5) or DST's q_hat (Eqs. 7-10); a Transit-cell takes 1 on its derived
    set S_j and 0 elsewhere (Eq. 3). With feature sharing the ops of edge (i, j) are those of source i
    (Sec. 2.3); with a bottleneck they run on the squeezed state and each node is expanded back
    (Sec. 2.5)."""
    states = [cell.preprocess0(s0), cell.preprocess1(s1)]
    for j in range(cell.n_nodes):
        node = 0
        for e, (i, target) in enumerate(derive.edge_layout(cell.n_nodes, N_INPUTS)):
            if target != j:
                continue
            x = states[i] if cell.squeeze is None else cell.squeeze[i](states[i])
            ops = cell.ops[i if cell.sharing else e]
            for k, op in enumerate(ops):
                if coef(e, k) != 0:
                    node = node + coef(e, k) * op(x)
        states.append(node if cell.expand is None else cell.expand[j](node))
    return torch.cat(states[N_INPUTS:], dim=1)
