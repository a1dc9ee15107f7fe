"""The Ray Tune side of a spec: sampled settings, the search algorithm, the scheduler, the loggers.

Validation here is pure (no Ray): ``spec_from_dict`` calls it before anything starts. The ``tune_*``
builders turn the validated sections into Tune objects when the sweep runs.

```yaml
sample:                                   # drawn per trial, num_samples times per grid point
  lambda_: {loguniform: [0.01, 1.0]}      # also uniform, quniform [lo, hi, q], qloguniform, randint [lo, hi]
  bottleneck: {choice: [2, 4, 8]}
num_samples: 6
search_alg: random                        # or optuna, hyperopt; {optuna: {seed: 1}}
metric: valid_error                       # what the algorithm and the scheduler minimise (mode: min)
scheduler: {asha: {grace_period: 1, reduction_factor: 2}}   # or hyperband, pbt; times in epochs
loggers: [mlflow, wandb]                  # Tune callbacks, offline by default
```
"""

from __future__ import annotations

import importlib.util
import math
import os
from numbers import Real
from typing import Any, Optional

from entrannas.bilevel import MUTABLE_SETTINGS
from entrannas.settings import unknown_setting

#: distribution -> how many numbers it takes (choice: a list of values)
DISTRIBUTIONS = {"uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3, "randint": 2, "choice": None}
SEARCH_ALGS = ("random", "optuna", "hyperopt")
SCHEDULERS = {
    "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": None, "brackets": 1},
    "hyperband": {"reduction_factor": 3, "max_t": None},
    "pbt": {"perturbation_interval": 1, "mutate": None, "quantile_fraction": 0.25, "resample_probability": 0.25,
            "burn_in_period": 0, "synch": False},
}
#: loggers and their options (TensorBoard has none: Tune writes its files when tensorboardX is installed)
LOGGERS = {"tensorboard": (),
           "mlflow": ("tracking_uri", "experiment_name"),
           "wandb": ("project", "mode", "group")}
#: metrics a sweep can optimise: every result carries the search's; eval_test_error needs evaluate
METRICS = {"valid_error": "super-net validation error", "derived_valid_error": "derived network's validation error",
           "valid_loss": "super-net validation loss", "eval_test_error": "evaluation test error"}
#: the Python package each optional feature imports, and the extra that installs it
PACKAGES = {"optuna": ("optuna", "optuna"), "hyperopt": ("hyperopt", "hyperopt"),
            "tensorboard": ("tensorboardX", "tensorboard"), "mlflow": ("mlflow", "mlflow"),
            "wandb": ("wandb", "wandb")}


class TuneSpecError(ValueError):
    """Raised as the spec's own SpecError by spec_from_dict."""


def _fail(key: str, value: Any, allowed: str) -> TuneSpecError:
    return TuneSpecError(f"{key} = {value!r}: {allowed}")


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _one_key(where: str, value: Any, known) -> tuple[str, Any]:
    """``name`` or ``{name: options}`` -> (name, options)."""
    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, dict) and len(value) == 1:
        name, options = next(iter(value.items()))
        options = {} if options is None else options
    else:
        raise _fail(where, value, f"expected one of {', '.join(known)}, or a mapping {{name: {{options}}}}")
    if name not in known:
        raise _fail(where, name, unknown_setting(name, list(known), "name"))
    if not isinstance(options, dict):
        raise _fail(f"{where}.{name}", options, "expected a mapping of options")
    return name, options


def check_distribution(key: str, value: Any) -> dict:
    """``{uniform: [lo, hi]}`` and the others, checked; returns it as ``{name: [args]}``."""
    where = f"sample.{key}"
    if not isinstance(value, dict) or len(value) != 1:
        raise _fail(where, value, "expected one distribution, e.g. {loguniform: [0.01, 1.0]}; one of "
                    + ", ".join(DISTRIBUTIONS))
    name, args = next(iter(value.items()))
    if name not in DISTRIBUTIONS:
        raise _fail(where, value, unknown_setting(name, list(DISTRIBUTIONS), "distribution"))
    if name == "choice":
        if not isinstance(args, list) or not args:
            raise _fail(where, value, "choice takes a non-empty list of values")
        return {name: list(args)}
    size = DISTRIBUTIONS[name]
    form = "[lo, hi, q]" if size == 3 else "[lo, hi]"
    if not isinstance(args, list) or len(args) != size or not all(_number(a) for a in args):
        raise _fail(where, value, f"{name} takes {form}, numbers")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise _fail(where, value, f"{name} needs lo < hi (a fixed value belongs in base)")
    if name.startswith(("loguniform", "qloguniform")) and lo <= 0:
        raise _fail(where, value, f"{name} needs lo > 0")
    if name == "randint" and not all(isinstance(a, int) for a in args):
        raise _fail(where, value, "randint takes whole numbers [lo, hi], both included")
    if size == 3 and args[2] <= 0:
        raise _fail(where, value, f"{name} needs a step q > 0")
    return {name: list(args)}


