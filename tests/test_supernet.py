"""The super-net computes what the paper's Eqs. 3-10 say: each cell against ``cells.reference_cell``, the
method written edge by edge and op by op (docs/method.md)."""

import pytest
import torch

from bench import OpCounter
from entrannas import derive, supernet
from entrannas.cells import CellPlan, SearchCell, reference_cell
from entrannas.genotype import N_INPUTS, Genotype, GenotypeError, genotype_masks
from entrannas.ops import DARTS_PRIMITIVES, ReLUFirst
from entrannas.supernet import SearchNetwork, SupernetSpec
from entrannas.zoo import ZOO

from conftest import cotangent_loss, tiny_batch, tiny_config, tiny_net

DST_PRIMS = tuple(p for p in DARTS_PRIMITIVES if p != "none")


def make_cell(primitives, sharing=True, ratio=1, reduction=False, engine=True, C=8):
    torch.manual_seed(0)
    cell = SearchCell(primitives, n_nodes=4, C_pp=C, C_p=C, C=C, reduction=reduction, reduction_prev=False,
                      sharing=sharing, ratio=ratio, engine=engine).eval()
    return cell


def run_cell(net_like_mask, cell, weights, s0, s1, engine):
    plan = CellPlan(net_like_mask, cell.n_nodes, cell.sharing, s0.device)
    coef = weights[plan.rows, plan.cols] if engine else None
    return cell(s0, s1, plan, coef)


