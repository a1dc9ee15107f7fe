"""Time steady-state search steps (arch step + weight step, first-order) per configuration.

    entrannas-tune bench --configs darts entrannas dst --layers 8 --channels 8 \
        --batch-size 32 --image-size 16 --device cpu

(also ``python benchmarks/search_step.py ...``). Each configuration is a mode with its default
placement, sharing and bottleneck ratio. Prints one JSON document (every measured figure) and a
short table; ratios are only meaningful between configurations timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

from .bilevel import BilevelOptimizer
from .config import SearchConfig
from .runtime import peak_memory_mb, resolve_device
from .supernet import SearchNetwork, SupernetSpec

STEPS_PER_EPOCH_CIFAR = 25_000


def measure(mode: str, args: argparse.Namespace, device: torch.device) -> dict:
    config = SearchConfig(mode=mode, dataset="synthetic", layers=args.layers, init_channels=args.channels,
                          batch_size=args.batch_size, epochs=50, arch_warmup_epochs=15,
                          precision=args.precision, channels_last=args.channels_last).resolve()
    torch.manual_seed(0)
    spec = SupernetSpec.from_config(config, num_classes=10, in_channels=3, stem="cifar")
    model = SearchNetwork(spec).to(device)
    opt = BilevelOptimizer(model, config)
    gen = torch.Generator().manual_seed(0)
    batch = lambda: (torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device),  # noqa: E731
                     torch.randint(0, 10, (args.batch_size,), generator=gen).to(device))
    batches = [(batch(), batch()) for _ in range(4)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        opt.step(*batches[i % 4], update_arch=True)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        opt.step(*batches[i % 4], update_arch=True)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2]
    warm_times = []
    for i in range(min(args.steps, 3)):   # warm-up epochs: weight step only
        t0 = time.perf_counter()
        opt.step(*batches[i % 4], update_arch=False)
        sync()
        warm_times.append(time.perf_counter() - t0)
    warm = sorted(warm_times)[len(warm_times) // 2]
    steps = -(-STEPS_PER_EPOCH_CIFAR // args.batch_size)
    projected = steps * (config.arch_warmup_epochs * warm + (config.epochs - config.arch_warmup_epochs) * median)
    return {"config": mode, "placement": config.placement, "feature_sharing": config.feature_sharing,
            "bottleneck_ratio": config.bottleneck_ratio, "seconds_per_step": median,
            "seconds_per_warmup_step": warm, "min_seconds_per_step": times[0],
            "peak_memory_mb": peak_memory_mb(device) if device.type == "cuda" else None,  # CPU: only process-wide
            "projected_50_epoch_minutes": projected / 60}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="entrannas-tune bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["darts", "entrannas", "dst"],
                   help="modes to time, each with its default placement, sharing and ratio")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="autocast dtype of the forward passes")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    rows = [measure(mode, args, device) for mode in args.configs]
    base = next((r for r in rows if r["config"] == "darts"), None)
    for r in rows:
        r["speedup_vs_darts"] = base["seconds_per_step"] / r["seconds_per_step"] if base else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    doc = {"device": str(device), "device_name": name, "torch": torch.__version__,
           "threads": torch.get_num_threads(),
           "args": vars(args), "results": rows}
    print(json.dumps(doc, indent=2))
    print(f"\n{'config':<10} {'s/step':>8} {'x darts':>8} {'peak MB':>9} {'50 ep (min)':>12}", file=sys.stderr)
    for r in rows:
        speed = f"{r['speedup_vs_darts']:.2f}" if r["speedup_vs_darts"] else "-"
        peak = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        print(f"{r['config']:<10} {r['seconds_per_step']:>8.3f} {speed:>8} {peak:>9} "
              f"{r['projected_50_epoch_minutes']:>12.1f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
