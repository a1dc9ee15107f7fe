"""How far does TF32-like rounding in every convolution move a search step's gradients? (CPU)

    python benchmarks/tf32_rounding.py [--mode dst] [--arch benchmarks/genotypes/dst-digits.json]
                                       [--batch-size 256] [--layers 8] [--channels 16]

A GPU's fp32 convolutions may run in TF32 (torch's default for cuDNN): inputs and weights rounded
to a 10-bit mantissa, products summed in fp32. This imitates that on the CPU: on the fast side of
the bench's check (``entrannas.bench.check_against_eager``) every convolution's input and weight are
rounded to TF32 in the forward pass, and the gradient arriving at its output in the backward pass
(which the backward convolutions take as input). The check then compares that pass with the plain
fp32 one from the same weights, as on the GPU. Session 8 asked whether TF32 explains the weight-
gradient cosine of 0.77 measured for the settled DST search on an H200 (BENCHMARKS.md); prints JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from entrannas import bench
from entrannas.zoo import load_genotype


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 to the nearest value with TF32's 10-bit mantissa (ties away from zero), still fp32."""
    bits = x.detach().float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view_as(x)


class _RoundGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return round_to_tf32(grad)


@contextlib.contextmanager
def tf32_convolutions(model: torch.nn.Module):
    """Within: the convolutions that ``model``'s forward pass runs compute in imitated TF32, and no
    others (the check's reference is another model). ``F.conv2d``, which ``nn.Conv2d`` calls, is
    swapped for the duration; the model's forward hooks say when it is the model's pass."""
    plain = F.conv2d
    inside = [False]

    def conv2d(x, w, *args, **kwargs):
        if not inside[0]:
            return plain(x, w, *args, **kwargs)
        x = x + (round_to_tf32(x) - x).detach()   # rounded values, the gradient of the identity
        w = w + (round_to_tf32(w) - w).detach()
        return _RoundGradient.apply(plain(x, w, *args, **kwargs))

    hooks = [model.register_forward_pre_hook(lambda module, args: inside.__setitem__(0, True)),
             model.register_forward_hook(lambda module, args, out: inside.__setitem__(0, False))]
    try:
        with mock.patch.object(F, "conv2d", conv2d):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def measure(mode: str, arch: str | None, batch_size: int, layers: int, channels: int, image_size: int = 32,
            rounding: bool = True, warmup: int = 3) -> dict:
    """The check of a ``mode`` search (settled at ``arch``, if given) after ``warmup`` weight steps,
    the fast side computed with TF32-rounded convolutions (or plainly, ``rounding=False``)."""
    args = bench.parser().parse_args(["--batch-size", str(batch_size), "--layers", str(layers),
                                      "--channels", str(channels), "--image-size", str(image_size)])
    model, opt, batch = bench.search_setup(bench.parse_label(mode, args), args, torch.device("cpu"))
    if arch:
        model.set_architecture(load_genotype(arch))
    for _ in range(warmup):
        opt.step(batch(), batch(), update_arch=False)
    with tf32_convolutions(model) if rounding else contextlib.nullcontext():
        check = bench.check_against_eager(opt, batch(), batch())
    return {"mode": mode, "arch": arch, "batch_size": batch_size, "layers": layers, "channels": channels,
            "rounding": rounding, "check": check}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", default="dst")
    p.add_argument("--arch", default="benchmarks/genotypes/dst-digits.json", help="'' for the initial state")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=16)
    args = p.parse_args(argv)
    row = measure(args.mode, args.arch or None, args.batch_size, args.layers, args.channels)
    print(json.dumps(row, indent=2))
    w = row["check"]["weight_pass"]
    print(f"weight-pass gradient cosine with TF32-rounded convolutions: {w['grad_cosine']:.3f} "
          f"(fp32 eager with its input rounded to bf16: {w['reference']['input_rounded_to_bf16']:.3f})",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
