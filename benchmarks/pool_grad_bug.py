"""Session 8's settled-DST gradient cosine of 0.77, reproduced on the CPU (a PyTorch kernel bug).

    python benchmarks/pool_grad_bug.py [--without-fix] [-- BENCH ARGS...]

PyTorch's CUDA backward kernel of ``avg_pool2d`` for channels_last inputs reads each input pixel's
position without the padding offset, so with ``padding > 0`` every pixel gets the gradient of the
windows one padding step up and to the left of its own (pytorch/pytorch#188344; the forward pass is
right; fixed upstream in July 2026, after torch 2.11, which the H200s here run). The DST genotype
session 8 timed has nine ``avg_pool_3x3`` edges (padding 1); DARTS_V2, which EnTranNAS was timed
at, has none. This imitates that kernel on the CPU (``imitate_pool_grad_bug``) and runs the bench's
check under it, by default session 8's command for the settled DST search in fp32 with
channels_last (about 3 minutes on 2 cores). ``entrannas.ops.AvgPool`` probes for the bug and pools
in NCHW where a device has it; ``--without-fix`` tells it the kernel is right, to see what the bug
does. Prints the bench's JSON and table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from entrannas import bench, ops

#: session 8's settled run (BENCHMARKS.md), the DST configuration in fp32, channels_last, on the CPU
SESSION_8 = ["--configs", "dst+cl", "--layers", "8", "--channels", "16", "--batch-size", "256",
             "--image-size", "32", "--steps", "5", "--repeats", "3", "--warmup", "4", "--frozen-arch", "--check",
             "--arch", "dst=benchmarks/genotypes/dst-digits.json", "--device", "cpu"]


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--without-fix", action="store_true",
                   help="tell entrannas.ops the CPU's channels_last pool kernel is right: the bug reaches the search")
    p.add_argument("bench_args", nargs="*", help="after --: the bench's arguments (default: session 8's run)")
    args = p.parse_args(argv)
    with imitate_pool_grad_bug():
        if args.without_fix:
            ops._POOL_GRAD_WRONG[torch.device("cpu")] = False
        return bench.main(args.bench_args or SESSION_8)


if __name__ == "__main__":
    sys.exit(main())
