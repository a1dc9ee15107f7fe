"""The search super-net: Engine-cells (differentiable, full DAG) and Transit-cells (derived sub-graph).

One cell class serves both roles and every mode. A cell runs a *plan*: which op features to compute
and, for every intermediate node, which of them to sum. An Engine-cell weights them with
coefficients gathered from the differentiable architecture weights; a Transit-cell adds up the ops
of the derived set, so no gradient reaches alpha through it. The derived structure (every cell's
plan) is read on the host once per change of alpha, beta or tau, and may be compiled
(``entrannas.compiled``). Work that is the same arithmetic is done once: each op feature once per
source (feature sharing), the ReLU that begins the conv ops once per source, the ReLU that begins
a cell's preprocessing once per state for the two cells that take it, an Engine-cell's weighting of
one source's ops for all its nodes in one matrix product, and a Transit-cell's sum of one source's
ops once for all the nodes that take it.

With ``op_streams`` above 1 the ops of a source run on several CUDA streams at once (``OpStreams``).

With ``transit="masked"`` a Transit-cell instead runs every candidate op and weights them by the
derived 0/1 mask, computed on the device: the same arithmetic, more of it, but one structure for a
whole search however often the derived architecture changes (``masked_structure``). With
``transit="auto"`` and a compiled net, a pass runs the derived structure once it is built, and the
masked structure (built once for the whole search) while it is not: the fast path either way.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import derive
from .compiled import CAPTURE, DEFAULT_CAPACITY, CapturedStructures, CompiledStructures, HotStructures, default_after
from .genotype import N_INPUTS, Genotype, GenotypeError, genotype_from_masks, genotype_masks
from .ops import FactorizedReduce, ReLUConvBN, ReLUFirst, build_op

ARCH_PARAMETER_NAMES = ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce")
#: A super-net's softmax temperature until a search's schedule sets it (the bench never does).
INITIAL_TAU = 1.0
#: Derived cells whose plans (and, for masked Transit-cells, lists of parameters to skip) are kept, the
#: most recently used: a search that keeps changing its architecture would otherwise grow them for
#: its whole length. Rebuilding one costs host work only (index lists and two small tensors).
PLAN_CACHE = 256


@dataclass(frozen=True)
class SupernetSpec:
    """Shape of a super-net (the parts of a ``SearchConfig`` that build the model)."""

    mode: str
    primitives: tuple[str, ...]
    layers: int
    init_channels: int
    nodes: int
    engine_cells: frozenset[int]
    feature_sharing: bool
    bottleneck_ratio: int
    num_classes: int
    in_channels: int = 3
    stem: str = "cifar"      # cifar: one 3x3 conv; imagenet: three stride-2 convs (224 -> 28)
    beta_init: float = 0.0
    channels_last: bool = False
    transit: str = "sparse"  # sparse: run the derived ops only; masked: run every op, weighted by the 0/1
    #                          mask; auto: masked while the derived structure is not built (compiled)
    op_streams: int = 1      # CUDA streams the candidate ops of one source are spread over (OpStreams)

    @classmethod
    def from_config(cls, config, num_classes: int, in_channels: int, stem: str) -> "SupernetSpec":
        return cls(mode=config.mode, primitives=tuple(config.primitives), layers=config.layers,
                   init_channels=config.init_channels, nodes=config.nodes,
                   engine_cells=frozenset(config.engine_cells()), feature_sharing=config.feature_sharing,
                   bottleneck_ratio=config.bottleneck_ratio, num_classes=num_classes,
                   in_channels=in_channels, stem=stem, beta_init=config.beta_init,
                   channels_last=config.channels_last, transit=config.transit, op_streams=config.op_streams)


class DegenerateArchitecture(RuntimeError):
    """A derived cell that cannot run: with finite alpha and beta this cannot happen (SPEC 4)."""


class CellPlan:
    """What one cell computes for one derived structure (``mask[e, k]``: op k on edge e is used).

    With feature sharing a *slot* is a source state (ops indexed by source node, SPEC 3); without it,
    a slot is an edge. An Engine-cell computes ``slot_ops[s]`` (op indices) on slot s, stacked, and
    mixes them for every node that takes the slot in one matrix product: ``mixes[m]`` is
    ``(slot, source state, lo, n_rows, n_ops)``, whose coefficients ``coef[lo:lo + n_rows * n_ops]``
    form an ``[n_rows, n_ops]`` matrix, one row per node; ``terms[j]`` lists the ``(mix, row)`` node
    j adds up. ``rows``/``cols`` index those coefficients in an ``[E, K]`` weight matrix.

    A Transit-cell adds up the derived ops themselves (SPEC 2: no coefficients): ``kept[j]`` lists
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
    waiting: a copy from pageable memory would sync, and a new derived structure builds its plans
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


