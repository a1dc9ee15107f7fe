"""How long does a derived architecture last in a search? Whether per-structure graphs can pay.

    python benchmarks/structure_churn.py [--modes entrannas dst] [--epochs 40] [--arch-lr 6e-4]
                                         [--set key=value ...] [--out FILE.json]

Runs one search per mode (digits by default: real data, offline, minutes on a CPU) and notes the
derived architecture each weight step ran. Over the steps that update the architecture it reports
how many architectures there were, the *runs* (stretches of steps in a row at one architecture) and,
for a per-structure build (``compile_after``) of A steps, the share of steps that would run built:
a run of L steps runs its last L - (A - 1) built. Prints JSON and a short table.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

AFTERS = (2, 3, 5, 10, 50, 400)
RUN_BINS = ((1, 1), (2, 4), (5, 9), (10, 49), (50, None))


def runs_of(keys: list) -> list[int]:
    """Lengths of the stretches of equal consecutive keys."""
    return [len(list(run)) for _, run in itertools.groupby(keys)]


def built_share(runs: list[int], after: int) -> float:
    """Share of the steps that run built when a structure is built at its ``after``-th use in a row."""
    steps = sum(runs)
    return sum(max(r - (after - 1), 0) for r in runs) / steps if steps else 0.0


def summarize(keys: list) -> dict:
    runs = runs_of(keys)
    hist = {f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi else f"{lo}+"):
            sum(1 for r in runs if r >= lo and (hi is None or r <= hi)) for lo, hi in RUN_BINS}
    return {"steps": len(keys), "structures": len(set(keys)), "runs": len(runs),
            "longest_run": max(runs, default=0), "runs_by_length": hist,
            "built_share": {str(a): built_share(runs, a) for a in AFTERS}}


def churn(mode: str, args: argparse.Namespace) -> dict:
    from entrannas.config import load_config
    from entrannas.search import Search

    base = {"dataset": "digits", "epochs": args.epochs, "arch_warmup_epochs": args.epochs * 3 // 10,
            "arch_lr": args.arch_lr, "layers": 5, "init_channels": 8}
    search = Search(load_config(None, [*args.set, f"mode={mode}"], base=base))
    keys: list[bytes] = []
    start, records = time.perf_counter(), []
    for _ in range(search.config.epochs):
        updating = search.epoch >= search.config.arch_warmup_epochs
        epoch_keys: list = []
        records.append(search.run_epoch(on_step=lambda i, n, into=epoch_keys: into.append(search.model.derived_key)))
        if updating:
            keys.extend(epoch_keys)
    last = records[-1]
    return {"mode": mode, "config": search.config.to_dict(), **summarize(keys),
            "final_train_acc": last["train_acc"], "final_valid_acc": last["valid_acc"],
            "seconds": time.perf_counter() - start}


def table(rows: list[dict]) -> str:
    head = f"{'mode':<10} {'steps':>6} {'archs':>6} {'runs':>5} {'longest':>8}  runs by length"
    lines = [head]
    for r in rows:
        lines.append(f"{r['mode']:<10} {r['steps']:>6} {r['structures']:>6} {r['runs']:>5} {r['longest_run']:>8}  "
                     + ", ".join(f"{k}: {v}" for k, v in r["runs_by_length"].items()))
    lines.append("share of the steps that run built, by compile_after: " + ", ".join(
        f"{r['mode']} " + " ".join(f"{a}:{r['built_share'][str(a)]:.2f}" for a in AFTERS) for r in rows))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["entrannas", "dst"])
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--arch-lr", type=float, default=6e-4, help="the CIFAR default (digits' own is 6e-3)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other SearchConfig field")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from entrannas.rundir import print_results

    rows = [churn(mode, args) for mode in args.modes]
    print_results(rows, table(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
