"""Sweep specs: one YAML file describes an ablation study; validated before Ray starts.

```yaml
name: lambda
base: {mode: dst, dataset: cifar10}          # any search setting, fixed
sweep:                                       # grid axes (cartesian product); a bare value is fixed
  lambda_: [0.0, 0.1, 0.5]
  seed: [0, 1, 2]
resources: {cpu: 4, gpu: 0.5}                # per trial (with workers: N, per worker of N)
max_concurrent: 8
max_failures: 2
evaluate: {epochs: 600}                      # optional: train each final genotype from scratch
```

``sweep`` may also be a list of such mappings: the union of their grids (e.g. DARTS and EnTranNAS
once each, DST at several lambdas). Sampled settings, search algorithms, schedulers and loggers
(``sample``, ``num_samples``, ``search_alg``, ``metric``, ``mode``, ``scheduler``, ``loggers``) are
described in ``orchestrator/tuning.py`` and docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import yaml

from entrannas.config import (PATH_SETTINGS, ConfigError, EvalConfig, SearchConfig, absolute_path, parse_overrides,
                              read_yaml, unknown_setting, yaml_error)
from entrannas.distributed import check_data_parallel

from .tuning import TuneSpecError, check_distribution, check_tune_sections, values_to_check

TUNE_KEYS = ("num_samples", "search_alg", "metric", "mode", "scheduler", "loggers")
TOP_KEYS = ("name", "base", "sweep", "sample", "resources", "max_concurrent", "max_failures", "evaluate", *TUNE_KEYS)
RESOURCE_KEYS = ("cpu", "gpu", "workers")
#: evaluation settings a trial takes from its search unless the spec's evaluate section sets them
INHERITED_BY_EVALUATION = ("dataset", "data_dir", "download", "seed", "device", "num_workers")


class SpecError(ValueError):
    """A sweep spec that cannot run; the message names the key, the value and what is allowed."""


@dataclass(frozen=True)
class SweepSpec:
    name: str
    base: dict
    sweep: list            # list of grid blocks, each {key: [values]}
    resources: dict = field(default_factory=lambda: {"cpu": 1, "gpu": 0})
    max_concurrent: Optional[int] = None
    max_failures: int = 2
    evaluate: Optional[dict] = None
    sample: dict = field(default_factory=dict)     # setting -> {distribution: [args]}
    tuning: dict = field(default_factory=lambda: check_tune_sections({}, [], 1, False, 1))

    # -- grid -----------------------------------------------------------------------------------
    def points(self) -> list[dict]:
        """Every trial's swept settings: the union over blocks of each block's cartesian product."""
        out = []
        for block in self.sweep:
            keys = list(block)
            for values in itertools.product(*(block[k] for k in keys)):
                point = dict(zip(keys, values))
                if point not in out:
                    out.append(point)
        return out or [{}]

    @property
    def num_samples(self) -> int:
        return self.tuning["num_samples"]

    def trial_count(self) -> int:
        """Trials the sweep runs: num_samples draws of the sampled settings at every grid point."""
        return len(self.points()) * self.num_samples

    def epochs_per_trial(self) -> int:
        """Reports (epochs) of the longest trial: its search, then its evaluation."""
        most = 0
        for point in self.points():
            search = self.search_config(point)
            evaluation = self.eval_config(search)
            most = max(most, (1 if search.mode == "random" else search.epochs) + (evaluation.epochs if evaluation else 0))
        return most

    def swept_keys(self) -> list[str]:
        """The settings whose value differs between trials, in spec order."""
        points = self.points()
        keys = list(dict.fromkeys(k for p in points for k in p))
        return [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]

    def search_config(self, point: dict) -> SearchConfig:
        return SearchConfig.from_dict({**self.base, **point}).resolve()

    def eval_config(self, search: SearchConfig) -> Optional[EvalConfig]:
        if self.evaluate is None:
            return None
        inherited = {k: getattr(search, k) for k in INHERITED_BY_EVALUATION}
        settings = {k: v for k, v in self.evaluate.items() if k != "resources"}
        return EvalConfig.from_dict({**inherited, **settings}).resolve()

    def trial_resources(self) -> dict:
        """What a trial holds: the larger of the search's and the evaluation's needs, per kind."""
        res = dict(self.resources)
        for key, value in ((self.evaluate or {}).get("resources") or {}).items():
            res[key] = max(res.get(key, 0), value)
        return res

    def renamed(self, name: str) -> "SweepSpec":
        _check_name("--name", name)
        return dataclasses.replace(self, name=name)

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "sweep": self.sweep, "resources": self.resources,
                "max_concurrent": self.max_concurrent, "max_failures": self.max_failures,
                "evaluate": self.evaluate, **({"sample": self.sample} if self.sample else {}),
                **self._tune_keys()}

    def _tune_keys(self) -> dict:
        """The Tune sections as a spec writes them (defaults left out)."""
        t = self.tuning
        out = {"num_samples": t["num_samples"] if t["num_samples"] != 1 else None,
               "search_alg": {t["search_alg"]["name"]: {"seed": t["search_alg"]["seed"]}},
               "metric": t["metric"], "mode": t["mode"],
               "scheduler": t["scheduler"] and {t["scheduler"]["name"]: {k: v for k, v in t["scheduler"].items()
                                                                          if k != "name"}},
               "loggers": t["loggers"] or None}
        return {k: v for k, v in out.items() if v is not None}


# -- loading and validation --------------------------------------------------------------------
def _fail(key: str, value: Any, allowed: str) -> SpecError:
    return SpecError(f"{key} = {value!r}: {allowed}")


#: The longest experiment name: it names a directory, and Tune puts it in longer names of its own.
MAX_NAME = 100


def _check_name(key: str, name: Any) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise _fail(key, name, "needs a name of letters, digits, '_', '.', '-' (it names a directory)")
    if len(name) > MAX_NAME:
        raise SpecError(f"{key}: a name of {len(name)} characters ({name[:20]}...): at most {MAX_NAME} "
                        "(it names a directory)")


def _resources(where: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise _fail(where, value, "expected a mapping like {cpu: 4, gpu: 0.5}")
    out = {"cpu": 1, "gpu": 0, "workers": 1}
    for key, amount in value.items():
        if key not in RESOURCE_KEYS:
            raise _fail(f"{where}.{key}", amount, unknown_setting(key, RESOURCE_KEYS, "resource"))
        if key == "workers" and (isinstance(amount, bool) or not isinstance(amount, int) or amount < 1):
            raise _fail(f"{where}.{key}", amount, "must be a whole number >= 1 (data-parallel workers per trial)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise _fail(f"{where}.{key}", amount, "must be a number >= 0")
        if amount > 1 and amount != int(amount):
            raise _fail(f"{where}.{key}", amount, "fractions are allowed below 1 only; above, whole units")
        if key == "gpu" and amount > 1:
            raise _fail(f"{where}.{key}", amount, "a process runs on one device: at most 1 GPU per trial or "
                        "per worker (a fraction shares one); for several GPUs, set workers")
        out[key] = amount
    if out["cpu"] <= 0:
        raise _fail(f"{where}.cpu", out["cpu"], "must be > 0")
    return out


def _search_keys() -> set[str]:
    return {f.name for f in fields(SearchConfig)}


def spec_from_dict(data: Any, overrides: Optional[list[str]] = None) -> SweepSpec:
    """Validate a spec mapping (after ``--set`` overrides) and every trial's resolved config."""
    if not isinstance(data, dict):
        raise _fail("spec", data, "expected a mapping with name, base, sweep, ...")
    for key in data:
        if key not in TOP_KEYS:
            raise _fail(key, data[key], unknown_setting(key, TOP_KEYS, "spec key"))
    name = data.get("name")
    _check_name("name", name)
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise _fail("base", base, "expected a mapping of search settings")
    raw_sweep = data.get("sweep") or {}
    blocks = raw_sweep if isinstance(raw_sweep, list) else [raw_sweep]
    evaluate = data.get("evaluate")
    if evaluate is not None and not isinstance(evaluate, dict):
        raise _fail("evaluate", evaluate, "expected a mapping of evaluation settings (or leave it out)")
    evaluate = dict(evaluate) if evaluate is not None else None

    search_keys = _search_keys()
    base = dict(base)
    sweep: list[dict] = []
    set_keys = set()
    resources = data.get("resources", {"cpu": 1, "gpu": 0})
    top = {key: data.get(key) for key in ("max_concurrent", "max_failures", *TUNE_KEYS) if key in data}
    for key, value in parse_overrides(overrides or []).items():
        if key.startswith("evaluate.resources."):
            evaluate = dict(evaluate or {})
            evaluate["resources"] = {**(evaluate.get("resources") or {}), key.split(".", 2)[2]: value}
        elif key.startswith("evaluate."):
            evaluate = {**(evaluate or {}), key.split(".", 1)[1]: value}
        elif key.startswith("resources."):
            resources = {**(resources if isinstance(resources, dict) else {}), key.split(".", 1)[1]: value}
        elif key in ("max_concurrent", "max_failures", *TUNE_KEYS):
            top[key] = value
        else:
            base[key] = value
            set_keys.add(key)
    # Relative paths mean the directory the sweep is started from, not a trial's own directory.
    for key in PATH_SETTINGS:
        if key in base:
            base[key] = absolute_path(base[key])
        if evaluate is not None and key in evaluate:
            evaluate[key] = absolute_path(evaluate[key])
    for key in base:
        if key not in search_keys:
            raise _fail(f"base.{key}", base[key], unknown_setting(key, sorted(search_keys), "search setting"))
    for b, block in enumerate(blocks):
        where = "sweep" if len(blocks) == 1 else f"sweep[{b}]"
        if not isinstance(block, dict):
            raise _fail(where, block, "expected a mapping of setting -> list of values")
        axes = {}
        for key, values in block.items():
            if key not in search_keys:
                raise _fail(f"{where}.{key}", values, unknown_setting(key, sorted(search_keys), "search setting"))
            if key in set_keys:
                continue   # --set fixes it: the axis collapses
            if not isinstance(values, list):
                values = [values]   # a bare value is fixed
            if not values:
                raise _fail(f"{where}.{key}", values, "empty axis: give at least one value")
            axes[key] = [absolute_path(v) for v in values] if key in PATH_SETTINGS else values
        sweep.append(axes)

    raw_sample = data.get("sample") or {}
    if not isinstance(raw_sample, dict):
        raise _fail("sample", raw_sample, "expected a mapping of setting -> distribution")
    sample = {}
    grid_keys = {k for block in sweep for k in block}
    for key, dist in raw_sample.items():
        if key not in search_keys:
            raise _fail(f"sample.{key}", dist, unknown_setting(key, sorted(search_keys), "search setting"))
        if key in set_keys:
            continue   # --set fixes it
        if key in grid_keys:
            raise _fail(f"sample.{key}", dist, "is a sweep: axis too; a setting is either swept or sampled")
        try:
            sample[key] = check_distribution(key, dist)
        except TuneSpecError as e:
            raise SpecError(str(e)) from None

    resources = _resources("resources", resources)
    if evaluate is not None and "resources" in evaluate:
        evaluate["resources"] = _resources("evaluate.resources", evaluate["resources"])
    max_concurrent = top.get("max_concurrent")
    if max_concurrent is not None and (isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int)
                                       or max_concurrent < 1):
        raise _fail("max_concurrent", max_concurrent, "must be an integer >= 1 (or left out)")
    max_failures = top.get("max_failures", 2)
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < 0:
        raise _fail("max_failures", max_failures, "must be an integer >= 0")

    spec = SweepSpec(name=name, base=base, sweep=sweep, resources=resources, max_concurrent=max_concurrent,
                     max_failures=max_failures, evaluate=evaluate, sample=sample)
    workers = spec.trial_resources()["workers"]
    for point in spec.points():
        where = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        for drawn in _sampled_corners(sample):
            try:
                search = spec.search_config({**point, **drawn})
                check_data_parallel(search, workers, "resources.workers")
            except ConfigError as e:
                prefix = ("sample." if e.field in drawn else
                          "base." if e.field in base and e.field not in point else "")
                drew = f" (drawn from {sample[e.field]})" if e.field in drawn else ""
                raise SpecError(f"{prefix}{e}{drew} (trial {where})") from None
            try:
                spec.eval_config(search)
            except ConfigError as e:
                raise SpecError(f"evaluate.{e} (trial {where})") from None
    try:
        tuning = check_tune_sections(top, list(sample), len(spec.points()), evaluate is not None,
                                     spec.epochs_per_trial())
    except TuneSpecError as e:
        raise SpecError(str(e)) from None
    if workers > 1 and tuning["scheduler"] and tuning["scheduler"]["name"] == "pbt":
        raise _fail("scheduler.name", "pbt", f"not with resources.workers: {workers}: population-based training "
                    "copies Tune checkpoints, which a data-parallel trial keeps in Ray Train; use workers: 1")
    return dataclasses.replace(spec, tuning=tuning)


