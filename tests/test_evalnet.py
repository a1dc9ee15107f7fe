import pytest
import torch

from bench import OpCounter
from entrannas.evalnet import EvalCell, NetworkCIFAR, NetworkImageNet, count_multiply_adds, count_parameters, drop_path
from entrannas.genotype import Genotype
from entrannas.zoo import ZOO


def op_params(name: str, C: int, stride: int) -> int:
    """Parameters of one op with affine BN, counted from the DARTS layer definitions by hand."""
    bn = 2 * C
    k = {"sep_conv_3x3": 3, "sep_conv_5x5": 5, "sep_conv_7x7": 7, "dil_conv_3x3": 3, "dil_conv_5x5": 5}.get(name)
    if name.startswith("sep_conv"):
        return 2 * (C * k * k + C * C + bn)
    if name.startswith("dil_conv"):
        return C * k * k + C * C + bn
    if name == "skip_connect":
        return 0 if stride == 1 else C * C + bn          # FactorizedReduce: two C x C/2 1x1 convs
    if name == "conv_7x1_1x7":
        return 2 * 7 * C * C + bn
    return 0                                             # pools


def expected_cifar_params(g: Genotype, C: int, layers: int, classes: int) -> int:
    total = 3 * 3 * 3 * (3 * C) + 2 * 3 * C              # stem conv + BN
    C_pp, C_p, C_curr = 3 * C, 3 * C, C
    for index in range(layers):
        reduction = index in (layers // 3, 2 * layers // 3)
        C_curr *= 2 if reduction else 1
        nodes, concat = (g.reduce, g.reduce_concat) if reduction else (g.normal, g.normal_concat)
        total += C_pp * C_curr + 2 * C_curr               # preprocess0 (ReLUConvBN or FactorizedReduce)
        total += C_p * C_curr + 2 * C_curr                # preprocess1
        total += sum(op_params(op, C_curr, 2 if reduction and i < 2 else 1) for node in nodes for op, i in node)
        C_pp, C_p = C_p, len(concat) * C_curr
    return total + C_p * classes + classes


def test_darts_v2_has_the_published_parameter_count():
    assert count_parameters(NetworkCIFAR(ZOO["DARTS_V2"], 36, 20, 10, auxiliary=True)) == 3_349_342


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_published_genotype_matches_the_layer_by_layer_count(name):
    net = NetworkCIFAR(ZOO[name], 36, 20, 10, auxiliary=True)
    assert count_parameters(net) == expected_cifar_params(ZOO[name], 36, 20, 10)
    assert count_parameters(net) < sum(p.numel() for p in net.parameters()), "aux head excluded"


def test_cifar_and_imagenet_networks_run_at_their_input_sizes():
    net = NetworkCIFAR(ZOO["DARTS_V2"], 36, 20, 10, auxiliary=True).train()
    logits, aux = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == aux.shape == (2, 10)
    net = NetworkImageNet(ZOO["DARTS_V2"], 48, 14, 1000, auxiliary=True).train()
    logits, aux = net(torch.randn(2, 3, 224, 224))
    assert logits.shape == aux.shape == (2, 1000)
    assert 4.5e6 < count_parameters(net) < 5.0e6, "DARTS reports 4.7M in the mobile setting"


FLEXIBLE = Genotype.build(
    normal=[[("sep_conv_3x3", 1)],                                                  # one input
            [("skip_connect", 0), ("dil_conv_3x3", 2)],                             # two, one intermediate
            [("max_pool_3x3", 0), ("sep_conv_5x5", 1), ("skip_connect", 2), ("avg_pool_3x3", 3)],  # four
            [("sep_conv_3x3", 4)],
            [("skip_connect", 5), ("dil_conv_5x5", 3), ("sep_conv_7x7", 1)]],       # a fifth node
    normal_concat=[3, 5, 6],                                                        # a subset
    reduce=[[("max_pool_3x3", 0), ("conv_7x1_1x7", 1), ("skip_connect", 0)], [("sep_conv_3x3", 2)]],
    reduce_concat=[2, 3])


def test_flexible_genotypes_build_and_keep_shapes():
    net = NetworkCIFAR(FLEXIBLE, C=8, layers=5, num_classes=10).eval()
    shapes = []
    for cell in net.cells:
        cell.register_forward_hook(lambda m, a, o: shapes.append(tuple(o.shape[1:])))
    logits, aux = net(torch.randn(2, 3, 16, 16))
    assert logits.shape == (2, 10) and aux is None
    # normal cells concat 3 nodes of C channels; reductions (cells 1, 3) concat 2 nodes of 2C, 4C
    assert shapes == [(24, 16, 16), (32, 8, 8), (48, 8, 8), (64, 4, 4), (96, 4, 4)]
    assert count_parameters(net) == expected_cifar_params(FLEXIBLE, 8, 5, 10)
    assert Genotype.from_json(FLEXIBLE.to_json()) == FLEXIBLE


def test_drop_path_acts_only_in_training():
    torch.manual_seed(0)
    net = NetworkCIFAR(ZOO["DARTS_V2"], C=8, layers=3, num_classes=10)
    x = torch.randn(4, 3, 8, 8)
    net.train()
    net.drop_path_prob = 0.0
    clean = net(x)[0]
    net.drop_path_prob = 0.5
    assert not torch.allclose(net(x)[0], clean)
    net.eval()
    net.drop_path_prob = 0.0
    eval_clean = net(x)[0]
    net.drop_path_prob = 0.5
    assert torch.equal(net(x)[0], eval_clean)


def test_drop_path_zeroes_whole_samples_and_rescales_the_rest():
    """DARTS' drop_path: each sample of a path is either all zero or divided by the keep
    probability, so the path's expected value is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(256, 3, 4, 4) + 5.0   # no zero entries
    out = drop_path(x, 0.25)
    dropped = (out == 0).flatten(1).all(dim=1)
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.75)
    assert 0.1 < dropped.float().mean() < 0.4


def test_drop_path_leaves_skip_connections_alone():
    """DARTS drops every op of a node but the identity: a cell whose nodes are all skip connections
    computes the same in training with any drop-path probability."""
    skips = [[("skip_connect", 1), ("skip_connect", 0)]] * 4
    convs = [[("sep_conv_3x3", 1), ("skip_connect", 0)]] * 4
    for nodes, same in ((skips, True), (convs, False)):
        torch.manual_seed(0)
        cell = EvalCell(nodes, [2, 3, 4, 5], 6, 6, 6, reduction=False, reduction_prev=False).train()
        s0, s1 = torch.randn(8, 6, 4, 4), torch.randn(8, 6, 4, 4)
        assert torch.equal(cell(s0, s1, 0.9), cell(s0, s1, 0.0)) == same


def test_auxiliary_head_only_in_training():
    net = NetworkCIFAR(ZOO["DARTS_V1"], C=8, layers=5, num_classes=10, auxiliary=True)
    assert net.train()(torch.randn(2, 3, 32, 32))[1] is not None
    assert net.eval()(torch.randn(2, 3, 32, 32))[1] is None


def test_multiply_adds_come_from_the_flop_counter():
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False))
    assert count_multiply_adds(conv, (3, 8, 8)) == 8 * 3 * 9 * 64
    m = count_multiply_adds(NetworkCIFAR(ZOO["DARTS_V2"], 36, 20, 10, auxiliary=True), (3, 32, 32))
    assert 4.5e8 < m < 6.0e8, "DARTS_V2 is about half a billion multiply-adds on CIFAR"


def darts_forward(net, x):
    """DARTS' own loop: every cell ReLUs its two inputs itself (the aux head's first ReLU in place)."""
    if isinstance(net, NetworkImageNet):
        s0 = net.stem0(x)
        s1 = net.stem1(s0)
    else:
        s0 = s1 = net.stem(x)
    logits_aux = None
    for index, cell in enumerate(net.cells):
        s0, s1 = s1, cell(s0, s1, net.drop_path_prob)
        if index == 2 * len(net.cells) // 3 and net.auxiliary_head is not None and net.training:
            logits_aux = net.auxiliary_head(s1)
    return net.classifier(net.global_pooling(s1).flatten(1)), logits_aux


@pytest.mark.parametrize("network", ["cifar", "imagenet"])
def test_the_network_relus_each_state_once_and_computes_what_darts_does(network):
    """Each state feeds two cells whose preprocessings begin with its ReLU; the network applies it
    once. Logits, auxiliary logits and every gradient equal DARTS' loop (training mode, drop path on,
    the same random draws), with one ReLU fewer per state that two cells take."""
    torch.manual_seed(0)
    if network == "cifar":
        net, x = NetworkCIFAR(FLEXIBLE, C=8, layers=6, num_classes=10, auxiliary=True), torch.randn(3, 3, 32, 32)
    else:
        net, x = NetworkImageNet(FLEXIBLE, C=8, layers=6, num_classes=10, auxiliary=True), torch.randn(3, 3, 224, 224)
    net.train()
    net.drop_path_prob = 0.3
    results = []
    for forward in (net, lambda x: darts_forward(net, x)):
        torch.manual_seed(1)
        with OpCounter() as ops:
            logits, aux = forward(x)
        loss = logits.square().sum() + aux.square().sum()
        results.append((logits, aux, torch.autograd.grad(loss, list(net.parameters())), ops.calls["relu"]))
    (logits, aux, grads, relus), (d_logits, d_aux, d_grads, d_relus) = results
    torch.testing.assert_close(logits, d_logits, rtol=0, atol=0)
    torch.testing.assert_close(aux, d_aux, rtol=0, atol=0)
    for a, b in zip(grads, d_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # DARTS: 2 per cell; here one per state: the stem's output (cifar: s0 and s1 of cell 0; imagenet: two
    # states, DARTS' stem1 keeping its own in-place ReLU) and every cell's output but the last
    n = len(net.cells)
    assert d_relus - relus == (n if network == "cifar" else n - 1)
