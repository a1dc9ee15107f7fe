"""Run and resume sweeps: spec -> Ray Tune trials, on a local Ray or an existing cluster."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

import yaml

from entrannas.config import read_yaml
from entrannas.records import trial_settings

from .spec import SpecError, SweepSpec, check_resources_fit, local_node_resources, spec_from_dict, trials_at_once
from .tuning import logger_environment, tune_domain, tune_loggers, tune_scheduler, tune_search_alg

SPEC_FILE = "sweep.yaml"


class ExperimentError(ValueError):
    """An experiment directory that cannot be used as asked."""


def ray_environment(address: Optional[str]) -> Optional[str]:
    """Settings Ray reads when it is imported: call before the first ``import ray``.

    Ray 2.60 authenticates with a token; every process of a cluster must agree, so the mode is set
    explicitly (a user's own RAY_AUTH_MODE is kept, to match their cluster). Returns the address."""
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    # Tune warns each time num_to_keep forces a state snapshot; with per-epoch checkpoints that is
    # most epochs, and the snapshot is cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Our own progress lines replace Tune's tables (the legacy output honours verbose=0).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # An evaluation's test error appears only once it evaluates, and a random-mode trial has no
    # validation error: results without the sweep's metric are fine (schedulers skip them).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Ray replaces builtins.print in a driver that is sent a worker's error (its tqdm support): the
    # sweep's progress lines print as they are, and Tune pickles the callback that prints them.
    os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")
    if address is None:
        # A local Ray listens on loopback only (Ray's single-machine mode, as on macOS).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return address


def check_dashboard(dashboard: bool) -> None:
    """``--dashboard`` needs the packages of ``ray[default]``; say so before anything starts."""
    if not dashboard:
        return
    try:
        import ray.dashboard.optional_deps  # noqa: F401
    except ImportError as e:
        raise ExperimentError(f"--dashboard: Ray's dashboard needs ray[default] ({e.name or e} is missing); "
                              "install it with: pip install -e '.[dashboard]'") from None


def start_ray(spec: SweepSpec, address: Optional[str], dashboard: bool = False) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``), or start a local Ray; check that a trial fits a node."""
    address = ray_environment(address)
    logger_environment(spec.tuning)
    if address is None:
        check_resources_fit(spec, [local_node_resources()])   # before anything starts
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # "local": a new Ray of our own. With no address, ray.init would join the last cluster that
    # `ray start` (or a test's ray.cluster_utils) started on this machine, and wait on it if it is dead.
    ray.init(address=address or "local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
             logging_level="WARNING", log_to_driver=False, configure_logging=True)
    check_resources_fit(spec, alive_nodes())


def alive_nodes() -> list[dict]:
    """The resources of each live node of the Ray this process joined."""
    import ray

    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def param_space(spec: SweepSpec) -> dict:
    """One grid axis over whole trial settings, so that unions of grids stay exact, and the sampled
    settings as Tune domains (drawn per trial, num_samples times per grid point)."""
    from ray import tune

    trials = []
    for point in spec.points():
        search = spec.search_config(point)
        evaluation = spec.eval_config(search)
        trials.append({"point": point, "evaluate": evaluation.to_dict() if evaluation else None})
    # a model-based search algorithm takes no grid (the spec allows it one point)
    trial = tune.grid_search(trials) if len(trials) > 1 else trials[0]
    return {"base": spec.base, "trial": trial, "sample": {k: tune_domain(d) for k, d in spec.sample.items()},
            "cpus_per_trial": spec.trial_resources()["cpu"], "metric": spec.tuning["metric"]}


def _trainable(spec: SweepSpec, trial_fn: Optional[Callable[[dict], None]] = None,
               experiment: Optional[Path] = None):
    """The Tune trainable: the trial function on the trial's resources, or, for ``workers`` > 1, the
    driver of a data-parallel trial (``orchestrator.parallel``), whose workers hold the resources and
    keep their checkpoints in the trial's directory under ``experiment``."""
    from ray import tune

    from .parallel import DRIVER_RESOURCES, data_parallel_trial
    from .trial import search_trial

    res = spec.trial_resources()
    trial_fn = trial_fn or (data_parallel_trial if res["workers"] > 1 else search_trial)

    def trainable(config: dict) -> None:
        trial_fn({"base": config["base"], "point": trial_settings(config),
                  "evaluate": config["trial"]["evaluate"], "cpus_per_trial": config["cpus_per_trial"],
                  "metric": config.get("metric"), "workers": res["workers"], "gpus_per_worker": res["gpu"],
                  "max_failures": spec.max_failures, "experiment": experiment and str(experiment)})

    if res["workers"] > 1:
        return tune.with_resources(trainable, DRIVER_RESOURCES)
    return tune.with_resources(trainable, {"cpu": res["cpu"], "gpu": res["gpu"]})


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _trial_label(trial) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in trial_settings(trial.config).items()) or trial.trial_id