@pytest.mark.parametrize("sharing", [True, False])
@pytest.mark.parametrize("ratio", [1, 4])
@pytest.mark.parametrize("reduction", [False, True])
def test_dst_engine_cell_equals_its_derived_cell(sharing, ratio, reduction):
    """Eq. 10: the Engine-cell's output is the derived cell's, each op scaled by its q_hat."""
    cell = make_cell(DST_PRIMS, sharing, ratio, reduction)
    gen = torch.Generator().manual_seed(1)
    alpha = torch.randn(14, len(DST_PRIMS), generator=gen) * 2
    beta = torch.tensor([0.3, 0.5, 0.8, 1.0])
    q_hat = derive.dst_coefficients(alpha, beta, tau=0.7)
    mask = derive.dst_mask(q_hat)
    assert 0 < mask.sum() < mask.numel() / 2, "the thresholds prune a good part of the DAG"
    s0, s1 = torch.randn(2, 8, 8, 8, generator=gen), torch.randn(2, 8, 8, 8, generator=gen)
    with torch.no_grad():
        out = run_cell(mask, cell, q_hat, s0, s1, engine=True)
        derived = reference_cell(cell, s0, s1, lambda e, k: q_hat[e, k] if mask[e, k] else 0)
        dense = reference_cell(cell, s0, s1, lambda e, k: q_hat[e, k] + 0.0 * k)   # every op, zeros too
    torch.testing.assert_close(out, derived, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", [True, False])
def test_entrannas_engine_cell_is_the_softmax_mixture(sharing):
    """Eq. 6 with p = softmax(alpha / tau) over every op, 'none' included (it adds exactly 0)."""
    cell = make_cell(DARTS_PRIMITIVES, sharing, ratio=2)
    alpha = torch.randn(14, len(DARTS_PRIMITIVES))
    p = derive.edge_softmax(alpha, 0.5)
    mask = torch.ones_like(p, dtype=torch.bool)
    mask[:, 0] = False
    s0, s1 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = run_cell(mask, cell, p, s0, s1, engine=True)
        ref = reference_cell(cell, s0, s1, lambda e, k: p[e, k])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def count_calls(cell):
    """How often each (slot, op) ran, by its forward or (ops that begin with a ReLU, fed one ReLU
    per source) by its forward_from_relu."""
    calls = {}
    hooks = []
    for slot, ops in enumerate(cell.ops):
        for k, op in enumerate(ops):
            bump = lambda key=(slot, k): calls.__setitem__(key, calls.get(key, 0) + 1)   # noqa: E731
            hooks.append(op.register_forward_hook(lambda m, a, o, bump=bump: bump()))
            if isinstance(op, ReLUFirst):
                op.forward_from_relu = lambda r, inner=op.forward_from_relu, bump=bump: (bump(), inner(r))[1]
    return calls, hooks


@pytest.mark.parametrize("sharing", [True, False])
def test_transit_cell_runs_only_its_derived_set(sharing):
    cell = make_cell(DARTS_PRIMITIVES, sharing, ratio=1, engine=False)
    alpha = torch.randn(14, len(DARTS_PRIMITIVES))
    mask = derive.top2_mask(derive.edge_softmax(alpha, 1.0), DARTS_PRIMITIVES)
    calls, _ = count_calls(cell)
    s0, s1 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = run_cell(mask, cell, None, s0, s1, engine=False)
    layout = derive.edge_layout(4)
    expected = {((i if sharing else e), k) for e, (i, _) in enumerate(layout) for k in range(len(DARTS_PRIMITIVES))
                if mask[e, k]}
    assert set(calls) == expected, "exactly the ops of the derived set run"
    assert all(n == 1 for n in calls.values()), "each op feature is computed once"
    with torch.no_grad():
        ref = reference_cell(cell, s0, s1, lambda e, k: 1.0 if mask[e, k] else 0)   # Eq. 3: plain sum
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_feature_sharing_computes_each_source_op_once_for_all_targets():
    cell = make_cell(DARTS_PRIMITIVES, sharing=True, ratio=1, engine=True)
    calls, _ = count_calls(cell)
    mask = torch.ones(14, len(DARTS_PRIMITIVES), dtype=torch.bool)
    mask[:, 0] = False
    with torch.no_grad():
        run_cell(mask, cell, torch.rand(14, len(DARTS_PRIMITIVES)), torch.randn(2, 8, 6, 6),
                 torch.randn(2, 8, 6, 6), engine=True)
    # sources 0..4 each feed several nodes, yet each (source, op) runs once: 5 x 7 calls
    assert len(calls) == 5 * 7 and all(n == 1 for n in calls.values())


@pytest.mark.parametrize("nodes", [3, 4, 5])
def test_op_instance_counts_with_and_without_sharing(nodes):
    K = len(DARTS_PRIMITIVES)
    for sharing, expected in ((True, (N_INPUTS + nodes - 1) * K), (False, derive.num_edges(nodes) * K)):
        net = tiny_net(nodes=nodes, feature_sharing=sharing, bottleneck_ratio=1, mode="entrannas")
        for cell in net.cells:
            assert sum(len(ops) for ops in cell.ops) == expected


def test_arch_parameters_are_registered_and_split_from_weights():
    net = tiny_net(mode="dst")
    names = {n for n, _ in net.named_parameters()}
    assert {"alpha_normal", "alpha_reduce", "beta_normal", "beta_reduce"} <= names
    arch, weights = net.arch_parameters(), net.weight_parameters()
    assert len(arch) == 4 and not {id(p) for p in arch} & {id(p) for p in weights}
    assert len(arch) + len(weights) == len(list(net.parameters()))
    assert "alpha_normal" in net.state_dict() and "beta_reduce" in net.state_dict()
    assert net.to(torch.float64).alpha_normal.dtype == torch.float64
    assert tiny_net(mode="entrannas").beta_normal is None


def test_bottleneck_runs_ops_on_fewer_channels():
    net = tiny_net(mode="entrannas", bottleneck_ratio=2, init_channels=8)
    cell = net.cells[0]
    conv = cell.ops[0][DARTS_PRIMITIVES.index("sep_conv_3x3")][0][1]
    assert conv.in_channels == 4 and cell.expand[0][0].out_channels == 8
    assert tiny_net(mode="entrannas", bottleneck_ratio=1).cells[0].squeeze is None


@pytest.mark.parametrize("layers, reductions", [(8, (2, 5)), (5, (1, 3))])
def test_reduction_cells_sit_at_one_and_two_thirds_of_the_depth(layers, reductions):
    """The search space: reductions at layers // 3 and 2 * layers // 3, where the resolution halves and the
    channels double; the config's list (placement, the bench) agrees with the net."""
    config = tiny_config(mode="entrannas", layers=layers)
    net = tiny_net(mode="entrannas", layers=layers)
    assert tuple(config.reduction_cells()) == reductions
    assert [cell.reduction for cell in net.cells] == [i in reductions for i in range(layers)]
    shapes = []
    for cell in net.cells:
        cell.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[1:])))
    net(torch.randn(2, 1, 8, 8))
    C, size, expected = 4, 8, []
    for i in range(layers):
        if i in reductions:
            C, size = 2 * C, size // 2
        expected.append((4 * C, size, size))   # 4 nodes concatenated
    assert shapes == expected


