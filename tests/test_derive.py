import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrannas import derive
from entrannas.temperature import SCHEDULES, temperature


def logit(t: float) -> float:
    return math.log(t / (1 - t))


def test_edge_softmax_is_eq5():
    alpha = torch.tensor([[1.0, 2.0, 0.5]])
    tau = 0.3
    expected = torch.exp(alpha / tau) / torch.exp(alpha / tau).sum()
    torch.testing.assert_close(derive.edge_softmax(alpha, tau), expected)


def test_dst_coefficients_by_hand_one_node():
    # Node 0 has edges from states 0 and 1. p(edge 0) = [0.75, 0.25], p(edge 1) = [0.5, 0.5].
    alpha = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # max p = 0.75: p_hat = [1, 1/3], [2/3, 2/3]; t = 0.5: q = [0.5, 0], [1/6, 1/6]
    q_hat = derive.dst_coefficients(alpha, torch.tensor([0.0]), tau=1.0)
    torch.testing.assert_close(q_hat, torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    # t = 0.7 prunes edge 1 entirely: q = [0.3, 0], [0, 0]
    q_hat = derive.dst_coefficients(alpha, torch.tensor([logit(0.7)]), tau=1.0)
    torch.testing.assert_close(q_hat, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))


def test_dst_coefficients_by_hand_temperature_and_per_node_max():
    # Two nodes (2 + 3 edges). Node 1's max is over its own three edges only (Eq. 7).
    tau = 0.5
    alpha = torch.zeros(5, 2)
    alpha[0] = torch.tensor([math.log(3.0), 0.0]) * tau    # p = [0.75, 0.25] after /tau
    alpha[2] = torch.tensor([math.log(9.0), 0.0]) * tau    # p = [0.9, 0.1]
    alpha[4] = torch.tensor([0.0, math.log(4.0)]) * tau    # p = [0.2, 0.8]
    beta = torch.tensor([logit(0.4), logit(0.6)])
    q_hat = derive.dst_coefficients(alpha, beta, tau)
    # node 0: p_hat = [1, 1/3], [2/3, 2/3]; t = 0.4 -> q = [0.6, 0], [4/15, 4/15]
    # node 1: max 0.9: p_hat = [1, 1/9], [5/9, 5/9], [2/9, 8/9]; t = 0.6 -> q = [0.4, 0], 0, [0, 0.29]
    expected = torch.tensor([[1.0, 0.0], [0.5, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(q_hat, expected)


def test_dst_coefficients_rejects_wrong_edge_count():
    with pytest.raises(ValueError, match="edges"):
        derive.dst_coefficients(torch.zeros(4, 3), torch.zeros(2), 1.0)


def test_dst_gradients_are_finite_and_reach_alpha_and_beta():
    gen = torch.Generator().manual_seed(3)
    alpha = (2 * torch.randn(14, 7, generator=gen)).requires_grad_(True)
    beta = torch.full((4,), 0.5, requires_grad=True)
    q_hat = derive.dst_coefficients(alpha, beta, 1.0)
    kept_per_edge = (q_hat > 0).sum(1)
    # Preconditions: some edge is pruned entirely (0/0 must not leak NaN), some keeps several ops
    # (an edge with a single kept op has q_hat = 1 whatever alpha is, hence no gradient).
    assert (kept_per_edge == 0).any() and (kept_per_edge >= 2).any()
    (q_hat * torch.randn(q_hat.shape, generator=gen)).sum().backward()
    assert torch.isfinite(alpha.grad).all() and alpha.grad.abs().sum() > 0
    assert torch.isfinite(beta.grad).all() and beta.grad.abs().sum() > 0
    assert torch.all(alpha.grad[kept_per_edge == 0] == 0), "a pruned edge passes no gradient"


def test_threshold_rounding_to_one_never_removes_a_nodes_last_input():
    q_hat = derive.dst_coefficients(torch.randn(14, 7), torch.full((4,), 40.0), 1.0)
    assert (q_hat.view(-1) > 0).sum() >= 4


@st.composite
def dst_inputs(draw):
    n_nodes = draw(st.integers(1, 5))
    n_ops = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.floats(0.01, 10.0))
    alpha = torch.randn(derive.num_edges(n_nodes), n_ops, generator=gen) * scale
    beta = torch.randn(n_nodes, generator=gen) * 3
    tau = draw(st.floats(0.05, 2.0))
    return alpha, beta, tau


def node_slices(n_nodes: int):
    start = 0
    for j in range(n_nodes):
        yield slice(start, start + 2 + j)
        start += 2 + j


@settings(max_examples=200, deadline=None)
@given(dst_inputs(), st.floats(0.0, 3.0))
def test_dst_properties(inputs, raise_by):
    alpha, beta, tau = inputs
    q_hat = derive.dst_coefficients(alpha, beta, tau)
    kept = q_hat > 0
    for sl in node_slices(len(beta)):
        assert kept[sl].any(), "every node keeps at least one connection"
    sums = q_hat.sum(1)
    torch.testing.assert_close(sums[kept.any(1)], torch.ones(int(kept.any(1).sum())))
    assert torch.all(sums[~kept.any(1)] == 0)
    higher = derive.dst_coefficients(alpha, beta + raise_by, tau) > 0
    assert not (higher & ~kept).any(), "a raised threshold never adds a connection"


def test_dst_regularizer_is_mean_neg_log_threshold():
    beta = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    reg = derive.dst_regularizer(beta)
    torch.testing.assert_close(reg, -torch.log(torch.sigmoid(beta)).mean())
    reg.backward()
    assert (beta.grad < 0).all(), "descending the regulariser raises every threshold"


def test_top2_mask_by_hand():
    prims = ["none", "sep_conv_3x3", "max_pool_3x3"]
    w = torch.tensor([
        # node 0 (edges from 0, 1): both kept
        [0.9, 0.05, 0.05], [0.1, 0.3, 0.6],
        # node 1 (edges from 0, 1, 2): 'none' is ignored when scoring
        [0.98, 0.01, 0.01], [0.2, 0.7, 0.1], [0.3, 0.2, 0.5],
    ])
    mask = derive.top2_mask(w, prims)
    expected = torch.tensor([[0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_top2_ties_go_to_the_lower_edge_on_every_node():
    """At a low tau the strongest weights of several edges round to exactly 1.0: a tie. The rule
    picks the lower edges, on a node with five inputs too (torch.topk on the CPU picks edges 2
    and 4 of five equal scores), so that masks derived on any device agree."""
    prims = ["none", "sep_conv_3x3", "max_pool_3x3"]
    w = torch.zeros(derive.num_edges(4), 3)
    w[:, 1] = 1.0                                 # every edge: sep_conv_3x3 at weight 1 (saturated)
    w[derive.num_edges(3) + 1, 1] = 0.5           # node 3, edge from state 1: weaker
    mask = derive.top2_mask(w, prims)
    kept = [[i for i, (src, j) in enumerate(derive.edge_layout(4)) if j == node and mask[i].any()]
            for node in range(4)]
    assert kept == [[0, 1], [2, 3], [5, 6], [9, 11]]
    assert [mask[e].nonzero().flatten().tolist() for e in (0, 9, 11)] == [[1], [1], [1]]


def test_dst_mask_is_eq10():
    q = torch.tensor([[0.0, 1.0], [0.3, 0.7]])
    assert torch.equal(derive.dst_mask(q), torch.tensor([[False, True], [True, True]]))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_temperature_schedules(schedule):
    taus = [temperature(schedule, e, 11, 1.0, 0.1) for e in range(11)]
    if schedule == "constant":
        assert taus == [1.0] * 11
        return
    assert taus[0] == pytest.approx(1.0) and taus[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(taus, taus[1:])), "annealing never raises tau"
    mid = {"linear": 0.55, "exponential": math.sqrt(0.1), "cosine": 0.55}[schedule]
    assert taus[5] == pytest.approx(mid)
    if schedule == "cosine":
        assert taus[1] > temperature("linear", 1, 11, 1.0, 0.1), "cosine starts slower than linear"


def test_edge_log_softmax_is_log_p_and_keeps_the_order_p_rounds_away():
    alpha = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(derive.edge_log_softmax(alpha, 0.7), torch.log_softmax(alpha / 0.7, dim=-1))
    leads = torch.zeros(3, 8)
    leads[:, 4] = torch.tensor([2.0, 2.5, 3.0])       # op 4 leads each edge by 2, 2.5 and 3
    p = derive.edge_softmax(leads, 0.1)
    assert (p.max(dim=1).values == 1.0).all(), "float32 p saturates: the three edges would tie"
    strongest = derive.edge_log_softmax(leads, 0.1).max(dim=1).values
    assert strongest[0] < strongest[1] < strongest[2] < 0
