"""Does every candidate op compute the same in channels_last as in NCHW, on this device?

    python benchmarks/op_check.py [--device cuda] [--batch-size 256] [--out FILE.json]

For each op of the DARTS space (as a search cell builds it: pools with their batch norm, no affine
weights), at the widths and resolutions of the 8-cell C=16 super-net after the bottleneck (4
channels at 32x32, 8 at 16x16, 16 at 8x8) and stride 1 and 2: the output, the input's gradient and
every weight's gradient of an fp32 pass in NCHW and in channels_last, each against the same pass in
float64, as the largest error over the float64 tensor's largest value. cuDNN's benchmark mode is on
(as in a search) and TF32 off, so fp32 should agree to about 1e-5; prints JSON and the ops that do
not. Session 8 found the settled DST search's weight gradients far from the eager NCHW ones on an
H200 with channels_last and CUDA graphs (cosine 0.77); session 9 traced that to PyTorch's CUDA
channels_last backward kernel of a padded average pool (``benchmarks/pool_grad_bug.py`` imitates it
on the CPU and gets 0.773). ``entrannas.ops.AvgPool`` pools around that kernel where its probe finds
it wrong, so the avg_pool_3x3 rows show the op as a search runs it, and the JSON records the probe's
answer for this device (``channels_last_pool_grad_wrong``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from entrannas.ops import DARTS_PRIMITIVES, build_op, pool_grad_is_wrong
from entrannas.rundir import write_text_atomic

#: (channels, resolution) of the super-net's three stages after the 1x1 bottleneck (C=16, ratio 4)
SHAPES = ((4, 32), (8, 16), (16, 8))
#: fp32 against float64: anything past this is a wrong kernel, not rounding
TOLERANCE = 1e-4


def _pass(op: torch.nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients (the input's, then each weight's by name) of one pass, as float64 NCHW."""
    x = x.detach().requires_grad_(True)
    op.zero_grad(set_to_none=True)
    y = op(x)
    y.backward(g.to(y.dtype))
    out = {"output": y, "input grad": x.grad}
    out.update({f"{name} grad": p.grad for name, p in op.named_parameters() if p.grad is not None})
    return {k: v.detach().double().contiguous() for k, v in out.items()}


def compare_layouts(device: torch.device, batch_size: int, shapes=SHAPES, primitives=DARTS_PRIMITIVES,
                    seed: int = 0):
    """One row per (op, channels, resolution, stride), as each is done: each tensor's error in each
    layout."""
    ops = [name for name in primitives if name != "none"]
    for name, (channels, size), stride in itertools.product(ops, shapes, (1, 2)):
        torch.manual_seed(seed)
        op = build_op(name, channels, stride, affine=False, search=True).to(device)
        x = torch.randn(batch_size, channels, size, size, device=device)
        g = torch.randn(op(x).shape, device=device)
        reference = _pass(op.double(), x.double(), g.double())
        nchw = _pass(op.float(), x, g)
        # clone, not contiguous: a one-channel tensor is contiguous in both layouts and would keep NCHW's strides
        nhwc = _pass(op.to(memory_format=torch.channels_last), x.clone(memory_format=torch.channels_last), g)
        errors = {layout: {k: ((got[k] - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                           for k, ref in reference.items()}
                  for layout, got in (("nchw", nchw), ("channels_last", nhwc))}
        yield {"op": name, "channels": channels, "resolution": size, "stride": stride, "errors": errors,
               "worst": max(e for layout in errors.values() for e in layout.values())}


def _describe(row: dict) -> str:
    where = "; ".join(f"{layout}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items() if v > TOLERANCE)
                      for layout, e in row["errors"].items() if max(e.values()) > TOLERANCE)
    return f"{row['op']} {row['channels']}ch {row['resolution']}px stride {row['stride']}: {where}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here (after each op shape)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        print(f"op_check: --batch-size {args.batch_size}: must be >= 1", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    doc = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
           else "cpu", "torch": torch.__version__, "batch_size": args.batch_size, "tolerance": TOLERANCE,
           # ops.AvgPool pools channels_last inputs in NCHW where this is true, so avg_pool_3x3's
           # rows show the op as the search runs it, not the kernel
           "channels_last_pool_grad_wrong": pool_grad_is_wrong(device), "results": []}
    rows = doc["results"]
    for row in compare_layouts(device, args.batch_size):
        rows.append(row)
        if row["worst"] > TOLERANCE:   # as found: a time limit may stop the run
            print(f"past {TOLERANCE:g}: {_describe(row)}", file=sys.stderr, flush=True)
        if args.out:   # after each row, for the same reason
            write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    bad = [r for r in rows if r["worst"] > TOLERANCE]
    print(f"\n{len(rows)} op shapes, {len(bad)} past {TOLERANCE:g} against float64:", file=sys.stderr)
    for r in bad:
        print(f"  {_describe(r)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