def test_search_cells_normalise_without_affine_parameters():
    """The search space: in search every BN of a cell is affine=False (DARTS), the pools' added BNs and the
    bottleneck's included: a cell's only weights are convolutions."""
    net = tiny_net(mode="dst", bottleneck_ratio=2, init_channels=8)
    norms = [m for cell in net.cells for m in cell.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.affine for m in norms)
    assert {type(m) for cell in net.cells for m in cell.modules() if list(m.parameters(recurse=False))} \
        == {torch.nn.Conv2d}


def capture_cells(net):
    """Run each cell on detached inputs, so a cell's output depends on alpha only through itself."""
    outs = {}

    def pre(module, args):
        return (args[0].detach(), args[1].detach(), *args[2:])

    for index, cell in enumerate(net.cells):
        cell.register_forward_pre_hook(pre)
        cell.register_forward_hook(lambda m, a, o, index=index: outs.__setitem__(index, o))
    return outs


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_only_engine_cells_pass_gradient_to_alpha(mode):
    net = tiny_net(mode=mode, placement="first", beta_init=-1.0)   # engines: cells 0 and 1 of 3
    outs = capture_cells(net)
    net(torch.randn(4, 1, 8, 8))
    arch = net.arch_parameters()
    for index, out in outs.items():
        grads = torch.autograd.grad(out.pow(2).sum(), arch, allow_unused=True, retain_graph=True)
        touched = any(g is not None and g.abs().sum() > 0 for g in grads)
        assert touched == net.cells[index].engine, f"cell {index}"


def test_transit_cells_run_the_genotype_of_this_iteration():
    net = tiny_net(mode="entrannas", placement=[0, 1])
    net(torch.randn(2, 1, 8, 8))
    g = net.genotype()
    mask_n, _ = net.derived.masks
    assert sum(len(node) for node in g.normal) == int(mask_n.sum()) == 2 * 4
    with torch.no_grad():
        net.alpha_normal[:, DARTS_PRIMITIVES.index("max_pool_3x3")] += 5.0
    net.arch_changed()
    net(torch.randn(2, 1, 8, 8))
    assert all(op == "max_pool_3x3" for node in net.genotype().normal for op, _ in node), \
        "derivation follows alpha at every iteration"


def test_darts_configuration_is_the_darts_supernet():
    config = tiny_config(mode="darts")
    assert config.engine_cells() == {0, 1, 2} and not config.feature_sharing and config.bottleneck_ratio == 1
    assert config.tau_schedule == "constant" and config.tau_start == 1.0


def test_imagenet_stem_takes_224_to_28():
    config = tiny_config(mode="entrannas")
    net = SearchNetwork(SupernetSpec.from_config(config, num_classes=5, in_channels=3, stem="imagenet"))
    sizes = []
    net.cells[0].register_forward_pre_hook(lambda m, a: sizes.append((a[0].shape[-1], a[1].shape[-1])))
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 5)
    assert sizes == [(56, 28)]


def test_the_architecture_is_derived_when_asked_after_an_arch_change_or_a_new_tau():
    """Every pass runs what ``derive()`` last read: derived again after ``arch_changed()`` (the
    optimiser derives after each arch step), a new tau, or loading a state; an edit of alpha by hand
    is seen once it is announced."""
    net = tiny_net(mode="dst")
    x = torch.randn(4, 1, 8, 8)
    net(x)
    net(x, arch_grad=False)
    with torch.no_grad():
        net(x)
    assert net.derivations == 1
    with torch.no_grad():
        net.alpha_normal[0, 0] += 5.0
    net(x)
    assert net.derivations == 1          # not announced: the derived architecture stays
    net.arch_changed()
    net(x)
    assert net.derivations == 2
    net.tau = 0.5
    net(x)
    assert net.derivations == 3
    net.load_state_dict(net.state_dict())
    net(x)
    assert net.derivations == 4


def test_cached_structure_follows_the_current_alpha():
    net = tiny_net(mode="entrannas")
    x = torch.randn(4, 1, 8, 8)
    net(x)
    with torch.no_grad():                # make edge 0's op 'sep_conv_3x3' win by far
        net.alpha_normal[0] = -10.0
        net.alpha_normal[0, net.primitives.index("sep_conv_3x3")] = 10.0
    net.derive()
    net(x)
    fresh = net.derived_masks()
    assert torch.equal(net.derived.masks[0], fresh[0]) and net.derived.masks[0][0].nonzero().tolist() == [
        [net.primitives.index("sep_conv_3x3")]]


