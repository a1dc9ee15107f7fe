"""Candidate operations of the DARTS cell space, by name.

Every constructor has one signature, ``(C, stride, affine) -> nn.Module``, and keeps
the channel count; ``stride`` 2 halves the resolution. The names and layer choices are
those of the DARTS code, so that published genotypes build with the same parameters.

The ops that begin with a ReLU (``ReLUFirst``) can also run from an input already passed through
it (``forward_from_relu``): a search cell feeds several of them the same source, and applies
that ReLU once instead of once per op (the same values, fewer kernels and saved activations).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

OpFactory = Callable[[int, int, bool], nn.Module]


class ReLUFirst:
    """An op whose first step is a ReLU of its input: ``op(x) == op.forward_from_relu(relu(x))``."""

    def forward_from_relu(self, r: torch.Tensor) -> torch.Tensor:
        """For an ``nn.Sequential`` whose first module is the ReLU: the rest of it."""
        for module in list(self)[1:]:
            r = module(r)
        return r


class ReLUConvBN(ReLUFirst, nn.Sequential):
    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(ReLUFirst, nn.Sequential):
    """ReLU, depthwise dilated conv, pointwise conv, BN."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, dilation: int,
                 affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class SepConv(ReLUFirst, nn.Sequential):
    """Two stacked DilConvs with dilation 1, the first carrying the stride (as DARTS)."""

    def __init__(self, C_in: int, C_out: int, kernel: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            DilConv(C_in, C_in, kernel, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),
        )

    def forward_from_relu(self, r: torch.Tensor) -> torch.Tensor:
        return self[1](self[0].forward_from_relu(r))


class Zero(nn.Module):
    """The ``none`` operation: zeros at the output resolution."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(ReLUFirst, nn.Module):
    """Halves the resolution with two offset stride-2 1x1 convs, concatenated."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even output channel count, got {C_out}")
        self.relu = nn.ReLU(inplace=False)
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_from_relu(self.relu(x))

    def forward_from_relu(self, r: torch.Tensor) -> torch.Tensor:
        # conv_1 reads the pixels (2i, 2j) and conv_2 the pixels (2i + 1, 2j + 1), zero past the edge.
        # Both run as one 2x2 stride-2 conv whose other taps are zero: the same sums, one kernel, and
        # no padded copy of the input or concatenated copy of the output (an odd size still pads).
        weight = torch.cat([F.pad(self.conv_1.weight, (0, 1, 0, 1)), F.pad(self.conv_2.weight, (1, 0, 1, 0))])
        if r.shape[-2] % 2 or r.shape[-1] % 2:
            r = F.pad(r, (0, r.shape[-1] % 2, 0, r.shape[-2] % 2))
        return self.bn(F.conv2d(r, weight, stride=2))


#: device -> whether its channels_last backward kernel of a padded average pool is wrong (probed
#: once per device by ``pool_grad_is_wrong``)
_POOL_GRAD_WRONG: dict[torch.device, bool] = {}


def _probe_pool_grad(device: torch.device) -> bool:
    """Whether a padded 3x3 average pool's input gradient differs between channels_last and NCHW
    on ``device``: a 2x3x5x5 pass in each layout, one read from the device."""
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32, device=device).reshape(2, 3, 5, 5).sin()
    g = x.cos()   # the pool keeps the shape
    grads = []
    with torch.inference_mode(False), torch.enable_grad():
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout).requires_grad_(True)
            y = F.avg_pool2d(xi, 3, stride=1, padding=1, count_include_pad=False)
            grads.append(torch.autograd.grad(y, xi, g.contiguous(memory_format=layout))[0])
    return not torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def pool_grad_is_wrong(device: torch.device) -> bool:
    """Whether ``device``'s channels_last backward kernel of a padded average pool gives wrong input
    gradients, as PyTorch's CUDA kernel does before its fix (pytorch/pytorch#188344: it leaves the
    padding out of each pixel's position; fixed upstream in July 2026). Its forward pass is right,
    so only a gradient check against NCHW shows it. Probed the first time a device is asked about;
    where that cannot be done (while a CUDA graph is recorded, or torch.compile traces), taken as
    wrong: ``AvgPool``'s way around the kernel is right either way."""
    if device.type == "meta":   # shapes only: no gradient values to be wrong
        return False
    wrong = _POOL_GRAD_WRONG.get(device)
    if wrong is None:
        is_compiling = getattr(torch.compiler, "is_compiling", None)   # torch >= 2.3
        if (is_compiling is not None and is_compiling()) or (
                device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return True
        wrong = _POOL_GRAD_WRONG[device] = _probe_pool_grad(device)
    return wrong


def _nchw_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a fresh contiguous tensor of ``shape``."""
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class AvgPool(nn.AvgPool2d):
    """``nn.AvgPool2d`` that pools a channels_last input in NCHW where the device's channels_last
    backward kernel is wrong (``pool_grad_is_wrong``; CUDA up to torch 2.11, pytorch/pytorch#188344),
    and gives the result back in channels_last. The kernel picks its layout from the strides, so
    every input without NCHW's own strides goes round, a one-channel channels_last tensor too
    (``is_contiguous`` ignores the stride of a dimension of size 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding and x.stride() != _nchw_strides(x.shape) and pool_grad_is_wrong(x.device):
            out = super().forward(x.clone(memory_format=torch.contiguous_format))
            return out.contiguous(memory_format=torch.channels_last) if x.is_contiguous(
                memory_format=torch.channels_last) else out
        return super().forward(x)


class Conv7x1x7(ReLUFirst, nn.Sequential):
    """ReLU, a 1x7 and a 7x1 conv, BN (the DARTS ``conv_7x1_1x7``)."""

    def __init__(self, C: int, stride: int, affine: bool):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C, C, (1, 7), stride=(1, stride), padding=(0, 3), bias=False),
            nn.Conv2d(C, C, (7, 1), stride=(stride, 1), padding=(3, 0), bias=False),
            nn.BatchNorm2d(C, affine=affine),
        )


OPS: dict[str, OpFactory] = {
    "none": lambda C, stride, affine: Zero(stride),
    "avg_pool_3x3": lambda C, stride, affine: AvgPool(3, stride=stride, padding=1, count_include_pad=False),
    "max_pool_3x3": lambda C, stride, affine: nn.MaxPool2d(3, stride=stride, padding=1),
    "skip_connect": lambda C, stride, affine: nn.Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "sep_conv_7x7": lambda C, stride, affine: SepConv(C, C, 7, stride, 3, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
    "conv_7x1_1x7": Conv7x1x7,
}

#: The eight candidates of the DARTS search space, in the DARTS order.
DARTS_PRIMITIVES: tuple[str, ...] = (
    "none", "max_pool_3x3", "avg_pool_3x3", "skip_connect",
    "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3", "dil_conv_5x5",
)


def check_op_names(names, field: str = "primitives") -> None:
    """Raise ``ValueError`` naming the first unknown op and the registered ones."""
    for name in names:
        if name not in OPS:
            raise ValueError(f"{field}: unknown operation {name!r}; allowed: {', '.join(OPS)}")


def build_op(name: str, C: int, stride: int, affine: bool = True, search: bool = False) -> nn.Module:
    """Instantiate a registered op. In search, pools get a BN(affine=False) as in DARTS."""
    check_op_names([name], field="op")
    op = OPS[name](C, stride, affine)
    if search and name.endswith("pool_3x3"):
        op = nn.Sequential(op, nn.BatchNorm2d(C, affine=False))
    return op
