"""A CPU imitation of a PyTorch kernel bug, for the tests of ``ops.AvgPool``'s way round it.

PyTorch's CUDA backward kernel of ``avg_pool2d`` for channels_last inputs (up to torch 2.11) reads
each input pixel's position without the padding offset, so with ``padding > 0`` every pixel gets the
gradient of the windows one padding step up and to the left of its own (pytorch/pytorch#188344; the
forward pass is right). ``imitate_pool_grad_bug`` makes the CPU's ``F.avg_pool2d`` do the same for
channels_last inputs (the layout read from the strides, as the kernel does), and makes ``ops``'s
probe see it.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from entrannas import ops
def padded_input_gradient(grad_out: torch.Tensor, size: tuple[int, int], kernel, stride, padding,
                          count_include_pad: bool) -> torch.Tensor:
    """What the backward pass of ``avg_pool2d`` gives every position of the zero-padded input
    (``size`` plus the padding on each side): each window's gradient over its divisor, spread over
    the window (a transposed convolution with a kernel of ones)."""
    (kh, kw), (sh, sw), (ph, pw) = _pair(kernel), _pair(stride), _pair(padding)
    height, width = size
    if count_include_pad:
        divisor = grad_out.new_full((1, 1) + tuple(grad_out.shape[-2:]), float(kh * kw))
    else:   # the pixels of each window that lie in the image
        ones = grad_out.new_ones(1, 1, height, width)
        divisor = F.avg_pool2d(ones, (kh, kw), (sh, sw), (ph, pw), count_include_pad=True) * (kh * kw)
    channels = grad_out.shape[1]
    spread = F.conv_transpose2d(grad_out / divisor, grad_out.new_ones(channels, 1, kh, kw), stride=(sh, sw),
                                groups=channels)
    return F.pad(spread, (0, width + 2 * pw - spread.shape[-1], 0, height + 2 * ph - spread.shape[-2]))


class _BrokenPoolGradient(torch.autograd.Function):
    """``avg_pool2d`` with the broken kernel's backward pass: the padded input's gradient read from
    the corner of the padding instead of from the image's first pixel."""

    @staticmethod
    def forward(ctx, x, pool, kernel, stride, padding, count_include_pad):
        ctx.shape = (tuple(x.shape[-2:]), kernel, stride, padding, count_include_pad)
        return pool(x, kernel, stride, padding, count_include_pad=count_include_pad)

    @staticmethod
    def backward(ctx, grad_out):
        (height, width), kernel, stride, padding, count_include_pad = ctx.shape
        full = padded_input_gradient(grad_out, (height, width), kernel, stride, padding, count_include_pad)
        grad = full[..., :height, :width].contiguous(memory_format=torch.channels_last)
        return grad, None, None, None, None, None


@contextlib.contextmanager
def imitate_pool_grad_bug():
    """Within: ``F.avg_pool2d`` of a channels_last input with padding (no ``ceil_mode``, no divisor
    override: what the search's ops use) has the broken kernel's backward pass, and
    ``entrannas.ops`` probes its devices afresh."""
    real = F.avg_pool2d

    def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                   divisor_override=None):
        stride = kernel_size if stride is None or stride == [] else stride
        # the kernel's layout, read from the strides as its suggest_memory_format does: channels
        # innermost, also where one channel leaves the tensor contiguous in NCHW too
        channels_last = x.dim() == 4 and x.stride(1) == 1 and x.stride(3) == x.shape[1]
        if channels_last and any(_pair(padding)) and not ceil_mode and divisor_override is None:
            return _BrokenPoolGradient.apply(x, real, kernel_size, stride, padding, count_include_pad)
        return real(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    with mock.patch.object(F, "avg_pool2d", avg_pool2d), mock.patch.dict(ops._POOL_GRAD_WRONG, clear=True):
        yield


