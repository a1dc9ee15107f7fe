"""Sweep specs: one YAML file describes an ablation study; validated before Ray starts.

```yaml
name: lambda
base: {mode: dst, dataset: cifar10}          # any search setting, fixed
sweep:                                       # grid axes (cartesian product); a bare value is fixed
  lambda_: [0.0, 0.1, 0.5]
  seed: [0, 1, 2]
resources: {cpu: 4, gpu: 0.5}                # per trial
max_concurrent: 8
max_failures: 2
evaluate: {epochs: 600}                      # optional: train each final genotype from scratch
```

``sweep`` may also be a list of such mappings: the union of their grids (e.g. DARTS and EnTranNAS
once each, DST at several lambdas).
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

TOP_KEYS = ("name", "base", "sweep", "resources", "max_concurrent", "max_failures", "evaluate")
RESOURCE_KEYS = ("cpu", "gpu")
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
                "evaluate": self.evaluate}


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
    out = {"cpu": 1, "gpu": 0}
    for key, amount in value.items():
        if key not in RESOURCE_KEYS:
            raise _fail(f"{where}.{key}", amount, unknown_setting(key, RESOURCE_KEYS, "resource"))
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise _fail(f"{where}.{key}", amount, "must be a number >= 0")
        if amount > 1 and amount != int(amount):
            raise _fail(f"{where}.{key}", amount, "fractions are allowed below 1 only; above, whole units")
        if key == "gpu" and amount > 1:
            raise _fail(f"{where}.{key}", amount, "a trial runs on one device: at most 1 GPU per trial "
                        "(a fraction shares one)")
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
    top = {key: data.get(key) for key in ("max_concurrent", "max_failures") if key in data}
    for key, value in parse_overrides(overrides or []).items():
        if key.startswith("evaluate.resources."):
            evaluate = dict(evaluate or {})
            evaluate["resources"] = {**(evaluate.get("resources") or {}), key.split(".", 2)[2]: value}
        elif key.startswith("evaluate."):
            evaluate = {**(evaluate or {}), key.split(".", 1)[1]: value}
        elif key.startswith("resources."):
            resources = {**(resources if isinstance(resources, dict) else {}), key.split(".", 1)[1]: value}
        elif key in ("max_concurrent", "max_failures"):
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
                     max_failures=max_failures, evaluate=evaluate)
    for point in spec.points():
        where = ", ".join(f"{k}={v}" for k, v in point.items()) or "base"
        try:
            search = spec.search_config(point)
        except ConfigError as e:
            prefix = "base." if e.field in base and e.field not in point else ""
            raise SpecError(f"{prefix}{e} (trial {where})") from None
        try:
            spec.eval_config(search)
        except ConfigError as e:
            raise SpecError(f"evaluate.{e} (trial {where})") from None
    return spec


def load_spec(path: os.PathLike, overrides: Optional[list[str]] = None) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise _fail("spec", str(path), "is not a readable file")
    try:
        data = read_yaml(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(yaml_error(path, e)) from None
    return spec_from_dict(data, overrides)


def check_resources_fit(spec: SweepSpec, nodes: list[dict]) -> None:
    """``nodes``: each node's total resources ({"CPU": n, "GPU": m}). A trial must fit on one node."""
    need = spec.trial_resources()
    for node in nodes:
        if node.get("CPU", 0) >= need["cpu"] and node.get("GPU", 0) >= need["gpu"]:
            return
    have = ", ".join(f"{{cpu: {n.get('CPU', 0):g}, gpu: {n.get('GPU', 0):g}}}" for n in nodes) or "none"
    key = "resources" if need == spec.resources else "resources (with evaluate.resources)"
    raise _fail(key, {k: need[k] for k in RESOURCE_KEYS},
                f"no node can hold one trial; nodes have {have}")


def local_node_resources() -> dict:
    """What a Ray started here would offer: all CPU cores and all visible GPUs."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:   # torch without CUDA support
        gpus = 0
    return {"CPU": os.cpu_count() or 1, "GPU": gpus}
