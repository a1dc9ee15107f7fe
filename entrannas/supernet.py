"""The search super-net (Sec. 2.2, Fig. 4): a stem, Engine-cells and Transit-cells, a classifier.

Every forward pass runs the architecture derived from the current alpha (and beta) at the current
tau: ``derive()`` reads it on the host (one device sync) into a ``Derived`` (the masks, each cell's
``CellPlan``, a key), after every architecture step and whenever tau changes; an Engine-cell weights
its ops with coefficients gathered from the differentiable architecture weights (Eq. 6, or DST's
q_hat), a Transit-cell adds up its derived ops (Eq. 3). ``derived_forward`` runs every cell as a
Transit-cell: the target network with the super-net's weights. With ``cuda_graphs`` each derived
architecture's passes may be recorded (``entrannas.cuda_graphs``); with ``op_streams`` above 1 the
ops of a source run on several CUDA streams (``cells.OpStreams``).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import derive
from .cells import CellPlan, DegenerateArchitecture, OpStreams, SearchCell, use_batch_statistics  # noqa: F401
from .cuda_graphs import CudaGraphs
from .genotype import N_INPUTS, Genotype, GenotypeError, genotype_from_masks, genotype_masks

ARCH_PARAMETER_NAMES = ("alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce")
#: A super-net's softmax temperature until a search's schedule sets it (the bench never does).
INITIAL_TAU = 1.0
#: Cell plans kept, the most recently used: a search that keeps changing its architecture would
#: otherwise grow them for its whole length. Rebuilding one costs host work only.
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
    op_streams: int = 1      # CUDA streams the candidate ops of one source are spread over (OpStreams)

    @classmethod
    def from_config(cls, config, num_classes: int, in_channels: int, stem: str) -> "SupernetSpec":
        return cls(mode=config.mode, primitives=tuple(config.primitives), layers=config.layers,
                   init_channels=config.init_channels, nodes=config.nodes,
                   engine_cells=frozenset(config.engine_cells()), feature_sharing=config.feature_sharing,
                   bottleneck_ratio=config.bottleneck_ratio, num_classes=num_classes,
                   in_channels=in_channels, stem=stem, beta_init=config.beta_init,
                   channels_last=config.channels_last, op_streams=config.op_streams)



def architecture_key(masks: tuple[torch.Tensor, torch.Tensor]) -> bytes:
    """A derived architecture (host masks, normal and reduction) as bytes."""
    normal, reduce = masks
    return normal.numpy().tobytes() + reduce.numpy().tobytes()


@dataclass(frozen=True)
class Derived:
    """The architecture derived for the whole net: the masks (normal, reduction; on the host), each
    cell's plan on ``device``, and the masks as bytes (``key``)."""

    masks: tuple[torch.Tensor, torch.Tensor]
    plans: tuple[CellPlan, ...]
    key: bytes
    device: torch.device


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
        self._tau = INITIAL_TAU
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
        self.derived: Optional[Derived] = None   # what derive() last read; None: derive at the next pass
        self.derivations = 0                     # how many times derive() ran (each a device sync)
        self.cuda_graphs: Optional[CudaGraphs] = None
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
        # Walking the module tree for its hundreds of parameters is a noticeable share of a small
        # step's host time; the lists change only when ``_apply`` may replace parameters.
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
    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        if value != self._tau:
            self._tau = value
            self.derived = None   # another temperature may derive another architecture

    def arch_weights(self, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Engine-cell coefficients ``[E, K]`` for the normal and the reduction cell: p (Eq. 5) or,
        in DST, q_hat (Eqs. 7-9)."""
        out = []
        for alpha, beta in ((self.alpha_normal, self.beta_normal), (self.alpha_reduce, self.beta_reduce)):
            if detach:
                alpha, beta = alpha.detach(), beta.detach() if beta is not None else None
            if self.spec.mode == "dst":
                out.append(derive.dst_coefficients(alpha, beta, self.tau, N_INPUTS))
            else:
                out.append(derive.edge_softmax(alpha, self.tau))
        return out[0], out[1]

    @torch.no_grad()
    def derived_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The derived sets of both cell types as CPU bool masks ``[E, K]``, with one device sync: DST's
        non-zero q_hat (Eq. 10), or the top-2 rule (Eq. 4), which ranks by ``log p`` computed from
        alpha itself: in float32 p saturates at low tau, where several edges' strongest ``p`` would
        round to exactly 1 and tie."""
        if self.spec.mode == "dst":
            masks = torch.stack([derive.dst_mask(w) for w in self.arch_weights(detach=True)])
        else:
            masks = torch.stack([derive.top2_mask(derive.edge_log_softmax(alpha.detach(), self.tau), self.primitives,
                                                  N_INPUTS) for alpha in (self.alpha_normal, self.alpha_reduce)])
        normal, reduce = masks.cpu()
        return normal, reduce

    def derive(self, device: Optional[torch.device] = None) -> Derived:
        """Derive the architecture from the current alpha, beta and tau: what every pass runs until
        the next ``derive()`` (the bi-level optimiser calls it after each architecture step, and a
        change of tau asks for it; after editing alpha or beta by hand, call it or ``arch_changed()``)."""
        device = device or self.alpha_normal.device
        masks = self.derived_masks()
        self.derivations += 1
        plans = tuple(self._cell_plan(cell, masks, device) for cell in self.cells)
        self.derived = Derived(masks, plans, architecture_key(masks), device)
        return self.derived

    def arch_changed(self) -> None:
        """Say that alpha or beta changed: the next pass derives the architecture anew."""
        self.derived = None

    def genotype(self) -> Genotype:
        """The architecture derived from the current alpha (and beta) at the current tau."""
        return genotype_from_masks(*self.derived_masks(), self.primitives, self.spec.nodes)

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
            raise GenotypeError(f"mode {self.spec.mode} at tau {self.tau} did not derive the genotype back")

    def _plan(self, mask: torch.Tensor, device: torch.device) -> CellPlan:
        key = (tuple(mask.shape), mask.numpy().tobytes(), device)
        return _cached(self._plans, key, lambda: CellPlan(mask, self.spec.nodes, self.spec.feature_sharing, device))

    def _cell_plan(self, cell: SearchCell, masks: tuple[torch.Tensor, torch.Tensor], device: torch.device,
                   transit: bool = False) -> CellPlan:
        """What a cell runs for the derived ``masks``: a Transit-cell (or any cell with ``transit``) its
        derived set; an Engine-cell every op that can add to its output."""
        mask = masks[1] if cell.reduction else masks[0]
        if transit or not cell.engine or self.spec.mode == "dst":
            # DST Engine-cells: ops with q_hat = 0 add exactly 0 to the output and to every gradient
            # (Sec. 2.4), so the derived set is all they need to run.
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
        derived = self.derived
        if derived is None or derived.device != x.device:
            derived = self.derive(x.device)
        weights = self.arch_weights(detach=not arch_grad)
        if self.cuda_graphs is not None:
            return self.cuda_graphs(derived, x, *weights)
        return self.run_plans(derived.plans, x, *weights)

    @torch.no_grad()
    def derived_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the derived architecture with the super-net's weights: every cell, the
        Engine-cells too, runs as a Transit-cell (Eq. 3, a plain sum over the derived set). Its
        accuracy beside the super-net's measures the gap between search and target network."""
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        masks = (self.derived or self.derive(x.device)).masks
        plans = tuple(self._cell_plan(cell, masks, x.device, transit=True) for cell in self.cells)
        return self.run_plans(plans, x, *self.arch_weights(detach=True), transit_only=True)

    def run_plans(self, plans: tuple[CellPlan, ...], x: torch.Tensor, w_normal: torch.Tensor,
                  w_reduce: torch.Tensor, transit_only: bool = False) -> torch.Tensor:
        """The network for one derived architecture's cell plans (what ``cuda_graphs`` records).
        ``transit_only`` runs the Engine-cells as Transit-cells too."""
        # Every cell's preprocessing begins with a ReLU of its inputs, and each state is the input of
        # two cells (s1 of the next, s0 of the one after): the ReLU runs once per state, for both.
        stem = self.stem0(x)
        r0 = F.relu(stem)
        # the imagenet stem1 begins with that same ReLU of the stem's output (stem1[0])
        r1 = r0 if self.stem1 is None else F.relu(self.stem1[1:](r0))
        for index, (cell, plan) in enumerate(zip(self.cells, plans)):
            w = w_reduce if cell.reduction else w_normal
            coef = w[plan.rows, plan.cols] if cell.engine and not transit_only else None
            out = cell(r0, r1, plan, coef, self.op_streams, inputs_relu=True)
            r0, r1 = r1, (F.relu(out) if index < len(self.cells) - 1 else None)
        return self.classifier(self.global_pooling(out).flatten(1))

    def use_cuda_graphs(self, on: bool = True, **options) -> None:
        """Record each hot derived architecture's passes as CUDA graphs (``entrannas.cuda_graphs``;
        ``options``: ``after``, ``capacity``, ``capture``), or go back to eager passes."""
        self.cuda_graphs = CudaGraphs(self.run_plans, self, **options) if on else None

    def _apply(self, fn, *args, **kwargs):
        # Moving or casting may replace the parameter objects, and recorded graphs read the ones
        # they were recorded with.
        self._param_lists = None
        self.derived = None
        if getattr(self, "cuda_graphs", None) is not None:
            self.cuda_graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, state_dict, *args, **kwargs):
        out = super().load_state_dict(state_dict, *args, **kwargs)
        self.arch_changed()
        return out
