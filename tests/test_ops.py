import pytest
import torch

from entrannas.ops import OPS, ReLUFirst, build_op, check_op_names


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("search", [False, True])
def test_every_op_keeps_channels_and_scales_resolution(name, stride, size, search):
    op = build_op(name, C=4, stride=stride, affine=not search, search=search)
    out = op(torch.randn(2, 4, size, size))
    expected = size if stride == 1 else (size + 1) // 2
    assert out.shape == (2, 4, expected, expected)


def test_pools_get_batchnorm_only_in_search():
    assert isinstance(build_op("max_pool_3x3", 4, 1, search=True), torch.nn.Sequential)
    assert isinstance(build_op("max_pool_3x3", 4, 1, search=False), torch.nn.MaxPool2d)


def test_none_is_exactly_zero_and_skip_is_identity_at_stride_1():
    x = torch.randn(2, 4, 6, 6)
    assert torch.count_nonzero(build_op("none", 4, 2)(x)) == 0
    assert torch.equal(build_op("skip_connect", 4, 1)(x), x)


def test_unknown_op_lists_the_registry():
    with pytest.raises(ValueError, match="unknown operation 'conv_9x9'.*sep_conv_3x3"):
        check_op_names(["sep_conv_3x3", "conv_9x9"])


@pytest.mark.parametrize("stride", [1, 2])
def test_ops_that_begin_with_a_relu_run_from_its_output(stride):
    """A search cell applies each source's ReLU once and feeds it to forward_from_relu."""
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    first = {name for name in OPS if isinstance(build_op(name, 4, stride, search=True), ReLUFirst)}
    convs = {"sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7"}
    assert first == (convs | {"skip_connect"} if stride == 2 else convs)   # skip at stride 2: FactorizedReduce
    for name in first:
        op = build_op(name, 4, stride, search=True)
        torch.testing.assert_close(op.forward_from_relu(torch.relu(x)), op(x), rtol=0, atol=0, msg=name)
