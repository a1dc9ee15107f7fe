"""The Ray Tune trainable (``orchestrator/trial.py``) with Ray's calls replaced: what each epoch
reports, and where a restarted trial continues. The sweeps that run it on Ray are in test_orchestrator."""

import io
import json

import pytest
import torch

from entrannas import search as search_module
from orchestrator import trial

BASE = dict(mode="dst", dataset="digits", epochs=2, layers=3, init_channels=4, batch_size=64,
            subset_fraction=0.25, arch_warmup_epochs=0)
EVALUATE = dict(dataset="digits", epochs=2, layers=3, init_channels=4, subset_fraction=0.2)
TIMES = ("search_seconds", "search_seconds_total", "eval_seconds_total", "peak_memory_mb", "images_per_second")


@pytest.fixture
def reports(monkeypatch):
    """Each report of the trial, as (metrics, the state it checkpoints or None); no checkpoint to restore
    unless a test sets ``restore``."""
    calls = []

    def report(self, metrics, state=None):   # saved at once, as the real one does (the state holds live tensors)
        if state is None:
            calls.append((metrics, None))
            return
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        calls.append((metrics, torch.load(buffer, weights_only=False)))

    monkeypatch.setattr(trial.TuneReports, "report", report)
    monkeypatch.setattr(trial.TuneReports, "restore", lambda self: None)
    threads = torch.get_num_threads()
    yield calls
    torch.set_num_threads(threads)


def restore(monkeypatch, state):
    monkeypatch.setattr(trial.TuneReports, "restore", lambda self: state)


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in TIMES}


def test_a_trial_reports_each_search_epoch_then_each_evaluation_epoch(reports):
    cpus = 1 if torch.get_num_threads() > 1 else 2   # not what the tests run on already
    trial.search_trial({"base": BASE, "point": {"seed": 3}, "evaluate": EVALUATE, "cpus_per_trial": cpus})
    metrics = [m for m, _ in reports]
    assert [(m["stage"], m.get("eval_epoch", m["epoch"]), m["done"], m["finished"]) for m in metrics] == [
        ("search", 0, False, False), ("search", 1, False, False), ("evaluate", 0, False, False),
        ("evaluate", 1, True, True)], "a trial is done after its evaluation, not after its search"
    for m in metrics[:2]:
        assert m["valid_error"] == pytest.approx(1 - m["valid_acc"]) and m["seed"] == 3
        assert m["kept_normal"] == [len(node) for node in json.loads(m["genotype"])["normal"]]
        assert m["threads"] == cpus, "a trial's CPU share sets torch's threads"
    assert metrics[1]["search_seconds_total"] == pytest.approx(metrics[0]["search_seconds"]
                                                               + metrics[1]["search_seconds"])
    for m in metrics[2:]:   # the evaluation trains the search's last genotype
        assert m["genotype"] == metrics[1]["genotype"] and 0 <= m["eval_test_error"] <= 1
        assert m["eval_epochs"] == 2 and m["eval_params_m"] > 0 and m["valid_error"] == metrics[1]["valid_error"]
    assert metrics[3]["eval_seconds_total"] > metrics[2]["eval_seconds_total"] > 0


def test_a_restarted_trial_continues_from_its_last_checkpoint(reports, monkeypatch):
    config = {"base": BASE, "point": {"seed": 3}, "evaluate": EVALUATE}
    trial.search_trial(config)
    whole = [untimed(m) for m, _ in reports]
    (_, after_search), (evaluated_once, after_eval_epoch) = reports[1], reports[2]

    reports.clear()   # restarted after the search's last epoch: the evaluation runs, the search does not
    restore(monkeypatch, after_search)
    trial.search_trial(config)
    assert [untimed(m) for m, _ in reports] == whole[2:]

    reports.clear()   # restarted after the evaluation's first epoch: its second epoch only
    restore(monkeypatch, {**after_eval_epoch, "eval_seconds_total": 1000.0})   # seconds spent before, made plain
    monkeypatch.setattr(search_module.Search, "__init__", lambda *a, **k: pytest.fail("the search ran again"))
    trial.search_trial(config)
    assert [untimed(m) for m, _ in reports] == whole[3:]
    (m, _), = reports
    assert m["eval_seconds_total"] > 1000, "the seconds before the restart count"
    assert m["search_seconds_total"] == evaluated_once["search_seconds_total"]


def test_a_diverging_search_ends_the_trial_as_diverged_without_evaluating(reports):
    trial.search_trial({"base": {**BASE, "mode": "entrannas", "lr": 1e30}, "point": {}, "evaluate": EVALUATE})
    (m, state), = reports
    assert (m["stage"], m["diverged"], m["done"], state) == ("search", True, True, None)
    assert "training loss is nan" in m["error"]


def test_the_sweep_metric_is_left_out_where_it_has_no_value(reports):
    """A random-mode search reports no validation error: its results leave out the sweep's metric
    (schedulers skip them) instead of reporting None, which a scheduler cannot compare."""
    trial.search_trial({"base": {**BASE, "mode": "random"}, "point": {}, "evaluate": None,
                        "metric": "valid_error"})
    (metrics, _), = reports
    assert "valid_error" not in metrics and metrics["finished"] and metrics["derived_valid_error"] is None
    assert trial.for_tune({"done": False, "valid_error": 0.2}, "valid_error") == {
        "done": False, "finished": False, "valid_error": 0.2}

