"""Does the broken channels_last avg-pool kernel reach a one-channel tensor, and does AvgPool go round it?

    python benchmarks/one_channel_check.py [--device cuda] [--out FILE.json]

A channels_last tensor with one channel has channels_last strides ((H*W, 1, W, 1)) and is contiguous
in NCHW too: ``is_contiguous()`` ignores the stride of a dimension of size 1. PyTorch's pooling
kernels pick their layout from the strides, so such a tensor takes the channels_last path, whose
CUDA backward pass of a padded average pool is wrong up to torch 2.11 (pytorch/pytorch#188344).
Session 34's H200 run met it there: ``tests/test_compiled.py``'s channels_last comparisons failed for
the tiny test nets, which have one channel after the bottleneck; ``ops.AvgPool`` had gone round the
kernel only for inputs that ``is_contiguous()`` called non-contiguous.

Prints JSON: the input gradient of a padded 3x3 average pool in channels_last against NCHW, through
``F.avg_pool2d`` and through ``ops.AvgPool``, at one and three channels; and every candidate op's
input gradient in channels_last against NCHW at one channel (stride 1) and two (stride 2: a reduction
cell's width is even). Each error is the largest difference over the largest NCHW value. TF32 off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from entrannas import ops
from entrannas.rundir import write_text_atomic


def _input_grad(fn, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    return torch.autograd.grad(fn(x), x, g)[0].double().contiguous()


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _layout_error(fn, x: torch.Tensor, g: torch.Tensor) -> float:
    """``fn``'s input gradient for a channels_last copy of ``x`` against the NCHW one; a module's
    weights go to channels_last too, as in a channels_last search. ``clone``, not ``contiguous``: a
    one-channel tensor is contiguous already and would keep NCHW's strides."""
    nchw = _input_grad(fn, x, g)
    if isinstance(fn, torch.nn.Module):
        fn.to(memory_format=torch.channels_last)
    return _error(_input_grad(fn, x.clone(memory_format=torch.channels_last),
                              g.clone(memory_format=torch.channels_last)), nchw)


def pool_errors(device: torch.device, channels=(1, 3), size: int = 8, seed: int = 0) -> dict:
    """Per channel count: the raw kernel's layout error and ``ops.AvgPool``'s."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in channels:
        x, g = (torch.randn(4, c, size, size, generator=gen).to(device) for _ in range(2))
        out[f"{c} channel{'s' if c > 1 else ''}"] = {
            "F.avg_pool2d": _layout_error(lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False), x, g),
            "ops.AvgPool": _layout_error(ops.OPS["avg_pool_3x3"](c, 1, False), x, g)}
    return out


def op_errors(device: torch.device, size: int = 8, seed: int = 0) -> dict:
    """Every candidate op as a search cell builds it: its layout error at one channel and two."""
    out = {}
    for name in ops.DARTS_PRIMITIVES:
        if name == "none":
            continue
        for channels, stride in ((1, 1), (2, 2)):
            torch.manual_seed(seed)
            op = ops.build_op(name, channels, stride, affine=False, search=True).to(device)
            x = torch.randn(8, channels, size, size, device=device)
            g = torch.randn(op(x).shape, device=device)
            out[f"{name} {channels}ch stride {stride}"] = _layout_error(op, x, g)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    doc = {"device": str(device), "torch": torch.__version__,
           "channels_last_pool_grad_wrong": ops.pool_grad_is_wrong(device),
           "pool": pool_errors(device), "ops": op_errors(device)}
    text = json.dumps(doc, indent=2) + "\n"
    if args.out:
        write_text_atomic(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
