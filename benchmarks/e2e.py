"""Time whole searches end to end: the ``entrannas-tune search`` command, start to finish.

    python benchmarks/e2e.py --configs darts entrannas dst --device cuda --config recipes/fast-gpu.yaml

Each configuration runs as its own ``python -m entrannas search`` process on a CIFAR-10-format copy
of a learnable synthetic set (``--train-images``, 32x32, ten classes: each a smooth colour pattern,
shifted and noised per image, so that a search's alpha settles as on real data): its imports, the
data put on the device, the warm-up epochs, every derivation and recording, the validation passes
and the checkpoint written each epoch are all in its wall time. Each printed epoch line is timed as
it arrives; with the epoch's own record (``history.jsonl``) that splits an epoch into training,
validation and the rest (the record, the checkpoint, the genotype file), and gives the derived
architectures the steps ran per epoch and the peak memory (the device's on a GPU, the process's
resident set on the CPU).

A configuration is a mode, optionally with ``+variant`` (as ``entrannas-tune bench``: ``bf16``,
``cl``, ``graphs``, ``streams``) and ``+key=value`` parts. ``--time-limit S`` stops a configuration
after S seconds: its figures are then projected to ``--epochs`` from the epochs it finished, said
so in its row (``projected``). The DARTS configuration runs ``--darts-epochs`` epochs (the first a
warm-up epoch, as a search's first ``arch_warmup_epochs`` are) and is projected the same way.
Prints one JSON document (also ``--out``) and a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import VARIANTS  # noqa: E402

from entrannas.config import load_config  # noqa: E402
from entrannas.rundir import write_text_atomic  # noqa: E402


def write_learnable_cifar(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-10-format copy (``cifar-10-batches-py``, five training batches and a test batch) of
    images whose class is a smooth colour pattern, shifted by up to 4 pixels and noised."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(10, 3, 4, 4, generator=gen), size=32, mode="bilinear", align_corners=False)
    patterns = patterns / patterns.std()

    def images(n: int) -> tuple[bytes, list[int]]:
        labels = torch.randint(0, 10, (n,), generator=gen)
        out = patterns[labels].clone()
        shifts = torch.randint(-4, 5, (n, 2), generator=gen)
        for dy, dx in {tuple(s) for s in shifts.tolist()}:
            rows = ((shifts[:, 0] == dy) & (shifts[:, 1] == dx)).nonzero().flatten()
            out[rows] = torch.roll(out[rows], shifts=(dy, dx), dims=(2, 3))
        out = out + 0.8 * torch.randn(out.shape, generator=gen)
        pixels = (out * 48 + 128).clamp(0, 255).to(torch.uint8).reshape(n, -1).numpy()
        return pixels, labels.tolist()

    per_batch = -(-n_train // 5)
    for i in range(5):
        data, labels = images(min(per_batch, n_train - i * per_batch))
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    data, labels = images(n_test)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": data, "labels": labels}))
    return root


def settings_of(label: str) -> list[str]:
    """``--set`` arguments of a configuration label: its mode, variants and ``key=value`` parts."""
    mode, *parts = label.split("+")
    out = [f"mode={mode}"]
    for part in parts:
        if "=" in part:
            out.append(part)
        elif part in VARIANTS:
            out += [f"{k}={json.dumps(v)}" for k, v in VARIANTS[part].items()]
        else:
            raise ValueError(f"--configs: {label!r}: {part!r} is no variant ({', '.join(VARIANTS)}) or key=value")
    return out


def run_search(label: str, args: argparse.Namespace, data: Path, workdir: Path, epochs: int,
               extra: list[str]) -> dict:
    """One ``search`` process, its epoch lines timed as they arrive; returns its row."""
    out_dir = workdir / label.replace("+", "_").replace("=", "-")
    command = [sys.executable, "-m", "entrannas", "search", "--out", str(out_dir)]
    if args.config:
        command += ["--config", str(args.config)]
    for item in ["dataset=cifar10", f"data_dir={data}", f"epochs={epochs}", f"device={args.device}",
                 *args.overrides, *extra, *settings_of(label)]:
        command += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    lines: list[tuple[float, str]] = []
    # stderr (the progress bars) to a file: a pipe read only at the end would fill and stall the search
    errors = workdir / f"{out_dir.name}.stderr"
    with open(errors, "w") as err_file, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err_file,
                                                         text=True, env=env) as proc:
        watchdog = threading.Timer(args.time_limit, proc.terminate) if args.time_limit else None
        if watchdog:
            watchdog.start()
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip()))
        proc.wait()
        stopped = watchdog is not None and watchdog.finished.is_set() and proc.returncode != 0
        if watchdog:
            watchdog.cancel()
    wall = time.perf_counter() - start
    history = out_dir / "history.jsonl"
    records = [json.loads(x) for x in history.read_text().splitlines() if x.strip()] if history.is_file() else []
    if proc.returncode != 0 and not stopped:
        return {"config": label,
                "error": (errors.read_text().strip().splitlines() or ["exit " + str(proc.returncode)])[-1]}
    return epoch_figures(label, lines, records, wall, stopped)


def epoch_figures(label: str, lines: list[tuple[float, str]], records: list[dict], wall: float,
                  stopped: bool) -> dict:
    """Per-epoch phases from the epoch lines' arrival times and the records: an epoch's wall time
    runs from the previous line (the first: the ``search:`` line printed once the data and the
    super-net are ready), its training and validation are its record's, the rest is what the command
    did around them (the record, the checkpoint and the genotype file written, the line printed)."""
    ready = next((t for t, line in lines if line.startswith("search:")), None)
    marks = [t for t, line in lines if line.startswith("epoch ")][:len(records)]
    epochs, previous = [], ready
    for record, mark in zip(records, marks):
        epoch_wall = mark - previous
        previous = mark
        epochs.append({"epoch": record["epoch"], "wall": epoch_wall,
                       "train": record["seconds"] - record["valid_seconds"], "valid": record["valid_seconds"],
                       "other": epoch_wall - record["seconds"], "arch_updated": record["arch_updated"],
                       "architectures": record["architectures"], "derivations": record["derivations"],
                       "genotype_stability": record.get("genotype_stability"),
                       "peak_memory_mb": record["peak_memory_mb"]})
    return {"config": label, "stopped_at_time_limit": stopped, "epochs_run": len(epochs),
            "wall_seconds": wall, "startup_seconds": ready, "epochs": epochs,
            "peak_memory_mb": max((e["peak_memory_mb"] for e in epochs), default=None),
            "device": records[-1]["device"] if records else None,
            "derived_valid_acc": records[-1].get("derived_valid_acc") if records else None}


def project(row: dict, epochs: int, warmup_epochs: int, settle_epochs: int) -> None:
    """``row``'s whole-search figures: measured where it ran every epoch, else projected from the
    epochs it ran: the warm-up, the arch-updating and the settling epochs each at the median of
    those it ran (settling epochs it did not reach at the arch-updating one's, an upper bound)."""
    ran = row["epochs"]
    if not ran:
        return
    row["projected"] = len(ran) < epochs
    kinds = {"warm-up": [], "search": [], "settle": []}
    for e in ran:
        kind = "search" if e["arch_updated"] else "warm-up" if e["epoch"] < warmup_epochs else "settle"
        kinds[kind].append(e["wall"])
    warmup_epochs = min(warmup_epochs, epochs)
    settle_epochs = min(settle_epochs, epochs - warmup_epochs)
    counts = {"warm-up": warmup_epochs, "search": epochs - warmup_epochs - settle_epochs, "settle": settle_epochs}
    if not row["projected"]:
        row["search_minutes"] = row["wall_seconds"] / 60
    elif not kinds["search"] and counts["search"] > 0:
        row["search_minutes"] = None   # its epochs with architecture steps cannot be guessed from the others
        row["note"] = "stopped before an epoch with architecture steps finished: no projection"
    else:
        median = {k: statistics.median(v or kinds["search"] or kinds["warm-up"]) for k, v in kinds.items()}
        row["search_minutes"] = (row["startup_seconds"] + sum(counts[k] * median[k] for k in counts)) / 60
    for phase in ("train", "valid", "other"):
        row[f"{phase}_seconds_per_epoch"] = statistics.median(e[phase] for e in ran)
    row["architectures_per_epoch"] = [e["architectures"] for e in ran]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/e2e.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["darts", "entrannas", "dst"])
    p.add_argument("--epochs", type=int, default=50, help="a search's epochs (default 50, the paper's)")
    p.add_argument("--darts-epochs", type=int, default=3, help="epochs the DARTS configuration runs, then projected")
    p.add_argument("--train-images", type=int, default=50_000, help="training images (CIFAR-10: 50,000)")
    p.add_argument("--test-images", type=int, default=1_000)
    p.add_argument("--device", default="auto")
    p.add_argument("--config", type=Path, help="a settings file for every configuration (e.g. recipes/fast-gpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a search setting for every configuration")
    p.add_argument("--time-limit", type=float, default=None, metavar="S",
                   help="stop a configuration after S seconds and project the rest")
    p.add_argument("--baseline", type=Path, help="an earlier e2e JSON whose darts row the speed-ups are against "
                   "(when this run has none)")
    p.add_argument("--data", type=Path, help="keep the generated data here (default: a temporary directory)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        for label in args.configs:
            settings_of(label)
        for name in ("epochs", "darts_epochs", "train_images", "test_images"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    except ValueError as e:
        print(f"e2e: {e}", file=sys.stderr)
        return 2
    doc = {"command": " ".join(["python benchmarks/e2e.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "host": platform.node(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "train_images": args.train_images, "epochs": args.epochs, "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or Path(tmp) / "data"
        if not (data / "cifar-10-batches-py" / "test_batch").is_file():
            write_learnable_cifar(data, args.train_images, args.test_images)
        for label in args.configs:
            darts = label.split("+")[0] == "darts"
            epochs = args.darts_epochs if darts else args.epochs
            extra = ["arch_warmup_epochs=1"] if darts else []   # its few epochs: one warm-up, then full steps
            row = run_search(label, args, data, Path(tmp), epochs, extra)
            if "error" not in row:
                # the warm-up epochs of the whole search this configuration stands for
                full = load_config(args.config, ["dataset=cifar10", f"data_dir={data}", f"epochs={args.epochs}",
                                                 *args.overrides, *settings_of(label)])
                project(row, args.epochs, full.arch_warmup_epochs, full.settle_epochs)
            doc["results"].append(row)
            if args.out:
                write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    rows = doc["results"] + (json.loads(args.baseline.read_text())["results"] if args.baseline else [])
    base = next((r for r in rows if r["config"] == "darts" and r.get("search_minutes")), None)
    for r in doc["results"]:
        if base and r.get("search_minutes"):
            r["speedup_vs_darts"] = base["search_minutes"] / r["search_minutes"]
    if args.out:
        write_text_atomic(args.out, json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(table(doc["results"], args.epochs), file=sys.stderr)
    return 1 if any("error" in r for r in doc["results"]) else 0


def table(rows: list[dict], epochs: int) -> str:
    lines = [f"{'config':<30} {f'{epochs} ep (min)':>12} {'x darts':>8} {'start s':>8} {'train s/ep':>10} "
             f"{'valid s/ep':>10} {'other s/ep':>10} {'archs/ep (max)':>14} {'peak MiB':>9}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:<30} failed: {r['error'][:80]}")
            continue
        if not r["epochs"]:
            lines.append(f"{r['config']:<30} no epoch finished")
            continue
        minutes = "-" if r["search_minutes"] is None else f"{r['search_minutes']:.2f}" + ("*" if r["projected"] else "")
        speed = f"{r['speedup_vs_darts']:.2f}" if r.get("speedup_vs_darts") else "-"
        archs = r["architectures_per_epoch"]
        lines.append(f"{r['config']:<30} {minutes:>12} {speed:>8} {r['startup_seconds']:>8.1f} "
                     f"{r['train_seconds_per_epoch']:>10.2f} {r['valid_seconds_per_epoch']:>10.2f} "
                     f"{r['other_seconds_per_epoch']:>10.2f} {f'{statistics.median(archs):g} ({max(archs)})':>14} "
                     f"{r['peak_memory_mb'] or 0:>9.0f}")
    lines.append("(* projected from the epochs run; per-epoch phases are medians; archs: derived architectures "
                 "the steps ran per epoch)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
