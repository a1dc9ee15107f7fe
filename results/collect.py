"""Finished (or partial) runs -> tidy DataFrames: one row per trial, or one row per trial epoch.

Reads sweep experiment directories (``sweep.yaml`` + one Tune trial directory per trial) and single
``entrannas-tune search`` / ``evaluate`` output directories. Pure: reads files, writes nothing.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pandas as pd

from entrannas.config import read_yaml
from entrannas.genotype import Genotype
from entrannas.records import search_quality, trial_settings, trial_status, valid_error



class NotAnExperiment(ValueError):
    """A directory that is neither a sweep experiment nor a search/evaluate output."""


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut short by a crash
                break
    return rows


def kind_of(path: Path) -> str:
    if (path / "sweep.yaml").is_file():
        return "sweep"
    if (path / "config.yaml").is_file() and (path / "history.jsonl").exists():
        return "evaluate" if (path / "result.json").is_file() or _is_eval_config(path) else "search"
    raise NotAnExperiment(f"{path}: not an experiment directory (expected sweep.yaml from "
                          "'entrannas-tune sweep', or config.yaml + history.jsonl from search/evaluate)")


def _is_eval_config(path: Path) -> bool:
    config = read_yaml((path / "config.yaml").read_text()) or {}
    return "auxiliary" in config and "mode" not in config


@lru_cache(maxsize=None)
def standard_cost(genotype_json: str, dataset: str) -> tuple[float, float]:
    """(parameters in millions, multiply-adds in millions) of the genotype's standard evaluation
    network: DARTS' CIFAR network (36 channels, 20 cells) or the ImageNet mobile one (48, 14).
    Cached: counted once per distinct genotype and dataset."""
    from entrannas.evalnet import NetworkCIFAR, NetworkImageNet, count_multiply_adds, count_parameters

    import torch

    genotype = Genotype.from_json(genotype_json)
    # On the meta device: shapes only, no memory and no arithmetic, and the counts are exact.
    with torch.device("meta"):
        if dataset == "imagenet":
            net, shape = NetworkImageNet(genotype, 48, 14, 1000), (3, 224, 224)
        else:
            classes = 100 if dataset == "cifar100" else 10
            net, shape = NetworkCIFAR(genotype, 36, 20, classes), (3, 32, 32)
    return count_parameters(net) / 1e6, count_multiply_adds(net, shape) / 1e6


def genotype_summary(genotype: Optional[dict]) -> dict:
    """Kept connections per node and how often each op occurs (normal + reduction cell)."""
    if not genotype:
        return {}
    out = {"kept_normal": [len(n) for n in genotype["normal"]],
           "kept_reduce": [len(n) for n in genotype["reduce"]]}
    out["kept_total"] = sum(out["kept_normal"]) + sum(out["kept_reduce"])
    counts: dict[str, int] = {}
    for cell in ("normal", "reduce"):
        for node in genotype[cell]:
            for op, _ in node:
                counts[op] = counts.get(op, 0) + 1
    out.update({f"op:{op}": n for op, n in sorted(counts.items())})
    return out


# -- sweeps ---------------------------------------------------------------------------------------
def _trial_status(rows: list[dict], trial_dir: Path) -> str:
    errored = (trial_dir / "error.txt").is_file() or (trial_dir / "error.pkl").is_file()
    return trial_status(rows[-1] if rows else {}, errored)


def _error_text(trial_dir: Path, rows: list[dict]) -> Optional[str]:
    if rows and rows[-1].get("error"):
        return rows[-1]["error"]
    path = trial_dir / "error.txt"
    if path.is_file():
        lines = [line for line in path.read_text().strip().splitlines() if line.strip()]
        return lines[-1] if lines else "error"
    return None


def _sweep_trials(experiment: Path) -> tuple[list[dict], list[dict]]:
    spec = read_yaml((experiment / "sweep.yaml").read_text()) or {}
    base = spec.get("base") or {}
    resources = spec.get("resources") or {}
    eval_resources = (spec.get("evaluate") or {}).get("resources") or {}
    # GPUs a trial holds: per process times its data-parallel workers (the larger of both stages')
    workers = max(int(resources.get("workers", 1)), int(eval_resources.get("workers", 1)))
    gpu = float(resources.get("gpu", 0)) * workers
    eval_gpu = float(eval_resources.get("gpu", resources.get("gpu", 0))) * workers
    trials, epochs = [], []
    for trial_dir in sorted(p for p in experiment.iterdir() if p.is_dir() and (p / "params.json").is_file()):
        rows = _read_jsonl(trial_dir / "result.json")
        # its grid point and its sampled values: those of its last result (a pbt member's change), or
        # those it started with
        config = (rows[-1].get("config") if rows else None) or json.loads((trial_dir / "params.json").read_text())
        point = trial_settings(config)
        search_rows = [r for r in rows if r.get("stage") == "search" and "epoch" in r]
        last = rows[-1] if rows else {}
        status = _trial_status(rows, trial_dir)
        resolved = trial_dir / "config.yaml"   # what the trial ran, every default filled in
        settings = {**base, **point, **((read_yaml(resolved.read_text()) or {}).get("search") or {}
                                        if resolved.is_file() else {})}
        genotype = json.loads(last["genotype"]) if last.get("genotype") else None
        search_s = last.get("search_seconds_total")
        eval_s = last.get("eval_seconds_total")
        evaluated = last.get("stage") == "evaluate"
        row = {
            "experiment": experiment.name, "trial_id": trial_dir.name, "status": status,
            **{f"setting:{k}": _plain(v) for k, v in point.items()},
            "seed": settings.get("seed", 0), "mode": settings.get("mode", "entrannas"),
            "dataset": settings.get("dataset", "digits"),   # defaults only for trials saved without config.yaml
            "epochs_done": (search_rows[-1]["epoch"] + 1) if search_rows else 0,
            "valid_error": last.get("valid_error"), "valid_loss": last.get("valid_loss"),
            "valid_error_rise": _rise_from_best([r.get("valid_error") for r in search_rows]),
            **search_quality(last),
            "eval_test_error": last.get("eval_test_error") if evaluated else None,
            # the network the evaluation trained (its config, dataset and input size)
            "params_m": last.get("eval_params_m") if evaluated else None,
            "multiply_adds_m": last.get("eval_multiply_adds_m") if evaluated else None,
            "genotype": json.dumps(genotype) if genotype else None,
            "search_seconds": search_s, "eval_seconds": eval_s,
            "gpu_hours": ((search_s or 0) * gpu + (eval_s or 0) * eval_gpu) / 3600 if gpu or eval_gpu else None,
            "peak_memory_mb": _peak(search_rows),
            "workers": last.get("workers", 1),
            # the search's training throughput, over its epochs (every worker's images together)
            "images_per_second": _mean([r.get("images_per_second") for r in search_rows]),
            "error": _error_text(trial_dir, rows) if status in ("failed", "diverged") else None,
        }
        row.update(genotype_summary(genotype))
        trials.append(row)
        for r in search_rows:
            epochs.append(_epoch_row(row, r))
    return trials, epochs


def _mean(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _peak(records: list[dict]) -> Optional[float]:
    """The largest peak memory of the records that measured one (none: a random-mode search)."""
    return max((r["peak_memory_mb"] for r in records if r.get("peak_memory_mb") is not None), default=None)


def _rise_from_best(errors: list) -> Optional[float]:
    """The last epoch's super-net validation error minus the best epoch's: how far a search fell
    back from its best state by its end (0 for a search that ends at its best)."""
    errors = [e for e in errors if e is not None]
    return errors[-1] - min(errors) if errors else None


def _plain(value):
    """A setting value usable as a DataFrame key (lists become their YAML-ish text)."""
    return str(value) if isinstance(value, (list, tuple, dict)) else value


def _epoch_row(trial: dict, record: dict) -> dict:
    thresholds = {}
    for cell in ("normal", "reduce"):
        t = record.get(f"thresholds_{cell}") or (record.get("thresholds") or {}).get(cell)
        if t:
            thresholds[f"threshold_{cell}"] = sum(t) / len(t)
    kept = record.get("kept_connections") or {}
    kept_n = record.get("kept_normal", kept.get("normal"))
    kept_r = record.get("kept_reduce", kept.get("reduce"))
    return {
        **{k: v for k, v in trial.items()
           if k in ("experiment", "trial_id", "seed", "mode") or k.startswith("setting:")},
        "epoch": record["epoch"], "tau": record.get("tau"),
        "valid_error": valid_error(record), **search_quality(record),
        "train_loss": record.get("train_loss"),
        "kept_total": (sum(kept_n) + sum(kept_r)) if kept_n and kept_r else None,
        **thresholds,
    }


# -- single runs ----------------------------------------------------------------------------------
def _single_run(path: Path, kind: str) -> tuple[list[dict], list[dict]]:
    config = read_yaml((path / "config.yaml").read_text()) or {}
    history = _read_jsonl(path / "history.jsonl")
    genotype_path = path / "genotype.json"
    genotype = json.loads(genotype_path.read_text()) if genotype_path.is_file() else None
    result = json.loads((path / "result.json").read_text()) if (path / "result.json").is_file() else {}
    done = len(history) >= int(config.get("epochs") or 0) > 0
    seconds = sum(r.get("seconds", 0) for r in history)
    row = {
        "experiment": path.name, "trial_id": path.name, "status": "done" if done else "running",
        "seed": config.get("seed", 0), "mode": config.get("mode", "evaluate" if kind == "evaluate" else None),
        "dataset": config.get("dataset"), "epochs_done": len(history),
        "valid_error": valid_error(history[-1]) if kind == "search" and history else None,
        "valid_error_rise": _rise_from_best([valid_error(r) for r in history]) if kind == "search" else None,
        **search_quality(history[-1] if kind == "search" and history else {}),
        "eval_test_error": result.get("test_error",
                                      history[-1].get("test_error") if kind == "evaluate" and history else None),
        "params_m": result.get("params_m"), "multiply_adds_m": result.get("multiply_adds_m"),
        "genotype": json.dumps(genotype) if genotype else None,
        "search_seconds": seconds if kind == "search" else None,
        "eval_seconds": seconds if kind == "evaluate" else None,
        "gpu_hours": seconds / 3600 if history and "cuda" in str(history[-1].get("device", "")) else None,
        "peak_memory_mb": _peak(history),
        "error": None,
    }
    row.update(genotype_summary(genotype))
    epochs = [_epoch_row(row, r) for r in history] if kind == "search" else []
    return [row], epochs


# -- entry points ---------------------------------------------------------------------------------
def load(paths, with_cost: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trials, epochs) DataFrames for one or more experiment or run directories.

    ``trials``: one row per trial, with the swept settings as ``setting:KEY`` columns.
    ``epochs``: one row per trial and search epoch (valid error, tau, thresholds, kept connections).
    ``params_m`` and ``multiply_adds_m`` are those of the network an evaluation trained (empty
    where none did); ``with_cost`` adds those of each final genotype's standard evaluation network
    (DARTS' CIFAR network, or the ImageNet mobile one) as ``standard_params_m`` and
    ``standard_multiply_adds_m``, whatever the dataset the trial ran on."""
    trials, epochs = [], []
    for p in paths:
        path = Path(p)
        if not path.is_dir():
            raise NotAnExperiment(f"{path}: not a directory")
        kind = kind_of(path)
        t, e = _sweep_trials(path) if kind == "sweep" else _single_run(path, kind)
        trials += t
        epochs += e
    df = pd.DataFrame(trials)
    if with_cost and not df.empty:
        costs = [standard_cost(g, d) if isinstance(g, str) else (None, None)
                 for g, d in zip(df["genotype"], df["dataset"].fillna("cifar10"))]
        df["standard_params_m"] = [c[0] for c in costs]
        df["standard_multiply_adds_m"] = [c[1] for c in costs]
    op_columns = [c for c in df.columns if c.startswith("op:")]
    df[op_columns] = df[op_columns].fillna(0).astype(int) if op_columns else df[op_columns]
    return df, pd.DataFrame(epochs)


def sweep_tuning(paths) -> dict:
    """What the sweeps' specs say of their Tune sections: ``sample`` (setting -> distribution name,
    over all the sweeps), and the first one's ``metric`` and ``mode`` (default valid_error, min)."""
    sample, metric, mode = {}, None, None
    for p in paths:
        spec_path = Path(p) / "sweep.yaml"
        if not spec_path.is_file():
            continue
        spec = read_yaml(spec_path.read_text()) or {}
        for key, dist in (spec.get("sample") or {}).items():
            sample.setdefault(key, next(iter(dist)) if isinstance(dist, dict) and dist else None)
        metric, mode = metric or spec.get("metric"), mode or spec.get("mode")
    return {"sample": sample, "metric": metric or "valid_error", "mode": mode or "min"}


def swept_settings(trials: pd.DataFrame) -> list[str]:
    """Setting names that vary between the trials (seed included), in column order."""
    keys = [c.split(":", 1)[1] for c in trials.columns if c.startswith("setting:")]
    return [k for k in keys if trials[f"setting:{k}"].astype(str).nunique() > 1]