@pytest.mark.parametrize("sharing", [True, False])
def test_a_cell_applies_one_relu_per_source(sharing):
    """Every conv op begins with a ReLU of its source; the cell computes it once per source."""
    cell = make_cell(DST_PRIMS, sharing, engine=True)
    mask = torch.ones(14, len(DST_PRIMS), dtype=torch.bool)
    s0, s1 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    with torch.no_grad(), OpCounter() as ops:
        run_cell(mask, cell, torch.rand(14, len(DST_PRIMS)), s0, s1, engine=True)
    n_sources, n_sep_convs = 5, 2   # sep_conv_3x3/5x5 have a second ReLU inside, on their own feature
    n_slots = n_sources if sharing else 14
    assert ops.calls["relu"] == 2 + n_sources + n_sep_convs * n_slots   # 2: the preprocessing


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
@pytest.mark.parametrize("stem", ["cifar", "imagenet"])
def test_the_network_applies_each_states_relu_once_for_the_two_cells_that_take_it(mode, stem):
    """Cell k's output is s1 of cell k + 1 and s0 of cell k + 2, and both preprocessings begin with a
    ReLU of it: the network runs that ReLU once per state. Same logits and gradients as every cell
    applying its own (the plain loop below), and one ReLU fewer per state that two cells take."""
    torch.manual_seed(0)
    net = SearchNetwork(SupernetSpec.from_config(tiny_config(mode=mode), num_classes=10, in_channels=3, stem=stem))
    x = torch.randn(2, 3, 224 if stem == "imagenet" else 16, 224 if stem == "imagenet" else 16)
    structure = net.derive(x.device)
    w_normal, w_reduce = net.arch_weights()

    def plain():   # each cell from the raw states, as a cell called on its own
        s0 = net.stem0(x)
        s1 = s0 if net.stem1 is None else net.stem1(s0)
        for cell, plan in zip(net.cells, structure.plans):
            w = w_reduce if cell.reduction else w_normal
            coef = w[plan.rows, plan.cols] if cell.engine else None
            s0, s1 = s1, cell(s0, s1, plan, coef)
        return net.classifier(net.global_pooling(s1).flatten(1))

    results = []
    for run in (lambda: net.run_plans(structure.plans, x, w_normal, w_reduce), plain):
        with OpCounter() as ops:
            logits = run()
        grads = torch.autograd.grad(logits.square().sum(), list(net.parameters()), allow_unused=True,
                                    retain_graph=True)
        results.append((logits, grads, ops.calls["relu"]))
    (shared, shared_grads, shared_relus), (own, own_grads, own_relus) = results
    torch.testing.assert_close(shared, own, rtol=0, atol=0)
    for a, b in zip(shared_grads, own_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # Each cell's own: 2 per cell (and the imagenet stem1's own, of the stem's output). Shared: one per
    # state a cell takes: the stem's output (the cifar stem's is s0 and s1 of cell 0), the imagenet
    # stem1's, and every cell's output but the last. Either way one ReLU fewer per cell.
    assert own_relus - shared_relus == len(net.cells)


def test_a_dense_transit_cell_sums_each_source_once():
    """DST's initial structure keeps every op of every edge: node j adds up the ops of each source,
    summed once per source and shared by the nodes it feeds; the output is still the plain sum."""
    cell = make_cell(DST_PRIMS, sharing=True, engine=False)
    mask = torch.ones(14, len(DST_PRIMS), dtype=torch.bool)
    s0, s1 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    with torch.no_grad(), OpCounter() as ops:
        out = run_cell(mask, cell, None, s0, s1, engine=False)
    K = len(DST_PRIMS)
    per_source = 5 * (K - 1)          # 5 sources, each summed over its K ops once
    across = 1 + 2 + 3 + 4            # node j adds the sums of its 2 + j sources
    assert ops.calls["add"] == per_source + across   # (one add per (edge, op) would be 94)
    with torch.no_grad():
        ref = reference_cell(cell, s0, s1, lambda e, k: 1.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_weighted_sums_mix_stacked_features_in_their_memory_order(channels_last):
    from entrannas.cells import weighted_sums

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    feats = torch.stack([torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt) for _ in range(6)])
    weights = torch.randn(3, 6)
    out = weighted_sums(weights, feats)
    torch.testing.assert_close(out, torch.einsum("nk,kbchw->nbchw", weights, feats))
    assert all(o.is_contiguous(memory_format=fmt) for o in out)


@pytest.mark.parametrize("sharing", [True, False])
def test_an_engine_cell_mixes_each_slot_for_all_its_nodes_at_once(sharing):
    """One matrix product per slot (per source with feature sharing), not one per edge."""
    cell = make_cell(DST_PRIMS, sharing, engine=True)
    mask = torch.ones(14, len(DST_PRIMS), dtype=torch.bool)
    s0, s1 = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    weights = torch.rand(14, len(DST_PRIMS))
    with torch.no_grad(), OpCounter() as ops:
        out = run_cell(mask, cell, weights, s0, s1, engine=True)
    assert ops.calls["mm"] == (5 if sharing else 14)
    with torch.no_grad():
        ref = reference_cell(cell, s0, s1, lambda e, k: weights[e, k])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _params_and_grads(net):
    return [(name, p.grad) for name, p in net.named_parameters()]


def test_a_loss_with_one_gradient_for_all_samples_leaves_none_behind_the_last_batch_norm():
    """Why the tests that compare gradients use ``cotangent_loss``: the last cell's states leave through
    batch norms with batch statistics, which pass back nothing that is the same for every sample and
    position, and ``(logits * c).sum()`` sends back exactly that. Everything before them then gets a
    gradient of 0 plus rounding, which any two passes match."""
    net = tiny_net(seed=0).double()
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (net(x) * torch.arange(10)).sum().backward()
    stem = net.stem0[0].weight.grad.abs().max().item()
    net.zero_grad(set_to_none=True)
    cotangent_loss(net(x)).backward()
    assert stem < 1e-12 < 1e-3 < net.stem0[0].weight.grad.abs().max().item()


def test_a_search_that_keeps_changing_its_architecture_keeps_a_bounded_number_of_plans(monkeypatch):
    """Plans are kept for the ``PLAN_CACHE`` most recently derived cells; one dropped and derived
    again is rebuilt, with the same result."""
    monkeypatch.setattr(supernet, "PLAN_CACHE", 2)
    net = tiny_net(seed=0, mode="entrannas")
    x = torch.randn(4, 1, 8, 8)
    first = None
    for shift in (1, 2, 3, 4, 1):   # four derived architectures, then the first again (by then dropped)
        with torch.no_grad():
            for alpha in (net.alpha_normal, net.alpha_reduce):
                alpha.zero_()
                alpha[:, shift] = 5.0
        net.arch_changed()
        out = net(x)
        assert len(net._plans) <= 2
        first = out if first is None else first
    assert torch.equal(out, first)
    assert net.genotype().normal[0][0][0] == net.primitives[1]


def test_top2_derivation_ranks_edges_that_float32_p_would_tie():
    """At tau = 0.1 an op leading its edge by 2 or more has p = 1.0 in float32; the derivation still
    keeps the two edges with the larger leads (node 1: edges from states 0, 1, 2)."""
    net = tiny_net(seed=0, mode="entrannas")
    net.tau = 0.1
    sep = net.primitives.index("sep_conv_3x3")
    with torch.no_grad():
        net.alpha_normal.zero_()
        net.alpha_normal[2:5, sep] = torch.tensor([2.0, 2.5, 3.0])   # node 1's three edges
    node1 = net.genotype().normal[1]
    assert sorted(src for _, src in node1) == [1, 2] and all(op == "sep_conv_3x3" for op, _ in node1)


FLEXIBLE = Genotype.build(   # DST's kind: 1, 3, 2 and 4 inputs, two ops on one edge
    [[("sep_conv_3x3", 1)], [("skip_connect", 0), ("dil_conv_5x5", 0), ("max_pool_3x3", 2)],
     [("avg_pool_3x3", 3), ("sep_conv_5x5", 1)],
     [("skip_connect", 0), ("skip_connect", 1), ("sep_conv_3x3", 4), ("dil_conv_3x3", 4)]], [2, 3, 4, 5],
    [[("max_pool_3x3", 0), ("max_pool_3x3", 1)]] + [[("skip_connect", j)] for j in (2, 3, 4)], [2, 3, 4, 5])


@pytest.mark.parametrize("mode", ["entrannas", "darts", "dst"])
@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_set_architecture_makes_the_derivation_give_the_genotype(mode, tau):
    net = tiny_net(mode=mode)
    net.tau = tau
    choices = ["DARTS_V2", "PC_DARTS"] + (["FLEXIBLE"] if mode == "dst" else [])
    for name in choices:
        genotype = FLEXIBLE if name == "FLEXIBLE" else ZOO[name]
        net.set_architecture(genotype)
        derived = genotype_masks(net.genotype(), net.primitives, net.spec.nodes)
        assert all(torch.equal(a, b) for a, b in zip(derived, genotype_masks(genotype, net.primitives, 4))), name
        # the structure a forward runs is the genotype's too (a new key after each change)
        net(tiny_batch(0)[0])
        assert torch.equal(net.derived.masks[0], derived[0]) and torch.equal(net.derived.masks[1], derived[1])


def test_set_architecture_refuses_what_the_mode_cannot_derive_and_keeps_alpha():
    top2 = tiny_net(mode="entrannas")
    before = [p.detach().clone() for p in top2.arch_parameters()]
    with pytest.raises(GenotypeError, match="node 2 takes 1 input.s. from 1 state"):
        top2.set_architecture(FLEXIBLE)
    dst = tiny_net(mode="dst")
    prims = dst.primitives
    every_op = Genotype.build([[("skip_connect", 0)], [(op, 0) for op in prims], [("skip_connect", 0)],
                               [("skip_connect", 0)]], [2, 3, 4, 5], FLEXIBLE.reduce, [2, 3, 4, 5])
    dst_before = [p.detach().clone() for p in dst.arch_parameters()]
    with pytest.raises(GenotypeError, match="node 3 cannot be derived by DST"):
        dst.set_architecture(every_op)
    for net, saved in ((top2, before), (dst, dst_before)):
        assert all(torch.equal(p, s) for p, s in zip(net.arch_parameters(), saved))


def test_op_streams_fork_before_and_join_after_the_ops_of_each_source(monkeypatch):
    """op_streams: each source's ops are dealt round-robin over the current stream and the side
    streams, which wait for the current stream first; the current stream waits for each side stream
    before the results are read. Stand-in streams on the CPU: the same outputs and gradients as one
    stream, and the fork/join order logged."""
    from contextlib import contextmanager

    log, current = [], []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    main = Stream("main")
    current.append(main)

    @contextmanager
    def on(stream):
        log.append(("on", stream.name))
        current.append(stream)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", on)
    plain, spread = tiny_net(mode="dst"), tiny_net(mode="dst", op_streams=3)
    spread.op_streams._side[torch.device("cpu")] = [Stream("s1"), Stream("s2")]   # what prepare() makes on CUDA
    x, _ = tiny_batch(0)
    outs = [net(x) for net in (plain, spread)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    for out in outs:
        cotangent_loss(out).backward()
    for a, b in zip(spread.parameters(), plain.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    # DST's initial cells run all 7 ops of each of the 5 sources: 3 cells x 5 forks of 7 ops
    forks = [i for i, e in enumerate(log) if e == ("wait", "s1", "main")]
    assert len(forks) == 3 * 5
    for start in forks:
        assert log[start:start + 2] == [("wait", "s1", "main"), ("wait", "s2", "main")]
        assert [e[1] for e in log[start + 2:start + 9]] == ["main", "s1", "s2", "main", "s1", "s2", "main"]
        assert log[start + 9:start + 11] == [("wait", "main", "s1"), ("wait", "main", "s2")]
    assert current == [main]


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_derived_forward_runs_every_cell_as_a_transit_cell(mode):
    """``derived_forward``: the derived architecture with the super-net's weights, the
    Engine-cells run as Transit-cells too (Eq. 3). A copy whose cells are all Transit-cells
    computes it; the super-net itself differs where its Engine-cells mix more than that."""
    import copy

    net = tiny_net(mode=mode).eval()
    net.set_architecture(ZOO["DARTS_V2"])
    x = tiny_batch(0)[0]
    transit = copy.deepcopy(net)
    for cell in transit.cells:
        cell.engine = False
    with torch.no_grad():
        assert torch.equal(net.derived_forward(x), transit(x))
        if mode == "dst":   # one op per kept edge: q_hat is 1 there, 0 elsewhere, so no gap
            assert torch.allclose(net(x), net.derived_forward(x), atol=1e-6)
        else:               # the Engine-cells' edges that top-2 drops still add their mixtures
            assert not torch.allclose(net(x), net.derived_forward(x), atol=1e-3)
