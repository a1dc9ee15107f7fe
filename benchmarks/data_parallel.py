"""Time a data-parallel search against one process, and say where the time goes.

    python benchmarks/data_parallel.py --workers 2 --set epochs=3 --out dp.json

Runs the same digits search (DST by default; ``--set key=value`` changes any setting) on one
process and on ``--workers`` CPU processes of a local gloo group (``entrannas.distributed.run_local``,
the engine Ray Train workers use, without Ray's start-up), each process on one thread, with batch
statistics over the global batch (what a data-parallel search runs) and, for the comparison, over
each process's share. Per configuration: seconds per epoch (the epochs that update alpha), the
collectives per training step and their seconds per epoch (batch statistics and other sums; the
gradient reductions), and whether the genotype of each epoch is the one process's. Prints JSON
and a short table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from entrannas.config import SearchConfig, parse_overrides  # noqa: E402
from entrannas.distributed import Shard, SyncedBatchNorm, run_local  # noqa: E402
from entrannas.search import Search  # noqa: E402


class TimedShard(Shard):
    """A shard that counts its collectives and their seconds: gradient reductions apart from the
    rest (batch statistics, and the epoch's few sums)."""

    def __init__(self, rank: int, world: int):
        super().__init__(rank, world)
        self.calls, self.seconds, self.kind = Counter(), Counter(), "batch statistics"

    def sum(self, t):
        start = time.perf_counter()
        out = super().sum(t)
        self.seconds[self.kind] += time.perf_counter() - start
        self.calls[self.kind] += 1
        return out

    def reduce_gradients(self, params) -> None:
        self.kind = "gradients"
        try:
            super().reduce_gradients(params)
        finally:
            self.kind = "batch statistics"


def search_epochs(shard: Shard, config: dict, local_statistics: bool, out: str) -> None:
    """The search on ``shard`` (rank 0 saves its records and collective counts per epoch)."""
    timed = TimedShard(shard.rank, shard.world)
    search = Search(SearchConfig.from_dict(config), torch.device("cpu"), timed)
    if local_statistics:   # each process normalises with its own share's statistics
        for m in search.model.modules():
            if isinstance(m, SyncedBatchNorm):
                m.__class__ = nn.BatchNorm2d
    rows, steps = [], len(search.data.train)
    for record in search.run():
        rows.append({"epoch": record["epoch"], "seconds": record["seconds"], "arch_updated": record["arch_updated"],
                     "genotype": record["genotype"], "valid_acc": record["valid_acc"],
                     "collective_calls_per_step": {k: v / steps for k, v in timed.calls.items()},
                     "collective_seconds": dict(timed.seconds)})
        timed.calls.clear()
        timed.seconds.clear()
    if shard.rank == 0:
        Path(out, "records.json").write_text(json.dumps(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    settings = {"mode": "dst", "dataset": "digits", "epochs": 3, "arch_warmup_epochs": 1,
                **parse_overrides(args.overrides)}
    config = SearchConfig.from_dict(settings).resolve().to_dict()
    runs = [("1 process", 1, False), (f"{args.workers} processes", args.workers, False),
            (f"{args.workers} processes, per-process statistics", args.workers, True)]
    doc = {"command": " ".join(["python benchmarks/data_parallel.py", *(argv or sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "device": "cpu, 1 thread per process", "config": config, "results": []}
    for label, world, local in runs:
        with tempfile.TemporaryDirectory() as tmp:
            run_local(search_epochs, world, config, local, tmp)
            rows = json.loads(Path(tmp, "records.json").read_text())
        doc["results"].append({"config": label, "workers": world, "per_process_statistics": local, "epochs": rows})
    one, last_timed = doc["results"][0], {}   # config -> its last timed epoch (the table's collectives)
    for result in doc["results"]:
        timed = [r for r in result["epochs"] if r["arch_updated"]] or result["epochs"]
        result["seconds_per_epoch"] = sum(r["seconds"] for r in timed) / len(timed)
        last_timed[result["config"]] = timed[-1]
    for result in doc["results"]:
        result["speedup_vs_1_process"] = one["seconds_per_epoch"] / result["seconds_per_epoch"]
        result["same_genotype_as_1_process"] = [r["genotype"] == o["genotype"]
                                                for r, o in zip(result["epochs"], one["epochs"])]
    if args.out:
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"{'config':44} {'s/epoch':>8} {'x 1 proc':>8} {'sums/step':>10} {'grad/step':>10} "
          f"{'sums s/ep':>10} {'grad s/ep':>10}  same genotype", file=sys.stderr)
    for result in doc["results"]:
        last = last_timed[result["config"]]
        calls, secs = last["collective_calls_per_step"], last["collective_seconds"]
        print(f"{result['config']:44} {result['seconds_per_epoch']:8.2f} {result['speedup_vs_1_process']:8.2f} "
              f"{calls.get('batch statistics', 0):10.0f} {calls.get('gradients', 0):10.0f} "
              f"{secs.get('batch statistics', 0):10.2f} {secs.get('gradients', 0):10.2f}  "
              f"{result['same_genotype_as_1_process']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