def _stopped_early(trial) -> bool:
    """An ended trial's last result says it had not finished: a scheduler stopped it."""
    return (trial.last_result or {}).get("finished") is False


def progress_callback(spec: SweepSpec, out: Callable[[str], None] = print, every: float = 10.0):
    """A Tune callback printing a status line: trials running/done/stopped/failed and the best value
    so far of the sweep's metric."""
    from ray import tune

    metric, sign = spec.tuning["metric"], (1 if spec.tuning["mode"] == "min" else -1)

    class Progress(tune.Callback):
        def __init__(self):
            self.start, self.last_print = time.monotonic(), 0.0
            self.best: Optional[tuple[float, str]] = None   # the sweep metric's best (value, trial label)
            self.total = spec.trial_count()

        def _line(self, trials, event: str = "", ending=None, ending_as: str = "") -> None:
            # the trial that just ended still shows its old status inside these hooks
            states = [ending_as if t is ending else t.status for t in trials]
            stopped = sum(s == "TERMINATED" and _stopped_early(t) for t, s in zip(trials, states))
            done = sum(s == "TERMINATED" for s in states) - stopped
            failed = sum(s == "ERROR" for s in states)
            running = sum(s == "RUNNING" for s in states)
            best = ""
            if self.best is not None:
                value, label = self.best
                best = f" | best {metric} {value:.4f} ({label})"
            out(f"[{time.monotonic() - self.start:6.0f}s] {done}/{self.total} done, {running} running, "
                + (f"{stopped} stopped, " if stopped else "") + f"{failed} failed{best}{event}")
            self.last_print = time.monotonic()

        def on_trial_result(self, iteration, trials, trial, result, **info):
            value = result.get(metric)
            if value is not None and (self.best is None or sign * value < sign * self.best[0]):
                self.best = (value, _trial_label(trial))
            if time.monotonic() - self.last_print > every:
                self._line(trials)

        def on_trial_complete(self, iteration, trials, trial, **info):
            how = "stopped early" if _stopped_early(trial) else "finished"
            self._line(trials, f" | {how}: {_trial_label(trial)}", trial, "TERMINATED")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, f" | FAILED: {_trial_label(trial)}", trial, "ERROR")

    return Progress()


def pbt_checkpoints(spec: SweepSpec) -> int:
    """Checkpoints kept per trial under pbt (0: no pbt): enough that a donor's checkpoint outlives
    the perturbation interval that may copy it."""
    scheduler = spec.tuning["scheduler"]
    return 0 if not scheduler or scheduler["name"] != "pbt" else 2 * scheduler["perturbation_interval"] + 2


def _run_config(spec: SweepSpec, storage: Path, callbacks: list):
    from ray import tune

    callbacks = [*callbacks, *tune_loggers(spec.tuning, spec.name, storage / spec.name)]
    return tune.RunConfig(
        name=spec.name, storage_path=str(storage),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures, fail_fast=False),
        # pbt copies a member's checkpoint to another after it is reported: keep a few more
        checkpoint_config=tune.CheckpointConfig(num_to_keep=pbt_checkpoints(spec) or 2),
        callbacks=callbacks, verbose=0)


def run_sweep(spec: SweepSpec, storage: os.PathLike = "runs", address: Optional[str] = None,
              dashboard: bool = False, out: Callable[[str], None] = print,
              trial_fn: Optional[Callable[[dict], None]] = None):
    """Run every trial of ``spec`` under ``storage/spec.name``; returns Tune's ResultGrid.

    ``trial_fn`` replaces the trial function (default ``orchestrator.trial.search_trial``)."""
    address = ray_environment(address)
    from ray import tune

    check_dashboard(dashboard)
    if address is None:
        check_resources_fit(spec, [local_node_resources()])   # before anything is written
    storage = Path(storage).expanduser().resolve()
    experiment = storage / spec.name
    claim_experiment(experiment, spec)
    try:
        start_ray(spec, address, dashboard)
    except BaseException:
        (experiment / SPEC_FILE).unlink()   # nothing ran: give the name back
        if not any(experiment.iterdir()):
            experiment.rmdir()
        raise
    out(f"sweep {spec.name}: {spec.trial_count()} trials, {spec.trial_resources()} each, into {experiment}")
    tuning = spec.tuning
    concurrent = spec.max_concurrent
    fit = trials_at_once(spec, alive_nodes())   # data-parallel trials: Tune does not see their workers
    if fit is not None:
        concurrent = min(concurrent or fit, fit)
    tuner = tune.Tuner(
        _trainable(spec, trial_fn, experiment), param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=tuning["metric"], mode=tuning["mode"], num_samples=tuning["num_samples"],
            search_alg=tune_search_alg(tuning, concurrent),
            max_concurrent_trials=None if tuning["search_alg"]["name"] == "random" else concurrent,
            scheduler=tune_scheduler(tuning, spec.sample, spec.epochs_per_trial()),
            trial_dirname_creator=trial_dirname, trial_name_creator=lambda t: t.trial_id),
        run_config=_run_config(spec, storage, [progress_callback(spec, out)]))
    return tuner.fit()


