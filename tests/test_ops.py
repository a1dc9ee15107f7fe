import pytest
import torch
import torch.nn.functional as F

from entrannas.ops import OPS, FactorizedReduce, ReLUFirst, build_op, check_op_names


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


@pytest.mark.parametrize("size", [(8, 8), (7, 7), (8, 5)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_factorized_reduce_is_two_offset_strided_convs(size, channels_last):
    """The DARTS definition, written out: a stride-2 1x1 conv on the ReLU'd input and another on it
    shifted by one pixel (zero-padded at the far edge), concatenated, batch-normalised. Ours runs
    them as one 2x2 conv; values and every gradient must match."""
    torch.manual_seed(0)
    op = FactorizedReduce(6, 8, affine=True).double()
    x = torch.randn(3, 6, *size, dtype=torch.double)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)

    def reference(x):
        r = torch.relu(x)
        shifted = F.pad(r[:, :, 1:, 1:], (0, 1, 0, 1))
        halves = [F.conv2d(r, op.conv_1.weight, stride=2), F.conv2d(shifted, op.conv_2.weight, stride=2)]
        return op.bn(torch.cat(halves, dim=1))

    grad_out = torch.randn(3, 8, (size[0] + 1) // 2, (size[1] + 1) // 2, dtype=torch.double)
    results = []
    for fn in (op, reference):
        out = fn(x)
        grads = torch.autograd.grad(out, [x, op.conv_1.weight, op.conv_2.weight, op.bn.weight], grad_out)
        results.append((out, *grads))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def _square(offsets) -> set[tuple[int, int]]:
    return {(a, b) for a in offsets for b in offsets}


#: The input pixels (offsets from the output pixel) each op reads at stride 1, from the DARTS layer
#: definitions: a k x k kernel with dilation d reaches d * (-(k // 2) .. k // 2); sep_conv stacks
#: two k x k convs, so it reaches twice as far; conv_7x1_1x7 is a 1x7 then a 7x1.
REACH = {
    "skip_connect": _square([0]),
    "max_pool_3x3": _square(range(-1, 2)),
    "avg_pool_3x3": _square(range(-1, 2)),
    "sep_conv_3x3": _square(range(-2, 3)),
    "sep_conv_5x5": _square(range(-4, 5)),
    "sep_conv_7x7": _square(range(-6, 7)),
    "dil_conv_3x3": _square(range(-2, 3, 2)),
    "dil_conv_5x5": _square(range(-4, 5, 2)),
    "conv_7x1_1x7": _square(range(-3, 4)),
}


@pytest.mark.parametrize("name", sorted(REACH))
def test_each_op_reads_the_pixels_its_darts_definition_reads(name):
    """Which input pixels change the centre output pixel: one input per pixel of a 17x17 image,
    that pixel raised. Positive inputs and weights, and BN in eval mode (per sample), so no ReLU
    or cancellation hides a pixel. Kernel size, padding and dilation each change the set."""
    assert set(REACH) == set(OPS) - {"none"}
    op = build_op(name, C=2, stride=1, affine=False).double().eval()
    with torch.no_grad():
        for p in op.parameters():
            p.abs_().add_(0.1)
    size, centre = 17, 8
    base = torch.rand(1, 2, size, size, dtype=torch.double) + 1.0
    raised = base.repeat(size * size, 1, 1, 1)
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    raised[torch.arange(size * size), :, rows.flatten(), cols.flatten()] += 10.0
    with torch.no_grad():
        out = op(torch.cat([base, raised]))[:, :, centre, centre]
    changed = (out[1:] - out[0]).abs().amax(dim=1) > 1e-9
    reached = {(r - centre, c - centre)
               for r, c in zip(rows.flatten()[changed].tolist(), cols.flatten()[changed].tolist())}
    assert reached == REACH[name]


@pytest.mark.parametrize("stride", [1, 2])
def test_avg_pool_averages_only_the_pixels_inside_the_image(stride):
    """DARTS pools with count_include_pad=False: a constant image stays constant at the border too
    (padding counted, a corner would be 4/9 of it)."""
    x = torch.full((1, 2, 5, 5), 3.0)
    out = build_op("avg_pool_3x3", 2, stride)(x)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))