def _sampled_corners(sample: dict) -> list[dict]:
    """Settings that stand for every draw of ``sample``: each sampled setting at each of its checked
    values (``values_to_check``), the others at their first."""
    if not sample:
        return [{}]
    values = {key: values_to_check(dist) for key, dist in sample.items()}
    first = {key: v[0] for key, v in values.items()}
    return [{**first, key: v} for key, vs in values.items() for v in vs]


def load_spec(path: os.PathLike, overrides: Optional[list[str]] = None) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise _fail("spec", str(path), "is not a readable file")
    try:
        data = read_yaml(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(yaml_error(path, e)) from None
    return spec_from_dict(data, overrides)


def worker_slots(need: dict, nodes: list[dict]) -> int:
    """How many processes of ``need`` ({cpu, gpu} each) ``nodes`` hold at once."""
    def fits(node: dict) -> int:
        counts = [int(node.get("CPU", 0) // need["cpu"])]
        if need["gpu"]:
            counts.append(int(node.get("GPU", 0) // need["gpu"]))
        return min(counts)
    return sum(fits(node) for node in nodes)


def check_resources_fit(spec: SweepSpec, nodes: list[dict]) -> None:
    """``nodes``: each node's total resources ({"CPU": n, "GPU": m}). A trial (or each of its
    workers) must fit on one node, and its workers on the nodes together."""
    need = spec.trial_resources()
    have = ", ".join(f"{{cpu: {n.get('CPU', 0):g}, gpu: {n.get('GPU', 0):g}}}" for n in nodes) or "none"
    key = "resources" if need == spec.resources else "resources (with evaluate.resources)"
    slots = worker_slots(need, nodes)
    shown = need if need["workers"] > 1 else {k: need[k] for k in ("cpu", "gpu")}
    if slots == 0:
        raise _fail(key, shown, f"no node can hold one {'worker' if need['workers'] > 1 else 'trial'}; "
                    f"nodes have {have}")
    if slots < need["workers"]:
        raise _fail(key, shown, f"the nodes hold {slots} workers of this size at once, not {need['workers']}; "
                    f"nodes have {have}")


def trials_at_once(spec: SweepSpec, nodes: list[dict]) -> Optional[int]:
    """For data-parallel trials (whose workers Tune does not count), how many fit at once."""
    need = spec.trial_resources()
    return max(1, worker_slots(need, nodes) // need["workers"]) if need["workers"] > 1 else None


def local_node_resources() -> dict:
    """What a Ray started here would offer: all CPU cores and all visible GPUs."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:   # torch without CUDA support
        gpus = 0
    return {"CPU": os.cpu_count() or 1, "GPU": gpus}
