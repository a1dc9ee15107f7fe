"""The Ray Tune trainable: a thin adapter over the library's search (and evaluation) generators.

Flat Tune config in (``base``, ``point``, ``evaluate``), one ``tune.report(metrics, checkpoint)``
per epoch out. A trial restarted by Tune continues from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import torch
from ray import tune

from entrannas.config import EvalConfig, SearchConfig
from entrannas.runtime import WHERE_IT_RAN, load_checkpoint
from entrannas.search import SearchDiverged, search_job
from entrannas.train import Evaluation, TrainingDiverged

STATE_FILE = "trial.pt"


def search_metrics(record: dict) -> dict:
    """A search epoch record as flat Tune metrics (the genotype as a JSON string). A random-mode
    record has no losses: those metrics are None."""
    thresholds = record.get("thresholds") or {}
    valid_acc = record.get("valid_acc")
    return {
        "stage": "search",
        "epoch": record["epoch"],
        "seed": record["seed"],
        **{key: record.get(key) for key in ("tau", "train_loss", "train_acc", "valid_loss", "valid_acc",
                                            "derived_valid_acc", "supernet_gap", "genotype_stability")},
        "valid_error": None if valid_acc is None else 1.0 - valid_acc,
        "genotype": json.dumps(record["genotype"]),
        "kept_normal": record["kept_connections"]["normal"],
        "kept_reduce": record["kept_connections"]["reduce"],
        "thresholds_normal": thresholds.get("normal"),
        "thresholds_reduce": thresholds.get("reduce"),
        "search_seconds": record["seconds"],
        "peak_memory_mb": record.get("peak_memory_mb"),
        **{key: record.get(key) for key in WHERE_IT_RAN},
    }


def _report(metrics: dict, state: dict) -> None:
    import ray

    metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, Path(tmp) / STATE_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _restore() -> Optional[dict]:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / STATE_FILE, torch.device("cpu"))


def search_trial(config: dict) -> None:
    """Search with ``base`` + ``point`` settings; then, if ``evaluate`` is set, train the final
    genotype from scratch and report its test error into the same trial."""
    search_config = SearchConfig.from_dict({**config["base"], **config["point"]}).resolve()
    eval_config = (EvalConfig.from_dict(config["evaluate"]).resolve()
                   if config.get("evaluate") is not None else None)
    cpus = config.get("cpus_per_trial")
    if cpus:
        torch.set_num_threads(max(1, int(cpus)))
    state = _restore()
    search_seconds = 0.0
    last: dict = {}
    if state is None or state["stage"] == "search":
        search = search_job(search_config)
        if state is not None:
            search.load_state_dict(state["search"])
            last, search_seconds = state["last"], state["search_seconds_total"]
        try:
            for record in search.run():
                search_seconds += record["seconds"]
                last = {**search_metrics(record), "search_seconds_total": search_seconds,
                        "search_epochs": search_config.epochs}
                _report({**last, "done": eval_config is None and search.epoch == search_config.epochs},
                        {"stage": "search", "search": search.state_dict(), "last": last,
                         "search_seconds_total": search_seconds})
        except SearchDiverged as e:
            tune.report({**last, "stage": "search", "diverged": True, "error": str(e), "done": True})
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
    evaluation = Evaluation(genotype, eval_config)
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
            _report(metrics, {"stage": "evaluate", "evaluation": evaluation.state_dict(), "last": last,
                              "eval_seconds_total": eval_seconds})
    except TrainingDiverged as e:
        tune.report({**last, "stage": "evaluate", "diverged": True, "error": str(e), "done": True})