def values_to_check(dist: dict) -> list:
    """Values that stand for everything a distribution can draw, to validate like fixed ones: both
    ends, and a non-whole middle for a continuous one (a whole-number setting must use randint)."""
    name, args = next(iter(dist.items()))
    if name == "choice":
        return list(args)
    if name == "randint":
        return args[:2]
    lo, hi = float(args[0]), float(args[1])
    middle = math.sqrt(lo * hi) if "log" in name else (lo + hi) / 2
    return [lo, hi] if name.startswith("q") else [lo, middle + 1e-9 * (hi - lo), hi]


def check_tune_sections(data: dict, sample_keys: list[str], grid_points: int, evaluates: bool,
                        epochs: int) -> dict:
    """The spec's Tune keys, checked and with their defaults: num_samples, search_alg, metric, mode,
    scheduler, loggers. ``sample_keys``: the sampled settings (already checked); ``epochs``: the
    longest trial's (its search's and its evaluation's), the schedulers' default ``max_t``."""
    num_samples = data.get("num_samples", 1)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise _fail("num_samples", num_samples, "must be an integer >= 1")
    if num_samples > 1 and not sample_keys:
        raise _fail("num_samples", num_samples, "draws the sample: settings again; with no sample: section every "
                    "draw is the same trial (repeat a configuration with a seed axis instead)")
    alg, alg_options = _one_key("search_alg", data.get("search_alg", "random"), SEARCH_ALGS)
    for option, value in alg_options.items():
        if option != "seed":
            raise _fail(f"search_alg.{alg}.{option}", value, unknown_setting(option, ["seed"], "option"))
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(f"search_alg.{alg}.seed", value, "must be an integer")
    if alg != "random":
        if not sample_keys:
            raise _fail("search_alg", alg, "a model-based search algorithm needs a sample: section to search")
        if grid_points > 1:
            raise _fail("search_alg", alg, f"{alg} learns from the trials it proposes, over one grid point; "
                        f"this sweep has {grid_points} (fix the sweep: axes, or use search_alg: random)")
    metric = data.get("metric", "valid_error")
    if metric not in METRICS:
        raise _fail("metric", metric, unknown_setting(metric, list(METRICS), "metric"))
    if metric == "eval_test_error" and not evaluates:
        raise _fail("metric", metric, "needs an evaluate: section (the search reports no test error)")
    mode = data.get("mode", "min")
    if mode not in ("min", "max"):
        raise _fail("mode", mode, "must be min or max")

    scheduler = None
    if data.get("scheduler") is not None:
        name, options = _one_key("scheduler", data["scheduler"], SCHEDULERS)
        scheduler = {"name": name, **_scheduler_options(name, options, sample_keys, num_samples * grid_points,
                                                        epochs)}
        if name == "pbt" and alg != "random":
            raise _fail("scheduler", name, "pbt draws its own population: use it with search_alg: random")
    loggers = _loggers(data.get("loggers"))
    for feature in [alg, *loggers]:
        check_package(feature, "search_alg" if feature == alg else f"loggers.{feature}")
    return {"num_samples": num_samples, "search_alg": {"name": alg, "seed": alg_options.get("seed", 0)},
            "metric": metric, "mode": mode, "scheduler": scheduler, "loggers": loggers}


def _scheduler_options(name: str, options: dict, sample_keys: list[str], population: int, epochs: int) -> dict:
    known = SCHEDULERS[name]
    out = dict(known)
    for key, value in options.items():
        where = f"scheduler.{name}.{key}"
        if key not in known:
            raise _fail(where, value, unknown_setting(key, list(known), "option"))
        if value is None:
            continue   # the default
        if key == "mutate":
            if not isinstance(value, list) or not value:
                raise _fail(where, value, f"a list of sampled settings among {', '.join(MUTABLE_SETTINGS)}")
            for setting in value:
                if setting not in MUTABLE_SETTINGS:
                    raise _fail(where, setting, "pbt continues a search from its checkpoint: only "
                                f"{', '.join(MUTABLE_SETTINGS)} can change mid-search")
                if setting not in sample_keys:
                    raise _fail(where, setting, "a mutated setting needs its range in sample:")
        elif key in ("quantile_fraction", "resample_probability"):
            top = 0.5 if key == "quantile_fraction" else 1.0
            if not _number(value) or not 0 <= value <= top:
                raise _fail(where, value, f"must be a number in [0, {top}]")
        elif key == "synch":
            if not isinstance(value, bool):
                raise _fail(where, value, "must be true (members wait for each other at each step) or false")
        elif key == "reduction_factor":
            if not _number(value) or value <= 1:
                raise _fail(where, value, "must be a number > 1")
        else:
            smallest = 0 if key == "burn_in_period" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
                raise _fail(where, value, f"must be a whole number of epochs >= {smallest}")
        out[key] = value
    if name == "pbt":
        if not out["mutate"]:
            raise _fail(f"scheduler.{name}.mutate", None, "name the sampled settings pbt perturbs, e.g. [arch_lr]")
        if population < 2:
            raise _fail("num_samples", population, "pbt needs a population of at least 2 trials")
    if name == "asha" and out["grace_period"] > (out["max_t"] or epochs):
        limit = f"max_t ({out['max_t']})" if out["max_t"] else f"the epochs of a trial ({epochs})"
        raise _fail("scheduler.asha.grace_period", out["grace_period"],
                    f"must be <= {limit}, or ASHA never compares trials")
    return out


