"""Does the bench's projection predict a real search? Each epoch measured against the bench's figures.

    python benchmarks/projection_check.py [--modes entrannas dst] [--layers 8] [--channels 8]
                                          [--batch-size 64] [--epochs 3] [--device cpu]
                                          [--set key=value ...] [--out FILE.json]

For each mode, first ``entrannas-tune bench`` times the search step, the weight-only step of the
warm-up epochs and a validation batch (not frozen: the architecture moves, as in the search), in a
process of its own; then a ``Search`` at the same sizes runs on ``synthetic`` (CIFAR-shaped, offline)
with one warm-up epoch. Each epoch's ``seconds`` and ``valid_seconds`` are set against what the
bench's figures predict: its steps times the step it runs, plus its validation batches times the
validation batch. ``--set`` goes to both (``--set compile=capture --set precision=bf16`` on a GPU).
Prints JSON and a short table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def bench_figures(mode: str, args: argparse.Namespace) -> dict:
    """The bench's row for ``mode`` at the search's sizes, from a process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "entrannas.bench", "--configs", mode, "--layers", str(args.layers),
               "--channels", str(args.channels), "--batch-size", str(args.batch_size), "--image-size", "32",
               "--device", args.device, "--steps", str(args.steps), "--repeats", "3", "--warmup", "2",
               *[f"--set={s}" for s in args.set], "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr, end="")
            raise subprocess.CalledProcessError(done.returncode, cmd)
        return json.loads(out.read_text())["results"][0]


def search_config(mode: str, args: argparse.Namespace):
    """The search's settings (checked: a bad one raises ``ConfigError`` before anything runs)."""
    from entrannas.config import load_config

    return load_config(None, [f"mode={mode}", "dataset=synthetic", f"epochs={args.epochs}", "arch_warmup_epochs=1",
                              f"layers={args.layers}", f"init_channels={args.channels}",
                              f"batch_size={args.batch_size}", f"device={args.device}", *args.set])


def full_steps_checked(config):
    """``config`` if its search runs at least one epoch of full steps after the warm-up, the epochs
    that the bench's main figure predicts (``--epochs`` and ``--set`` both reach it)."""
    from entrannas.config import ConfigError

    if config.epochs <= config.arch_warmup_epochs:
        raise ConfigError("epochs", config.epochs, f"must be more than arch_warmup_epochs "
                          f"({config.arch_warmup_epochs}), so that at least one epoch runs full steps")
    return config


def check(mode: str, config, args: argparse.Namespace) -> dict:
    from entrannas.search import Search

    bench = bench_figures(mode, args)
    search = Search(config)
    steps, valid_batches = len(search.data.train), len(search.data.valid)
    epochs = []
    for record in search.run():
        warmup = record["epoch"] < search.config.arch_warmup_epochs
        step = bench["seconds_per_warmup_step"] if warmup else bench["seconds_per_step"]
        valid = valid_batches * bench["seconds_per_valid_batch"]
        epochs.append({"epoch": record["epoch"], "warmup": warmup, "seconds": record["seconds"],
                       "valid_seconds": record["valid_seconds"], "predicted_seconds": steps * step + valid,
                       "predicted_valid_seconds": valid, "structures": record["structures"]})
    return {"mode": mode, "steps_per_epoch": steps, "valid_batches_per_epoch": valid_batches,
            "bench": {k: bench[k] for k in ("seconds_per_step", "seconds_per_warmup_step", "seconds_per_valid_batch")},
            "config": search.config.to_dict(), "epochs": epochs}


def table(rows: list[dict]) -> str:
    lines = [f"{'mode':<10} {'epoch':>5} {'measured s':>11} {'predicted s':>12} {'valid s':>8} {'predicted':>10} "
             f"{'archs':>6}"]
    for r in rows:
        for e in r["epochs"]:
            epoch = f"{e['epoch'] + 1}{'w' if e['warmup'] else ''}"
            lines.append(f"{r['mode']:<10} {epoch:>5} {e['seconds']:>11.2f} {e['predicted_seconds']:>12.2f} "
                         f"{e['valid_seconds']:>8.2f} {e['predicted_valid_seconds']:>10.2f} {e['structures']:>6}")
    lines.append("(w: the warm-up epoch, weight steps only; predicted: the bench's step and validation batch "
                 "times the epoch's steps and batches)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["entrannas", "dst"])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3, help="one warm-up epoch, then full steps (at least 2)")
    p.add_argument("--steps", type=int, default=5, help="the bench's timed steps per block (3 blocks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting for the bench and the search alike")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from entrannas.config import ConfigError
    from entrannas.rundir import print_results

    try:
        configs = {mode: full_steps_checked(search_config(mode, args)) for mode in args.modes}
    except ConfigError as e:
        print(f"projection_check: error: {e}", file=sys.stderr)
        return 2
    try:
        rows = [check(mode, config, args) for mode, config in configs.items()]
    except subprocess.CalledProcessError:   # the bench's own message is printed
        return 1
    print_results(rows, table(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
