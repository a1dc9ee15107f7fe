"""The Ray Tune trainable: a thin adapter over the library's search (and evaluation) generators.

Flat Tune config in (``base``, ``point``, ``evaluate``), one ``tune.report(metrics, checkpoint)``
per epoch out. A trial restarted by Tune continues from its last epoch checkpoint. A data-parallel
trial runs the same function on each of its Ray Train workers (``orchestrator.parallel``), which
report through Ray Train instead.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import torch
import yaml
from ray import tune

from entrannas.config import EvalConfig, SearchConfig
from entrannas.records import trial_metrics
from entrannas.rundir import write_text_atomic
from entrannas.runtime import load_checkpoint
from entrannas.search import SearchDiverged, search_job
from entrannas.train import Evaluation, TrainingDiverged

STATE_FILE = "trial.pt"
CONFIG_FILE = "config.yaml"   # the trial's resolved settings, in its directory


def for_tune(metrics: dict, metric: Optional[str]) -> dict:
    """An epoch's metrics as the trial reports them: ``finished`` (the trial's own word that this is
    its last epoch; Tune's ``done`` is also set on a trial a scheduler stops), and ``metric``, the
    sweep's objective, left out where it has no value (a random-mode search, an evaluation not run
    yet), so that schedulers and search algorithms skip the result."""
    out = {**metrics, "finished": metrics["done"]}
    if metric and out.get(metric) is None:
        out.pop(metric, None)
    return out


class TuneReports:
    """How a one-process trial reports its epochs and finds its checkpoint: through Tune."""

    def report(self, metrics: dict, state: Optional[dict] = None) -> None:
        """One epoch's metrics and, unless None, its checkpoint."""
        import ray

        metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
        if state is None:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))

    def restore(self) -> Optional[dict]:
        return read_state(tune.get_checkpoint())


def read_state(checkpoint) -> Optional[dict]:
    """The trial state in a Tune or Ray Train checkpoint (None for none)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / STATE_FILE, torch.device("cpu"))


def trial_configs(config: dict) -> tuple[SearchConfig, Optional[EvalConfig]]:
    """The trial's resolved search and evaluation settings."""
    search_config = SearchConfig.from_dict({**config["base"], **config["point"]}).resolve()
    eval_config = (EvalConfig.from_dict(config["evaluate"]).resolve()
                   if config.get("evaluate") is not None else None)
    return search_config, eval_config


def save_config(search_config: SearchConfig, eval_config: Optional[EvalConfig]) -> None:
    """The trial's resolved settings beside its results (``config.yaml`` in its directory), so that a
    report reads what ran instead of stating the defaults again."""
    resolved = {"search": search_config.to_dict(), "evaluate": eval_config.to_dict() if eval_config else None}
    with warnings.catch_warnings():   # outside a Tuner (a test calling the trial) there is no directory
        warnings.simplefilter("ignore")
        trial_dir = tune.get_context().get_trial_dir()
    if trial_dir:
        write_text_atomic(Path(trial_dir) / CONFIG_FILE, yaml.safe_dump(resolved, sort_keys=False))


def search_trial(config: dict, reports=None, shard=None, device=None) -> None:
    """Search with ``base`` + ``point`` settings; then, if ``evaluate`` is set, train the final
    genotype from scratch and report its test error into the same trial. ``reports`` (default
    ``TuneReports``), ``shard`` and ``device``: a data-parallel trial's worker passes its own."""
    search_config, eval_config = trial_configs(config)
    metric = config.get("metric")
    cpus = config.get("cpus_per_trial")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    if reports is None:
        reports = TuneReports()
        save_config(search_config, eval_config)
    state = reports.restore()
    search_seconds = 0.0
    last: dict = {}
    if state is None or state["stage"] == "search":
        search = search_job(search_config, device, shard)
        if state is not None:
            search.load_state_dict(state["search"])
            last, search_seconds = state["last"], state["search_seconds_total"]
        try:
            for record in search.run():
                search_seconds += record["seconds"]
                last = {**trial_metrics(record), "search_seconds_total": search_seconds,
                        "search_epochs": search_config.epochs}
                reports.report(for_tune({**last, "done": eval_config is None and search.epoch == search_config.epochs},
                                        metric),
                               {"stage": "search", "search": search.state_dict(), "last": last,
                         "search_seconds_total": search_seconds})
        except SearchDiverged as e:
            reports.report(for_tune({**last, "stage": "search", "diverged": True, "error": str(e), "done": True},
                                    metric))
            return
        genotype = search.genotype()
        del search
    else:
        last = state["last"]
        genotype = None
    if eval_config is None:
        return

    from entrannas.genotype import Genotype

    genotype = genotype or Genotype.from_dict(json.loads(last["genotype"]))
    evaluation = Evaluation(genotype, eval_config, device, shard)
    eval_seconds = 0.0
    if state is not None and state["stage"] == "evaluate":
        evaluation.load_state_dict(state["evaluation"])
        eval_seconds = state["eval_seconds_total"]
    cost = evaluation.cost()
    try:
        for record in evaluation.run():
            eval_seconds += record["seconds"]
            metrics = {**last, "stage": "evaluate", "eval_epoch": record["epoch"],
                       "eval_epochs": eval_config.epochs,
                       "eval_train_loss": record["train_loss"], "eval_test_loss": record["test_loss"],
                       "eval_test_error": record["test_error"], "eval_seconds_total": eval_seconds,
                       "eval_params_m": cost["params_m"], "eval_multiply_adds_m": cost["multiply_adds_m"],
                       "done": evaluation.epoch == eval_config.epochs}
            reports.report(for_tune(metrics, metric), {"stage": "evaluate", "evaluation": evaluation.state_dict(),
                                                "last": last, "eval_seconds_total": eval_seconds})
    except TrainingDiverged as e:
        reports.report(for_tune({**last, "stage": "evaluate", "diverged": True, "error": str(e), "done": True},
                                metric))
