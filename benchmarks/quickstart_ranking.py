"""Can the quick-start study tell architectures apart? Trains DARTS_V2 and two parameter-free
controls on DARTS_V2's topology (every op max_pool_3x3, every op skip_connect) with the spec's own
evaluation settings (its ``evaluate:`` section, the dataset of its ``base:``), one run per seed,
and checks that DARTS_V2's mean test error beats each control's by more than twice the largest
seed standard deviation of the three.

    python benchmarks/quickstart_ranking.py [--spec ablations/quickstart.yaml] [--seeds 0 1 2] [--out FILE.json]

Prints JSON (one row per genotype: test errors per seed, mean, sd) and a short table; exit
status 0 when the ranking holds, 1 when it does not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entrannas.genotype import Genotype  # noqa: E402
from entrannas.rundir import print_results  # noqa: E402
from entrannas.train import Evaluation  # noqa: E402
from entrannas.zoo import ZOO  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402


def with_every_op(genotype: Genotype, op: str) -> Genotype:
    """``genotype``'s topology with ``op`` on every connection."""
    d = genotype.to_dict()
    for cell in ("normal", "reduce"):
        d[cell] = [[[op, i] for _, i in node] for node in d[cell]]
    return Genotype.from_dict(d)


GENOTYPES = {"DARTS_V2": ZOO["DARTS_V2"],
             "all max_pool_3x3": with_every_op(ZOO["DARTS_V2"], "max_pool_3x3"),
             "all skip_connect": with_every_op(ZOO["DARTS_V2"], "skip_connect")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(ROOT / "ablations" / "quickstart.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (fixed: results depend on it)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    rows = []
    for name, genotype in GENOTYPES.items():
        errors, start = [], time.perf_counter()
        for seed in args.seeds:
            config = spec.eval_config(spec.search_config({"seed": seed}))
            errors.append(list(Evaluation(genotype, config).run())[-1]["test_error"] * 100)
        rows.append({"genotype": name, "dataset": config.dataset, "seeds": args.seeds, "test_error_pct": errors,
                     "mean": statistics.mean(errors), "sd": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                     "seconds": time.perf_counter() - start})
    largest_sd = max(r["sd"] for r in rows)
    for r in rows[1:]:
        r["margin_over_darts_v2"] = r["mean"] - rows[0]["mean"]
        r["ranked_apart"] = r["margin_over_darts_v2"] > 2 * largest_sd
    lines = [f"{'genotype':<18} {'test error % (mean ± sd, n)':>28} {'margin':>8}"]
    for r in rows:
        margin = f"{r['margin_over_darts_v2']:+.2f}" if "margin_over_darts_v2" in r else "-"
        lines.append(f"{r['genotype']:<18} {r['mean']:>17.2f} ± {r['sd']:.2f}, {len(r['seeds'])} {margin:>8}")
    ok = all(r["ranked_apart"] for r in rows[1:])
    lines.append(f"twice the largest sd: {2 * largest_sd:.2f}; DARTS_V2 ranked apart from both: {ok}")
    print_results(rows, "\n".join(lines), args.out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