def _masks_on_host(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[2, E, K]`` derived-mask pair on any device as (normal, reduction) CPU tensors: one sync."""
    normal, reduce = masks.cpu()
    return normal, reduce


def architecture_key(masks: tuple[torch.Tensor, torch.Tensor]) -> bytes:
    """The derived architecture (host masks, normal and reduction) as bytes: a ``Structure``'s key."""
    normal, reduce = masks
    return normal.numpy().tobytes() + reduce.numpy().tobytes()


@dataclass(frozen=True)
class Structure:
    """One derived architecture of the whole net: the masks, each cell's plan, and a hashable key."""

    masks: tuple[torch.Tensor, torch.Tensor]
    plans: tuple[CellPlan, ...]
    key: bytes
    #: The masks as derived, ``[2, E, K]`` on the device: what ``transit: auto``'s masked passes
    #: weight by until the structure is built, so the device does not derive them again per pass.
    on_device: Optional[torch.Tensor] = None


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


def _cached(cache: OrderedDict, key, build):
    """``cache[key]``, built by ``build()`` when missing; the least recently used entry beyond
    ``PLAN_CACHE`` is dropped."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = build()
        if len(cache) > PLAN_CACHE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


class SearchNetwork(nn.Module):
    """Stem, ``layers`` cells (reductions at 1/3 and 2/3 depth), global pool, classifier."""

    def __init__(self, spec: SupernetSpec):
        super().__init__()
        self.spec = spec
        self.primitives = spec.primitives
        self.tau = INITIAL_TAU
        C, n_nodes = spec.init_channels, spec.nodes
        if spec.stem == "imagenet":
            # PC-DARTS' ImageNet search stem: 224 -> 56 (s0) -> 28 (s1).
            self.stem0 = nn.Sequential(
                nn.Conv2d(spec.in_channels, C // 2, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(C // 2), nn.ReLU(inplace=True),
                nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            self.stem1 = nn.Sequential(nn.ReLU(inplace=False),
                                       nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
            C_pp, C_p, reduction_prev = C, C, True
        else:
            self.stem0 = nn.Sequential(nn.Conv2d(spec.in_channels, 3 * C, 3, padding=1, bias=False),
                                       nn.BatchNorm2d(3 * C))
            self.stem1 = None
            C_pp, C_p, reduction_prev = 3 * C, 3 * C, False
        reductions = (spec.layers // 3, 2 * spec.layers // 3)
        self.cells = nn.ModuleList()
        C_curr = C
        for index in range(spec.layers):
            reduction = index in reductions
            if reduction:
                C_curr *= 2
            cell = SearchCell(spec.primitives, n_nodes, C_pp, C_p, C_curr, reduction, reduction_prev,
                              spec.feature_sharing, spec.bottleneck_ratio, engine=index in spec.engine_cells)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, n_nodes * C_curr
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, spec.num_classes)

        n_edges, n_ops = derive.num_edges(n_nodes), len(spec.primitives)
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(n_edges, n_ops))
        if spec.mode == "dst":
            self.beta_normal = nn.Parameter(torch.full((n_nodes,), float(spec.beta_init)))
            self.beta_reduce = nn.Parameter(torch.full((n_nodes,), float(spec.beta_init)))
        else:
            self.beta_normal = self.beta_reduce = None
        self._plans: OrderedDict[tuple, CellPlan] = OrderedDict()   # LRU, PLAN_CACHE entries
        self._param_lists: Optional[tuple[list[nn.Parameter], list[nn.Parameter]]] = None
        self._structure: Optional[tuple[tuple, Structure]] = None
        self._arch_updates = 0
        self.derivations = 0          # how many times the structure was derived (each a device sync)
        self.last_structure: Optional[Structure] = None   # what the last forward ran
        self._masked: Optional[Structure] = None          # masked Transit-cells: the one structure
        # [2, E, K] where the last forward ran the masked structure (masked, auto), else None
        self._last_device_masks: Optional[torch.Tensor] = None
        # masked: derived masks -> the parameters to skip (LRU, PLAN_CACHE entries)
        self._unused: OrderedDict[bytes, list[nn.Parameter]] = OrderedDict()
        self._host_key: Optional[bytes] = None            # masked: the last mask read on the host
        self.compiled: Optional[HotStructures] = None
        # None for one stream: the plain path, the one torch.compile traces
        self.op_streams = OpStreams(spec.op_streams) if spec.op_streams > 1 else None
        use_batch_statistics(self)
        if spec.channels_last:
            self.to(memory_format=torch.channels_last)

    # -- parameters -----------------------------------------------------------------------------
    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self._parameter_lists()[0])

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self._parameter_lists()[1])

    def _parameter_lists(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        # Walking the module tree for its hundreds of parameters took about a sixth of a small step's
        # host time (two walks per step, under cProfile); the lists only change when ``_apply`` may
        # replace parameters.
        if self._param_lists is None:
            named = list(self.named_parameters())
            self._param_lists = ([p for n, p in named if n in ARCH_PARAMETER_NAMES],
                                 [p for n, p in named if n not in ARCH_PARAMETER_NAMES])
        return self._param_lists

    @contextmanager
    def frozen_weights(self):
        """Build the graph without the weights: a backward then computes no weight gradient.

        The first-order arch step uses it: its weight gradients would be thrown away (the weight
        step zeroes them first), and computing them is a large share of a backward pass."""
        params = [p for p in self.weight_parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in params:
                p.requires_grad_(True)

    # -- architecture ---------------------------------------------------------------------------
    def arch_weights(self, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Engine-cell coefficients ``[E, K]`` for the normal and the reduction cell."""
        out = []
        for alpha, beta in ((self.alpha_normal, self.beta_normal), (self.alpha_reduce, self.beta_reduce)):
            if detach:
                alpha, beta = alpha.detach(), beta.detach() if beta is not None else None
            if self.spec.mode == "dst":
                out.append(derive.dst_coefficients(alpha, beta, self.tau, N_INPUTS))
            else:
                out.append(derive.edge_softmax(alpha, self.tau))
        return out[0], out[1]

    def device_masks(self, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The derived sets of both cell types, ``[2, E, K]`` bool on the weights' device (no sync).
        DST's come from ``weights`` (q_hat, Eq. 10). The top-2 rule ranks by ``log p``, computed from
        alpha itself rather than from ``weights`` (p): in float32, p saturates at low tau, where
        several edges' strongest ``p`` would round to exactly 1 and tie."""
        if self.spec.mode == "dst":
            return torch.stack([derive.dst_mask(w) for w in weights])
        return torch.stack([derive.top2_mask(derive.edge_log_softmax(alpha.detach(), self.tau), self.primitives,
                                             N_INPUTS) for alpha in (self.alpha_normal, self.alpha_reduce)])

    def derived_masks(self, weights: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The derived sets of both cell types as CPU bool masks, with one device sync."""
        return _masks_on_host(self.device_masks(weights))

    def genotype(self) -> Genotype:
        """The architecture derived from the current alpha (and beta) at the current tau."""
        with torch.no_grad():
            masks = self.derived_masks(self.arch_weights(detach=True))
        return genotype_from_masks(*masks, self.primitives, self.spec.nodes)

    @torch.no_grad()
    def set_architecture(self, genotype: Genotype) -> None:
        """Set alpha (and DST's beta) so that the derivation at the current tau gives ``genotype``
        (``derive.arch_for_genotype``): a search state whose derived architecture is known, such as
        a settled one for the bench. Raises ``GenotypeError`` where the mode cannot derive it, and
        then leaves alpha and beta as they were."""
        arch = derive.arch_for_genotype(genotype, self.spec.mode, self.primitives, self.spec.nodes, self.tau)
        saved = [p.detach().clone() for p in self.arch_parameters()]
        params = (self.alpha_normal, self.alpha_reduce, self.beta_normal, self.beta_reduce)
        for param, value in zip(params, arch):
            if param is not None:
                param.copy_(value)
        self.arch_changed()
        wanted = genotype_masks(genotype, self.primitives, self.spec.nodes)
        derived = genotype_masks(self.genotype(), self.primitives, self.spec.nodes)
        if not all(torch.equal(a, b) for a, b in zip(derived, wanted)):   # a safeguard: not seen
            for param, old in zip(self.arch_parameters(), saved):
                param.copy_(old)
            self.arch_changed()
            raise GenotypeError(f"mode {self.spec.mode} at tau {self.tau} did not derive the genotype back")

    def _plan(self, mask: torch.Tensor, device: torch.device) -> CellPlan:
        key = (tuple(mask.shape), mask.numpy().tobytes(), device)
        return _cached(self._plans, key, lambda: CellPlan(mask, self.spec.nodes, self.spec.feature_sharing, device))

    @property
    def last_masks(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The derived masks (normal, reduction) of the last forward (masked: read now, a sync)."""
        if self.spec.transit == "masked":
            return None if self._last_device_masks is None else _masks_on_host(self._last_device_masks)
        return None if self.last_structure is None else self.last_structure.masks

    @property
    def derived_key(self) -> Optional[bytes]:
        """The derived architecture (both masks, as bytes) of the last weight step: what the sparse
        path last derived, or the mask ``drop_unused_gradients`` last read (masked)."""
        if self.spec.transit == "masked":
            return self._host_key
        return None if self.last_structure is None else self.last_structure.key

    def arch_changed(self) -> None:
        """Say that alpha or beta changed: the next forward derives the structure anew.

        In-place edits (``alpha.add_``, ``load_state_dict``) are noticed without it, through the
        tensors' version counters; torch's fused optimizer kernels do not bump those counters, so
        the bi-level optimizer calls this after every arch update."""
        self._arch_updates += 1

    def _arch_key(self, device: torch.device) -> tuple:
        """Changes whenever alpha, beta or tau may have."""
        params = (self.alpha_normal, self.alpha_reduce, self.beta_normal, self.beta_reduce)
        return ((self.tau, device, self._arch_updates)
                + tuple((p.data_ptr(), p._version) for p in params if p is not None))

    def structure(self, weights: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> Structure:
        """The derived structure for the current alpha, beta and tau.

        Deriving reads the masks on the host (one device sync), so it runs only when alpha, beta or
        tau changed since the last call: once per search step (after the arch update; the next arch
        step's forward reuses it) and never during the warm-up epochs or evaluation."""
        key = self._arch_key(device)
        if self._structure is not None and self._structure[0] == key:
            return self._structure[1]
        on_device = self.device_masks(weights)
        masks = _masks_on_host(on_device)   # the one sync
        self.derivations += 1
        plans = tuple(self._sparse_plan(cell, masks, device) for cell in self.cells)
        structure = Structure(masks, plans, architecture_key(masks), on_device)
        self._structure = (key, structure)
        return structure

    def masked_structure(self, device: torch.device) -> Structure:
        """``transit: masked``: every cell runs every candidate op (less ``none``) and a Transit-cell
        weights them by the derived mask, 0 or 1, read on the device. One structure for the whole
        search: nothing to derive on the host before a pass, one graph to compile or record. The
        same arithmetic as the sparse path (an op weighted by 0 adds exactly 0 to the output and to
        every gradient); ``drop_unused_gradients`` removes the zero gradients it leaves."""
        if self._masked is None or self._masked.plans[0].rows.device != device:
            plan = self._plan(self._all_ops_mask(), device)
            self._masked = Structure(masks=None, plans=tuple(plan for _ in self.cells), key=b"masked")
        return self._masked

    def drop_unused_gradients(self) -> None:
        """After a pass through the masked structure (``transit: masked``, or ``auto`` before the
        derived structure is built): set to None the gradients of the ops (and bottleneck convs) that
        the pass's derived set leaves out. The sparse path never runs them, so they get no gradient
        and SGD's momentum and weight decay leave them alone; the masked path gives them exact zeros,
        which SGD would not skip. ``masked`` reads the mask on the host here (the step's one device
        sync); ``auto`` derived it on the host before the pass."""
        if self._last_device_masks is None:   # the last pass ran the derived ops only
            return
        if self.spec.transit == "masked":
            masks = _masks_on_host(self._last_device_masks)
            self.derivations += 1
            key = self._host_key = architecture_key(masks)
        else:
            masks, key = self.last_structure.masks, self.last_structure.key
        cpu = torch.device("cpu")   # what the sparse path would leave out, listed once per architecture
        unused = _cached(self._unused, key, lambda: [
            p for cell in self.cells for p in cell.unused_parameters(self._sparse_plan(cell, masks, cpu))])
        for p in unused:
            p.grad = None

    def _sparse_plan(self, cell: SearchCell, masks: tuple[torch.Tensor, torch.Tensor],
                     device: torch.device) -> CellPlan:
        """The plan a cell runs on the sparse path for the derived ``masks`` (normal, reduction):
        a Transit-cell its derived set; an Engine-cell every op that can add to its output."""
        mask = masks[1] if cell.reduction else masks[0]
        if not cell.engine or self.spec.mode == "dst":
            # DST Engine-cells: ops with q_hat = 0 add exactly 0 to the output and to every gradient
            # (SPEC 4), so the derived set is all they need to run.
            return self._plan(mask, device)
        return self._plan(self._all_ops_mask(), device)

    def _all_ops_mask(self) -> torch.Tensor:
        """Every candidate op on every edge but ``none`` (p_none * 0 adds nothing)."""
        mask = torch.ones(derive.num_edges(self.spec.nodes), len(self.primitives), dtype=torch.bool)
        if "none" in self.primitives:
            mask[:, self.primitives.index("none")] = False
        return mask

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, arch_grad: bool = True) -> torch.Tensor:
        """Logits. ``arch_grad=False`` (the weight step) keeps alpha and beta out of the graph."""
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.op_streams is not None:
            self.op_streams.prepare(x.device)
        weights = self.arch_weights(detach=not arch_grad)
        self._last_device_masks = None
        if self.spec.transit == "masked":
            self.last_structure = self.masked_structure(x.device)
            return self._masked_pass(x, weights, self.device_masks(weights))
        structure = self.last_structure = self.structure(weights, x.device)
        if self.spec.transit == "auto" and self.compiled is not None:
            # The derived structure's fast pass where it is built; until then (early in a search a
            # structure lasts a few steps) the masked structure's, which is built once for the search,
            # weighted by the masks derived with the structure.
            return self.compiled(structure, x, *weights,
                                 fallback=lambda: self._masked_pass(x, weights, structure.on_device))
        return self._run(structure, x, *weights)

    def _masked_pass(self, x: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor],
                     masks: torch.Tensor) -> torch.Tensor:
        """A pass through the masked structure, its Transit-cells weighted by ``masks`` (``[2, E, K]``
        on the device), which ``drop_unused_gradients`` reads afterwards."""
        self._last_device_masks = masks
        return self._run(self.masked_structure(x.device), x, *weights, masks)

    def _run(self, structure: Structure, *args) -> torch.Tensor:
        if self.compiled is not None:
            return self.compiled(structure, *args)
        return self.run_structure(structure.plans, *args)

    @torch.no_grad()
    def derived_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the derived architecture with the super-net's weights: every cell, the
        Engine-cells too, runs as a Transit-cell (Eq. 3, a plain sum over the derived set). Its
        accuracy beside the super-net's measures the gap between search and target network."""
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weights = self.arch_weights(detach=True)
        masks = _masks_on_host(self.device_masks(weights))
        plans = tuple(self._plan(masks[1] if cell.reduction else masks[0], x.device) for cell in self.cells)
        return self.run_structure(plans, x, *weights, transit_only=True)

    def run_structure(self, plans: tuple[CellPlan, ...], x: torch.Tensor, w_normal: torch.Tensor,
                      w_reduce: torch.Tensor, masks: Optional[torch.Tensor] = None,
                      transit_only: bool = False) -> torch.Tensor:
        """The network for one derived structure: what ``compile_structures`` compiles. With
        ``masks`` (``[2, E, K]``, masked Transit-cells) a Transit-cell weights its ops by them;
        ``transit_only`` runs the Engine-cells as Transit-cells too."""
        # Every cell's preprocessing begins with a ReLU of its inputs, and each state is the input of
        # two cells (s1 of the next, s0 of the one after): the ReLU runs once per state, for both.
        stem = self.stem0(x)
        r0 = F.relu(stem)
        # the imagenet stem1 begins with that same ReLU of the stem's output (stem1[0])
        r1 = r0 if self.stem1 is None else F.relu(self.stem1[1:](r0))
        for index, (cell, plan) in enumerate(zip(self.cells, plans)):
            w = w_reduce if cell.reduction else w_normal
            if cell.engine and not transit_only:
                coef = w[plan.rows, plan.cols]
            elif masks is not None:
                coef = masks[1 if cell.reduction else 0][plan.rows, plan.cols].to(w.dtype)
            else:
                coef = None
            out = cell(r0, r1, plan, coef, self.op_streams, inputs_relu=True)
            r0, r1 = r1, (F.relu(out) if index < len(self.cells) - 1 else None)
        return self.classifier(self.global_pooling(out).flatten(1))

    def compile_structures(self, mode: str = "default", backend: str = "inductor", after: Optional[int] = None,
                           capacity: int = DEFAULT_CAPACITY) -> None:
        """Run each derived structure through ``torch.compile``, or with ``mode="capture"`` record it as
        CUDA graphs, once it has been used ``after`` times in a row (default: ``default_after(mode)``;
        see ``entrannas.compiled``); ``mode="off"`` goes back to eager."""
        after = default_after(mode) if after is None else after
        if mode == "off":
            self.compiled = None
        elif mode == CAPTURE:
            self.compiled = CapturedStructures(self.run_structure, self, after, capacity)
        else:
            self.compiled = CompiledStructures(self.run_structure, mode, backend, after, capacity)

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting the parameters makes the cached structure's key meaningless (and may
        # replace the parameter objects).
        self._structure = None
        self._param_lists = None
        self._masked = None
        self._unused = OrderedDict()
        if getattr(self, "compiled", None) is not None:
            self.compiled.clear()   # recorded graphs read the parameters they were recorded with
        return super()._apply(fn, *args, **kwargs)
