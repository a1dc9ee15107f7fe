"""Architecture derivation: pure functions of (alpha, beta, tau), tested on hand-written matrices.

Edges are in DARTS order: node 0 takes states 0..n_inputs-1, node 1 states 0..n_inputs, and so on.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F

from .genotype import GenotypeError, genotype_masks

#: Thresholds are capped just below 1 (our choice): in float32 sigmoid(beta) rounds to exactly 1
#: for beta > ~17, which would prune a node's strongest input, against Eq. 8's guarantee that every node keeps one.
MAX_THRESHOLD = 1.0 - 1e-6


def num_edges(n_nodes: int, n_inputs: int = 2) -> int:
    return sum(n_inputs + j for j in range(n_nodes))


@lru_cache(maxsize=None)
def edge_layout(n_nodes: int, n_inputs: int = 2) -> tuple[tuple[int, int], ...]:
    """``(source state, target node)`` of every edge, in DARTS order."""
    return tuple((i, j) for j in range(n_nodes) for i in range(n_inputs + j))


def n_nodes_for(n_edges: int, n_inputs: int = 2) -> int:
    n, total = 0, 0
    while total < n_edges:
        total += n_inputs + n
        n += 1
    if total != n_edges:
        raise ValueError(f"{n_edges} edges is not a complete DAG with {n_inputs} inputs")
    return n


@lru_cache(maxsize=None)
def _node_of_edge(n_nodes: int, n_inputs: int, device: torch.device) -> torch.Tensor:
    """Target node of every edge, cached per device (no host-to-device copy per step)."""
    return torch.tensor([j for _, j in edge_layout(n_nodes, n_inputs)], device=device)


@lru_cache(maxsize=None)
def _first_k_positions(n_nodes: int, n_inputs: int, k: int, device: torch.device) -> torch.Tensor:
    """Where each node's first ``k`` edges sit in the edge layout (each node has at least ``k``
    inputs), cached per device: a fixed-size index, so that picking them reads nothing on the host."""
    if n_inputs < k:
        raise ValueError(f"top-{k} needs {k} inputs per node; the first node has {n_inputs}")
    return torch.tensor([e for e, (i, _) in enumerate(edge_layout(n_nodes, n_inputs)) if i < k], device=device)


def edge_softmax(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 5: ``p[e, k] = softmax_k(alpha[e, k] / tau)``."""
    return F.softmax(alpha / tau, dim=-1)


def edge_log_softmax(alpha: torch.Tensor, tau: float) -> torch.Tensor:
    """``log p`` of Eq. 5, for ranking: where one op dominates an edge, float32 rounds its ``p`` to
    exactly 1 (at tau = 0.1 a lead of 2 in alpha does it) and ``torch.log_softmax`` to exactly 0,
    so two edges with different leads would tie. Here ``log p_k = (a_k - a_max) / tau -
    log1p(sum over j != max of exp((a_j - a_max) / tau))``, which keeps the difference."""
    z = alpha / tau
    top, arg = z.max(dim=-1, keepdim=True)
    rel = z - top
    others = torch.exp(rel).scatter(-1, arg, 0.0).sum(dim=-1, keepdim=True)
    return rel - torch.log1p(others)


def dst_coefficients(alpha: torch.Tensor, beta: torch.Tensor, tau: float, n_inputs: int = 2) -> torch.Tensor:
    """EnTranNAS-DST coefficients q_hat ``[E, K]`` (Eqs. 5, 7, 8, 9); differentiable.

    alpha: ``[E, K]`` logits, beta: ``[N]`` threshold logits, one per intermediate node.
    """
    n_nodes = beta.shape[0]
    if alpha.shape[0] != num_edges(n_nodes, n_inputs):
        raise ValueError(f"alpha has {alpha.shape[0]} edges; {n_nodes} nodes with {n_inputs} inputs "
                         f"need {num_edges(n_nodes, n_inputs)}")
    node_of_edge = _node_of_edge(n_nodes, n_inputs, alpha.device)
    p = edge_softmax(alpha, tau)                                             # [E, K]
    # Eq. 7: normalise by the largest weight over all edges and ops into node j.
    node_max = p.new_full((n_nodes,), float("-inf")).scatter_reduce(
        0, node_of_edge, p.amax(dim=1), reduce="amax")                      # [N]
    p_hat = p / node_max[node_of_edge, None]
    # Eq. 8: prune below the node's learnable threshold.
    t = torch.sigmoid(beta).clamp(max=MAX_THRESHOLD)                          # [N]
    q = F.relu(p_hat - t[node_of_edge, None])
    # Eq. 9: renormalise each edge that kept an op; an edge that kept none stays all-zero.
    # (q / max(sum, tiny) is exactly 0 there and keeps a zero, not NaN, gradient.)
    total = q.sum(dim=1, keepdim=True)
    return q / total.clamp_min(torch.finfo(q.dtype).tiny)


def dst_regularizer(beta: torch.Tensor) -> torch.Tensor:
    """Eq. 11's sparsity term ``mean_j(-log sigmoid(beta_j))``, computed as softplus(-beta)."""
    return F.softplus(-beta).mean()