def _loggers(value: Any) -> dict:
    if value is None:
        return {}
    items = {name: {} for name in value} if isinstance(value, list) else value
    if not isinstance(items, dict):
        raise _fail("loggers", value, f"a list or mapping of {', '.join(LOGGERS)}")
    out = {}
    for name, options in items.items():
        if name not in LOGGERS:
            raise _fail("loggers", name, unknown_setting(name, list(LOGGERS), "logger"))
        options = options or {}
        if not isinstance(options, dict):
            raise _fail(f"loggers.{name}", options, "expected a mapping of options")
        for key in options:
            if key not in LOGGERS[name]:
                raise _fail(f"loggers.{name}.{key}", options[key], unknown_setting(key, list(LOGGERS[name]), "option"))
        out[name] = dict(options)
    return out


def check_package(feature: str, key: str) -> None:
    """A clear error, before Ray starts, when an optional feature's package is not installed."""
    if feature not in PACKAGES:
        return
    module, extra = PACKAGES[feature]
    if importlib.util.find_spec(module) is None:
        raise _fail(key, feature, f"needs the {module} package; install it with: pip install -e '.[{extra}]'")


# -- Tune objects (Ray imported here only) -----------------------------------------------------
def tune_domain(dist: dict):
    """A checked distribution as a Tune search-space domain (randint with both ends included)."""
    from ray import tune

    name, args = next(iter(dist.items()))
    if name == "choice":
        return tune.choice(args)
    if name == "randint":
        return tune.randint(args[0], args[1] + 1)
    return getattr(tune, name)(*args)


def tune_search_alg(tuning: dict, max_concurrent: Optional[int] = None):
    """Tune's search algorithm for the spec, seeded: random (Tune's grid and random variant
    generator, which takes the concurrency limit itself), Optuna's TPE or HyperOpt's."""
    alg, seed = tuning["search_alg"]["name"], tuning["search_alg"]["seed"]
    if alg == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent or 0)
    if alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def tune_scheduler(tuning: dict, sample: dict, max_t: int):
    """The scheduler, its time unit the trial's epochs (Tune's training_iteration: one report each)."""
    options = tuning["scheduler"]
    if options is None:
        return None
    from ray.tune import schedulers

    name, time = options["name"], "training_iteration"
    if name == "asha":
        return schedulers.ASHAScheduler(time_attr=time, grace_period=options["grace_period"],
                                        reduction_factor=options["reduction_factor"],
                                        max_t=options["max_t"] or max_t, brackets=options["brackets"])
    if name == "hyperband":
        return schedulers.HyperBandScheduler(time_attr=time, max_t=options["max_t"] or max_t,
                                             reduction_factor=options["reduction_factor"])
    mutations = {"sample": {key: tune_domain(sample[key]) for key in options["mutate"]}}
    return schedulers.PopulationBasedTraining(
        time_attr=time, perturbation_interval=options["perturbation_interval"],
        burn_in_period=options["burn_in_period"], hyperparam_mutations=mutations,
        quantile_fraction=options["quantile_fraction"], resample_probability=options["resample_probability"],
        synch=options["synch"])


def tune_loggers(tuning: dict, experiment_name: str, experiment_dir) -> list:
    """MLflow and Weights & Biases callbacks; offline by default (MLflow in a SQLite file in the
    experiment directory, W&B runs offline under each trial's directory).
    TensorBoard needs no callback: Tune writes its event files whenever tensorboardX is installed."""
    callbacks = []
    options = tuning["loggers"]
    if "mlflow" in options:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        o = options["mlflow"]
        callbacks.append(MLflowLoggerCallback(
            tracking_uri=o.get("tracking_uri", f"sqlite:///{experiment_dir / 'mlflow.db'}"),
            experiment_name=o.get("experiment_name", experiment_name), save_artifact=False))
    if "wandb" in options:
        from ray.air.integrations.wandb import WandbLoggerCallback

        o = options["wandb"]
        # each trial's W&B run is written under the trial's directory
        callbacks.append(WandbLoggerCallback(project=o.get("project", experiment_name), group=o.get("group"),
                                             mode=o.get("mode", "offline")))
    return callbacks


def logger_environment(tuning: dict) -> None:
    """Before Ray starts: W&B offline is told by the environment (Ray checks it, not the callback's
    mode, before asking for an API key), and Ray's workers inherit it."""
    wandb = tuning["loggers"].get("wandb")
    if wandb is not None and wandb.get("mode", "offline") == "offline":
        os.environ.setdefault("WANDB_MODE", "offline")
