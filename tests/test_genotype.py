import pytest
import torch

from entrannas.genotype import Genotype, GenotypeError, genotype_from_masks, genotype_masks
from entrannas.zoo import ZOO, darts_notation


def test_darts_v2_reads_two_inputs_per_node():
    g = ZOO["DARTS_V2"]
    assert len(g.normal) == 4 and all(len(node) == 2 for node in g.normal)
    assert g.normal[3] == (("skip_connect", 0), ("dil_conv_3x3", 2))
    assert g.reduce_concat == (2, 3, 4, 5)


def test_nasnet_has_five_nodes_and_range_concat_parses():
    assert len(ZOO["NASNet"].normal) == 5 and ZOO["NASNet"].reduce_concat == (4, 5, 6)
    assert ZOO["PC_DARTS"].normal_concat == (2, 3, 4, 5)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_json_and_darts_round_trips(name):
    g = ZOO[name]
    assert Genotype.from_json(g.to_json()) == g
    assert Genotype.from_darts(g.to_darts()) == g
    assert Genotype.from_darts(darts_notation(name)) == g


def test_flexible_topology_round_trips_through_json():
    g = Genotype.build(normal=[[("sep_conv_3x3", 0)], [("skip_connect", 0), ("max_pool_3x3", 1), ("sep_conv_5x5", 2)],
                               [("dil_conv_3x3", 3), ("sep_conv_3x3", 3), ("avg_pool_3x3", 0), ("skip_connect", 1)]],
                       normal_concat=[3, 4], reduce=[[("max_pool_3x3", 1)]], reduce_concat=[2])
    back = Genotype.from_json(g.to_json())
    assert back == g and back.inputs_per_node("normal") == [1, 3, 4]
    with pytest.raises(GenotypeError, match="two inputs per node"):
        g.to_darts()


def test_genotype_is_immutable():
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        ZOO["DARTS_V2"].normal = ()


@pytest.mark.parametrize("normal, concat, message", [
    ([[("conv_9x9", 0)]], [2], "unknown operation 'conv_9x9'"),
    ([[("sep_conv_3x3", 2)]], [2], "input 2, which is not an earlier node"),
    ([[("sep_conv_3x3", 0)], []], [2, 3], "node 3 has no inputs"),
    ([[("sep_conv_3x3", 0)]], [2, 3], "node 3 does not exist"),
    ([[("sep_conv_3x3", 0)]], [1, 2], r"node 1 does not exist \(intermediate nodes are 2\.\.2\)"),
    ([[("none", 0)]], [2], "'none'"),
])
def test_bad_genotypes_say_what_is_wrong(normal, concat, message):
    with pytest.raises(GenotypeError, match=message):
        Genotype.build(normal, concat, [[("max_pool_3x3", 0)]], [2])


@pytest.mark.parametrize("text, message", [
    ("Genotype(normal=[('sep_conv_3x3', 0)", "not DARTS genotype notation|does not parse"),
    ("Genotype(normal=[('sep_conv_3x3', 0)], normal_concat=[2], reduce=[], reduce_concat=[2])", "pairs"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], reduce_concat=[2])", "lacks normal_concat"),
    ("hello", "not DARTS genotype notation"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], reduce=[(", "does not parse"),
])

def test_bad_darts_notation(text, message):
    with pytest.raises(GenotypeError, match=message):
        Genotype.from_darts(text)


def test_darts_notation_with_an_assignment_as_in_genotypes_py():
    assert Genotype.from_darts("DARTS_V2 = " + ZOO["DARTS_V2"].to_darts()) == ZOO["DARTS_V2"]


def test_genotype_from_masks_lists_every_kept_pair():
    prims = ["none", "sep_conv_3x3", "skip_connect"]
    # 2 nodes: edges (0->0), (1->0), (0->1), (1->1), (2->1)
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.bool)
    g = genotype_from_masks(mask, mask, prims, n_nodes=2)
    assert g.normal == ((("sep_conv_3x3", 0), ("skip_connect", 0)),
                        (("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 2), ("skip_connect", 2)))
    assert g.normal_concat == (2, 3)


def test_genotype_masks_inverts_genotype_from_masks():
    prims = ["sep_conv_3x3", "skip_connect", "max_pool_3x3"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        masks = [torch.rand(14, 3, generator=gen) < 0.3 for _ in range(2)]
        for m in masks:   # every node needs an input
            for first in (0, 2, 5, 9):
                m[first, 0] = True
        back = genotype_masks(genotype_from_masks(*masks, prims, n_nodes=4), prims, n_nodes=4)
        assert all(torch.equal(a, b) for a, b in zip(back, masks))


def test_genotype_masks_has_a_column_per_candidate_listed():
    # The masks index the super-net's alphas, one column per entry of primitives; an op listed
    # twice marks its first column.
    g = Genotype.build([[("skip_connect", 0)]], [2], [[("skip_connect", 1)]], [2])
    normal, reduce = genotype_masks(g, ("skip_connect", "max_pool_3x3", "skip_connect"), n_nodes=1)
    assert normal.tolist() == [[True, False, False], [False, False, False]]
    assert reduce.tolist() == [[False, False, False], [True, False, False]]


@pytest.mark.parametrize("genotype, prims, message", [
    ("NASNet", ("sep_conv_3x3",), "5 intermediate nodes"),
    ("DARTS_V2", ("sep_conv_3x3", "max_pool_3x3", "skip_connect"), "'dil_conv_3x3', which is not a candidate"),
])
def test_genotype_masks_refuses_what_a_supernet_cell_cannot_hold(genotype, prims, message):
    with pytest.raises(GenotypeError, match=message):
        genotype_masks(ZOO[genotype], prims, n_nodes=4)
    twice = Genotype.build([[("skip_connect", 0), ("skip_connect", 0)]], [2], [[("skip_connect", 1)]], [2])
    with pytest.raises(GenotypeError, match="twice"):
        genotype_masks(twice, ("skip_connect",), n_nodes=1)
    partial = Genotype.build([[("skip_connect", 0)], [("skip_connect", 2)]], [3], [[("skip_connect", 1)]] * 2, [2, 3])
    with pytest.raises(GenotypeError, match="normal_concat"):
        genotype_masks(partial, ("skip_connect",), n_nodes=2)