def thresholds(beta: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(beta).clamp(max=MAX_THRESHOLD)


def top2_mask(weights: torch.Tensor, primitives: Sequence[str], n_inputs: int = 2, k: int = 2) -> torch.Tensor:
    """Eq. 4, the DARTS rule: per node, the top-k edges by strongest non-``none`` weight, and on
    each the argmax non-``none`` op. Returns a bool mask ``[E, K]``. Ties go to the lower index.
    Only the order of the weights matters: ``p`` or ``edge_log_softmax`` (which does not saturate)."""
    weights = weights.detach()
    n_nodes = n_nodes_for(weights.shape[0], n_inputs)
    scored = weights.clone()
    if "none" in primitives:
        scored[:, list(primitives).index("none")] = float("-inf")
    edge_score, edge_op = scored.max(dim=1)                                  # [E], [E]
    # All nodes at once: edges by score, then (stably) by node, so each node's edges come in a block,
    # strongest first, and the block of node j has the length of its inputs, as in the edge layout.
    # Its first k then sit where the layout has the edges from sources 0..k-1. Stable sorts, not
    # topk: equal scores go to the lower edge index on every device, so a mask derived on the GPU
    # equals the one derived on the host.
    node_of_edge = _node_of_edge(n_nodes, n_inputs, weights.device)
    order = torch.sort(edge_score, descending=True, stable=True).indices
    order = order[torch.sort(node_of_edge[order], stable=True).indices]
    # Fixed-size indices and no Python scalars written through a tensor index: a boolean index or
    # ``mask[i, j] = True`` would each wait for the GPU (a count, and a host-to-device copy of True).
    kept = order[_first_k_positions(n_nodes, n_inputs, k, weights.device)]
    kept_edge = torch.zeros(weights.shape[0], dtype=torch.bool, device=weights.device).index_fill_(0, kept, True)
    ops = torch.arange(weights.shape[1], device=weights.device)
    return (ops == edge_op[:, None]) & kept_edge[:, None]


def dst_mask(q_hat: torch.Tensor) -> torch.Tensor:
    """Eq. 10: the derived set is every (edge, op) with a non-zero coefficient."""
    return q_hat.detach() > 0


def arch_for_genotype(genotype, mode: str, primitives: Sequence[str], n_nodes: int, tau: float,
                      n_inputs: int = 2) -> tuple:
    """Architecture parameters ``(alpha_normal, alpha_reduce, beta_normal, beta_reduce)`` from which
    ``mode``'s derivation at ``tau`` gives ``genotype`` (the betas are None outside DST): the inverse
    of derivation, for starting a search, or timing one, at a known architecture.

    Top-2 rule (entrannas, darts): each node needs exactly two inputs from different states; the
    chosen op of a chosen edge leads its edge by 10 in alpha, every other entry is 0. DST: the ops
    an edge keeps share its ``p`` evenly (the others get 1e-6), an edge that keeps none is uniform,
    and each node's threshold sits halfway between its weakest kept and strongest dropped ``p_hat``.
    That fails only where a node both keeps every op of one edge and drops another edge (both are
    uniform). Raises ``GenotypeError`` saying which node cannot be derived."""
    masks = genotype_masks(genotype, primitives, n_nodes)
    layout = edge_layout(n_nodes, n_inputs)
    node_edges = [[e for e, (_, target) in enumerate(layout) if target == j] for j in range(n_nodes)]
    alphas, betas = [], []
    for name, mask in zip(("normal", "reduce"), masks):
        if mode != "dst":
            for j, edges in enumerate(node_edges):
                used = [e for e in edges if mask[e].any()]
                pairs = int(mask[edges].sum())
                if len(used) != 2 or pairs != 2:
                    raise GenotypeError(f"{name}: node {j + n_inputs} takes {pairs} input(s) from {len(used)} "
                                        f"state(s); the top-2 rule of mode {mode} derives exactly two, from "
                                        "different states")
            alphas.append(torch.where(mask, 10.0, 0.0))
            continue
        kept = mask.sum(dim=1, keepdim=True)
        p = torch.where(mask, 1.0 / kept.clamp_min(1), 1e-6)                           # [E, K]
        p = torch.where(kept == 0, 1.0 / len(primitives), p)
        alphas.append(tau * torch.log(p))          # softmax(alpha / tau) = p (each row sums to ~1)
        thresholds = []
        for j, edges in enumerate(node_edges):
            p_hat = p[edges] / p[edges].max()                                          # Eq. 7
            on = p_hat[mask[edges]].min()
            off = p_hat[~mask[edges]].max() if not mask[edges].all() else torch.tensor(0.0)
            if not off < on:
                raise GenotypeError(f"{name}: node {j + n_inputs} cannot be derived by DST: an edge that "
                                    "keeps every op and an edge that keeps none weigh the same")
            thresholds.append(float(off + on) / 2)
        betas.append(torch.logit(torch.tensor(thresholds)))
    return alphas[0], alphas[1], (betas[0] if betas else None), (betas[1] if betas else None)