def claim_experiment(experiment: Path, spec: SweepSpec) -> None:
    """Create ``experiment`` and write its ``sweep.yaml`` in one exclusive step, before Ray starts:
    of two sweeps started with the same storage and name, exactly one gets it. Storage that cannot
    be written is found here too."""
    try:
        experiment.mkdir(parents=True, exist_ok=True)
        with open(experiment / SPEC_FILE, "x") as fh:
            fh.write(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    except FileExistsError:
        raise ExperimentError(f"--storage/--name: {experiment} already holds a sweep; continue it with "
                              f"'entrannas-tune resume {experiment}' or choose another --name") from None
    except OSError as e:
        raise ExperimentError(f"--storage: cannot write {e.filename or experiment}: {e.strerror or e}") from None


def trial_dirname(trial) -> str:
    """A trial's directory: its swept and sampled settings, short and safe for a file name, then its id."""
    point = trial_settings(trial.config)
    text = ",".join(f"{k}={'-'.join(map(str, v)) if isinstance(v, (list, tuple)) else _show(v)}"
                    for k, v in point.items())
    text = re.sub(r"[^A-Za-z0-9_.,=-]+", "_", text)[:80]
    return f"{text}_{trial.trial_id}" if text else trial.trial_id


def load_experiment_spec(experiment: os.PathLike) -> SweepSpec:
    path = Path(experiment) / SPEC_FILE
    if not path.is_file():
        raise ExperimentError(f"{experiment}: not a sweep experiment directory (no {SPEC_FILE})")
    try:
        return spec_from_dict(read_yaml(path.read_text()))
    except SpecError as e:
        raise ExperimentError(f"{path}: {e}") from None


def resume_sweep(experiment: os.PathLike, address: Optional[str] = None, dashboard: bool = False,
                 out: Callable[[str], None] = print, trial_fn: Optional[Callable[[dict], None]] = None):
    """Continue an interrupted sweep: finished trials stay, errored and unfinished ones continue
    from their last checkpoint."""
    address = ray_environment(address)
    from ray import tune

    check_dashboard(dashboard)
    experiment = Path(experiment).expanduser().resolve()
    spec = load_experiment_spec(experiment)
    _check_restorable(experiment)
    start_ray(spec, address, dashboard)
    out(f"resuming sweep {spec.name} in {experiment}")
    tuner = tune.Tuner.restore(str(experiment), trainable=_trainable(spec, trial_fn, experiment),
                               resume_unfinished=True,
                               resume_errored=True, restart_errored=False)
    # Tune restores the first run's RunConfig; give it a fresh progress line (clock, counts). Ray has
    # no public setter for this, so an unknown Tuner layout just keeps the restored callback.
    try:
        tuner._local_tuner._run_config.callbacks = [progress_callback(spec, out)]
    except AttributeError:
        pass
    return tuner.fit()


def load_results(experiment: os.PathLike):
    """The Ray Tune ``ResultGrid`` of a sweep experiment directory (finished or not), read from its
    files without running anything: ``load_results("runs/lambda").get_dataframe()``."""
    ray_environment(None)
    from ray import tune

    experiment = Path(experiment).expanduser().resolve()
    spec = load_experiment_spec(experiment)
    _check_restorable(experiment)
    return tune.Tuner.restore(str(experiment), trainable=_trainable(spec)).get_results()


def _check_restorable(experiment: Path) -> None:
    from ray import tune

    if not tune.Tuner.can_restore(str(experiment)):
        raise ExperimentError(f"{experiment}: Tune has no experiment state to restore here")


def failure_cause(result) -> Optional[str]:
    """A failed or diverged trial's cause in one line: the last line of its exception (the project's
    own errors cross from the trial intact), or the divergence message."""
    metrics = result.metrics or {}
    if metrics.get("error"):
        return str(metrics["error"])
    if result.error is None:
        return None
    lines = [line.strip() for line in str(result.error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(result.error).__name__


def summarize(results, out: Callable[[str], None] = print) -> list[str]:
    """A line per trial (status, error, settings, and the cause of a failure); returns the statuses."""
    from entrannas.records import trial_status

    statuses = []
    for result in results:
        metrics = result.metrics or {}
        status = trial_status(metrics, errored=result.error is not None)
        statuses.append(status)
        err = metrics.get("eval_test_error", metrics.get("valid_error"))
        err_text = f"{err:.4f}" if isinstance(err, float) else "-"
        point = trial_settings(result.config or {})
        cause = failure_cause(result) if status in ("failed", "diverged") else None
        out(f"  {status:<8} error {err_text:<7} " + ", ".join(f"{k}={_show(v)}" for k, v in point.items())
            + (f"\n           cause: {cause}" if cause else ""))
    return statuses

