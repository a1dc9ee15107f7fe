"""Ray Tune's overhead: a sweep's wall time against the same trials run back to back without Ray.

    python benchmarks/sweep_overhead.py ablations/quickstart.yaml [--set key=value ...]

Both runs use one CPU thread per trial and one trial at a time (max_concurrent 1), so the
difference is Ray's own cost: starting Ray, a worker process per trial, reporting and checkpoints.
Prints JSON and a short table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time

import torch


def back_to_back(spec) -> float:
    from entrannas.search import search_job
    from entrannas.train import Evaluation

    torch.set_num_threads(1)
    start = time.perf_counter()
    for point in spec.points():
        config = spec.search_config(point)
        search = search_job(config)
        for _ in search.run():
            pass
        evaluation_config = spec.eval_config(config)
        if evaluation_config is not None:
            for _ in Evaluation(search.genotype(), evaluation_config).run():
                pass
    return time.perf_counter() - start


def with_ray(spec) -> float:
    from orchestrator.sweep import run_sweep

    with tempfile.TemporaryDirectory() as storage:
        start = time.perf_counter()
        results = run_sweep(spec, storage, out=lambda line: None)
        elapsed = time.perf_counter() - start
        if results.errors:
            raise RuntimeError(f"{len(results.errors)} trials failed")
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    args = p.parse_args(argv)
    from orchestrator.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    spec = dataclasses.replace(spec, max_concurrent=1)
    plain = back_to_back(spec)
    tuned = with_ray(spec)
    doc = {"spec": args.spec, "overrides": args.overrides, "trials": len(spec.points()),
           "back_to_back_seconds": plain, "ray_tune_seconds": tuned,
           "overhead_seconds": tuned - plain, "overhead_per_trial_seconds": (tuned - plain) / len(spec.points()),
           "ratio": tuned / plain}
    print(json.dumps(doc, indent=2))
    print(f"\n{'trials':>6} {'plain (s)':>10} {'Ray Tune (s)':>13} {'overhead/trial (s)':>19} {'ratio':>6}",
          file=sys.stderr)
    print(f"{doc['trials']:>6} {plain:>10.1f} {tuned:>13.1f} {doc['overhead_per_trial_seconds']:>19.1f} "
          f"{doc['ratio']:>6.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
