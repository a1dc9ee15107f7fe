"""Sampled settings, search algorithms, schedulers and loggers in sweep specs (orchestrator/tuning.py)."""

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

import orchestrator.sweep
from entrannas.bilevel import BilevelOptimizer
from entrannas.cli import main
from entrannas.config import SearchConfig
from entrannas.records import trial_status
from entrannas.search import Search
from orchestrator.spec import SpecError, spec_from_dict
from orchestrator.trial import STATE_FILE
from orchestrator.tuning import tune_domain, values_to_check
from results.tables import best_trials, binned

ABLATIONS = Path(__file__).resolve().parent.parent / "ablations"
TINY = ["--set", "layers=3", "--set", "init_channels=4", "--set", "subset_fraction=0.2", "--set", "batch_size=32"]


def spec(**changes):
    data = {"name": "t", "base": {"mode": "dst", "dataset": "digits", "epochs": 4},
            "sample": {"lambda_": {"loguniform": [0.01, 1.0]}}, "num_samples": 3}
    data.update(changes)
    return data


def test_grid_points_times_num_samples_and_the_spec_round_trips():
    s = spec_from_dict(spec(sweep={"seed": [0, 1]}, scheduler="asha"))
    assert (len(s.points()), s.num_samples, s.trial_count()) == (2, 3, 6)
    assert s.tuning["scheduler"] == {"name": "asha", "grace_period": 1, "reduction_factor": 2, "max_t": None,
                                     "brackets": 1}
    assert s.epochs_per_trial() == 4
    assert spec_from_dict(s.to_dict()) == s


def test_a_set_override_fixes_a_sampled_setting():
    s = spec_from_dict(spec(num_samples=1), ["lambda_=0.3"])
    assert s.sample == {} and s.base["lambda_"] == 0.3


def test_yaml_reads_exponents_without_a_dot_as_numbers(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("name: t\nbase: {dataset: digits}\nsample: {arch_lr: {loguniform: [1e-4, 1e-2]}}\n")
    from orchestrator.spec import load_spec

    assert load_spec(path).sample == {"arch_lr": {"loguniform": [1e-4, 1e-2]}}


BAD = [
    (spec(sample={"lambda_": {"uniform": [1.0, 0.1]}}), "sample.lambda_ = {'uniform': [1.0, 0.1]}: uniform needs lo < hi"),
    (spec(sample={"lambda_": {"loguniform": [0.0, 1.0]}}), "sample.lambda_ = {'loguniform': [0.0, 1.0]}: loguniform "
                                                           "needs lo > 0"),
    (spec(sample={"lambda_": {"gaussian": [0, 1]}}), "unknown distribution; allowed: uniform, quniform"),
    (spec(sample={"lambda_": {"quniform": [0, 1]}}), "quniform takes [lo, hi, q], numbers"),
    (spec(sample={"lambda_": {"choice": []}}), "choice takes a non-empty list"),
    (spec(sample={"layers": {"randint": [3, 5.5]}}), "randint takes whole numbers"),
    (spec(sample={"lamda": {"uniform": [0, 1]}}), "sample.lamda = {'uniform': [0, 1]}: unknown search setting; did "
                                                  "you mean 'lambda_'?"),
    (spec(sweep={"lambda_": [0.1]}), "sample.lambda_ = {'loguniform': [0.01, 1.0]}: is a sweep: axis too"),
    # a drawn value is validated like a fixed one: both ends, and a non-whole middle
    (spec(sample={"lambda_": {"uniform": [-1.0, 1.0]}}), "sample.lambda_ = -1.0: must be >= 0 (drawn from "
                                                         "{'uniform': [-1.0, 1.0]})"),
    (spec(sample={"init_channels": {"uniform": [4, 8]}}), "sample.init_channels = 6.000000004"),
    (spec(search_alg="bayes"), "search_alg = 'bayes': unknown name; allowed: random, optuna, hyperopt"),
    (spec(search_alg={"optuna": {"sed": 1}}), "search_alg.optuna.sed = 1: unknown option; did you mean 'seed'?"),
    (spec(search_alg="optuna", sweep={"seed": [0, 1]}), "over one grid point; this sweep has 2"),
    (spec(num_samples=0), "num_samples = 0: must be an integer >= 1"),
    (spec(sample={}, num_samples=2), "num_samples = 2: draws the sample: settings again"),
    (spec(metric="test_error"), "metric = 'test_error': unknown metric; did you mean 'eval_test_error'? allowed:"),
    (spec(metric="eval_test_error"), "needs an evaluate: section"),
    (spec(mode="low"), "mode = 'low': must be min or max"),
    (spec(scheduler="median"), "scheduler = 'median': unknown name; allowed: asha, hyperband, pbt"),
    (spec(scheduler={"asha": {"grace_period": 0}}), "scheduler.asha.grace_period = 0: must be a whole number"),
    (spec(scheduler={"asha": {"grace_period": 5, "max_t": 4}}), "scheduler.asha.grace_period = 5: must be <= max_t"),
    (spec(scheduler={"asha": {"grace_period": 5}}), "grace_period = 5: must be <= the epochs of a trial (4)"),
    (spec(scheduler={"asha": {"reduction_factor": 1}}), "scheduler.asha.reduction_factor = 1: must be a number > 1"),
    (spec(scheduler={"pbt": {"mutate": ["lr"]}}), "scheduler.pbt.mutate = 'lr': pbt continues a search from its "
                                                  "checkpoint: only arch_lr, beta_lr, arch_weight_decay, lambda_"),
    (spec(scheduler={"pbt": {"mutate": ["arch_lr"]}}), "scheduler.pbt.mutate = 'arch_lr': a mutated setting needs "
                                                       "its range in sample:"),
    (spec(scheduler={"pbt": {}}), "name the sampled settings pbt perturbs"),
    (spec(scheduler={"pbt": {"mutate": ["lambda_"], "synch": "yes"}}), "scheduler.pbt.synch = 'yes': must be true"),
    (spec(num_samples=1, scheduler={"pbt": {"mutate": ["lambda_"]}}), "pbt needs a population of at least 2"),
    (spec(loggers=["comet"]), "loggers = 'comet': unknown logger; allowed: tensorboard, mlflow, wandb"),
    (spec(loggers={"mlflow": {"uri": "x"}}), "loggers.mlflow.uri = 'x': unknown option"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m.split(":")[0][:40] for _, m in BAD])
def test_bad_tune_sections_name_the_key(data, message):
    with pytest.raises(SpecError) as e:
        spec_from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize("feature, data", [
    ("optuna", spec(search_alg="optuna")), ("hyperopt", spec(search_alg="hyperopt")),
    ("mlflow", spec(loggers=["mlflow"])), ("wandb", spec(loggers={"wandb": {"project": "p"}})),
    ("tensorboardX", spec(loggers=["tensorboard"]))])
def test_a_missing_package_exits_2_naming_the_key_and_the_extra(tmp_path, capsys, no_ray, monkeypatch, feature, data):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == feature else real(name, *a))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert f"needs the {feature} package; install it with: pip install -e '.[" in err and err.count("\n") == 1, err
    assert ("search_alg" if feature in ("optuna", "hyperopt") else "loggers") in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("data", [BAD[0][0], BAD[1][0], BAD[2][0], BAD[10][0]], ids=["lo>hi", "log0", "dist", "alg"])
def test_bad_distributions_and_algorithms_exit_2_before_ray(tmp_path, capsys, no_ray, data):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.startswith("entrannas-tune: error: s")
    assert not (tmp_path / "runs").exists()


def test_checked_values_cover_both_ends_and_a_non_whole_middle():
    assert values_to_check({"uniform": [0, 1]})[::2] == [0.0, 1.0]
    assert values_to_check({"uniform": [0, 1]})[1] != 0.5 and 0 < values_to_check({"uniform": [0, 1]})[1] < 1
    assert values_to_check({"loguniform": [0.01, 1.0]})[1] == pytest.approx(0.1)
    assert values_to_check({"randint": [2, 5]}) == [2, 5]
    assert values_to_check({"choice": ["a", "b"]}) == ["a", "b"]


def test_randint_includes_both_ends_and_loguniform_stays_in_range():
    import numpy as np

    rng = np.random.default_rng(0)
    draws = {tune_domain({"randint": [1, 2]}).sample(random_state=rng) for _ in range(50)}
    assert draws == {1, 2}
    logs = [tune_domain({"loguniform": [0.01, 1.0]}).sample(random_state=rng) for _ in range(200)]
    assert 0.01 <= min(logs) and max(logs) <= 1.0
    assert sum(x < 0.1 for x in logs) == pytest.approx(100, abs=30)   # half the draws below the geometric middle


def test_a_scheduler_stopped_trial_is_stopped_not_done_or_failed():
    assert trial_status({"done": True, "finished": False}, errored=False) == "stopped"
    assert trial_status({"done": True, "finished": True}, errored=False) == "done"
    assert trial_status({"done": False, "finished": False}, errored=True) == "failed"
    assert trial_status({"done": False, "finished": False}, errored=False) == "running"


def test_a_continued_search_takes_the_new_arch_settings_and_keeps_the_optimizer_state():
    """What pbt relies on: a checkpoint loaded under a config with another arch_lr, beta_lr, arch
    weight decay and lambda_ runs with those, and Adam's moments come from the checkpoint."""
    config = SearchConfig(mode="dst", dataset="digits", layers=3, init_channels=4, subset_fraction=0.1, epochs=2,
                          arch_warmup_epochs=0).resolve()
    search = Search(config)
    search.run_epoch()
    state = search.state_dict()
    changed = config.replace(arch_lr=0.0123, beta_lr=0.5, arch_weight_decay=0.0, lambda_=0.7)
    other = Search(changed)
    other.load_state_dict(state)
    opt = other.optimizer
    assert isinstance(opt, BilevelOptimizer)
    assert [g["lr"] for g in opt.a_optimizer.param_groups] == [0.0123] * len(opt.a_optimizer.param_groups)
    assert all(g["weight_decay"] == 0.0 for g in opt.a_optimizer.param_groups)
    assert [g["lr"] for g in opt.b_optimizer.param_groups] == [0.5]
    assert opt.lambda_ == 0.7 and other.epoch == 1
    before = search.optimizer.a_optimizer.state_dict()["state"]
    after = opt.a_optimizer.state_dict()["state"]
    assert before.keys() == after.keys() and all(
        (before[k]["exp_avg"] == after[k]["exp_avg"]).all() for k in before)


def trials_frame(values, errors, statuses=None):
    return pd.DataFrame({"trial_id": [f"t{i}" for i in range(len(values))], "setting:lambda_": values,
                         "valid_error": errors, "status": statuses or ["done"] * len(values),
                         "search_seconds": [1.0] * len(values)})


def test_binned_tables_hold_about_equal_draws_in_value_order():
    trials = trials_frame([0.5, 0.01, 0.2, 0.02, 0.9, 0.05], [0.5, 0.1, 0.4, 0.2, 0.6, 0.3])
    table = binned(trials, "lambda_")
    assert list(table["lambda_"]) == ["0.01 to 0.02", "0.05 to 0.2", "0.5 to 0.9"]
    assert list(table["valid_error_mean"]) == pytest.approx([0.15, 0.35, 0.55])
    assert list(table["valid_error_n"]) == [2, 2, 2]
    assert binned(trials.head(1), "lambda_") is None


def test_best_trials_are_ranked_by_the_sweep_metric_and_mode():
    trials = trials_frame([0.1, 0.2, 0.3], [0.3, float("nan"), 0.1], ["stopped", "running", "done"])
    best = best_trials(trials, "valid_error", "min", ["lambda_"])
    assert list(best["trial"]) == ["t2", "t0"] and list(best["lambda_"]) == [0.3, 0.1]
    assert list(best_trials(trials, "valid_error", "max", ["lambda_"])["trial"]) == ["t0", "t2"]


# -- on a real Ray ------------------------------------------------------------------------------
def _trials_csv(experiment: Path) -> pd.DataFrame:
    return pd.read_csv(experiment / "report" / "trials.csv")


@pytest.mark.slow
def test_asha_over_six_log_uniform_lambdas_stops_some_trials(tmp_path, capsys):
    """The shipped spec (shrunk): 6 draws of lambda_ in [0.01, 1], 4 epochs, ASHA from epoch 1."""
    assert main(["sweep", str(ABLATIONS / "digits-asha.yaml"), "--storage", str(tmp_path), *TINY]) == 0
    out = capsys.readouterr().out
    trials = _trials_csv(tmp_path / "digits-asha")
    assert len(trials) == 6 and trials["lambda_"].nunique() == 6
    assert trials["lambda_"].between(0.01, 1.0).all()
    assert (trials["status"] == "stopped").sum() >= 1 and set(trials["status"]) <= {"done", "stopped"}
    assert (trials["status"] == "done").sum() >= 1
    stopped = trials[trials["status"] == "stopped"]
    assert (stopped["epochs_done"] < 4).all() and "stopped early:" in out
    index = (tmp_path / "digits-asha" / "report" / "index.md").read_text()
    assert "## Best trials by derived_valid_error" in index and "## By lambda_ (loguniform, binned)" in index
    assert (tmp_path / "digits-asha" / "report" / "plots" / "lambda_sampled.png").is_file()
    # Tune's TensorBoard files (tensorboardX, the tensorboard extra) beside each trial's results
    assert all(list(d.glob("events.out.tfevents.*")) for d in (tmp_path / "digits-asha").iterdir()
               if (d / "params.json").is_file())
    # the ResultGrid, read back from Python
    grid = orchestrator.load_results(tmp_path / "digits-asha")
    assert len(grid) == 6 and not grid.errors
    assert sorted(r.config["sample"]["lambda_"] for r in grid) == sorted(trials["lambda_"])


@pytest.mark.slow
def test_pbt_perturbs_arch_lr_and_continues_from_the_donor_checkpoint(tmp_path):
    # synchronous: every member reaches each step before the worse copies the better, so that a tiny
    # run, whose members finish in seconds, still makes one; two members
    assert main(["sweep", str(ABLATIONS / "digits-pbt.yaml"), "--storage", str(tmp_path), *TINY, "--set", "epochs=3",
                 "--set", "num_samples=2", "--set", "scheduler={pbt: {perturbation_interval: 2, mutate: [arch_lr], "
                 "synch: true, quantile_fraction: 0.5}}"]) == 0
    experiment = tmp_path / "digits-pbt"
    steps = [json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()]
    assert steps, "pbt made no exploit/explore step"
    changed = [s for s in steps if s[4]["sample"]["arch_lr"] != s[5]["sample"]["arch_lr"]]
    assert changed, steps
    # [target tag, donor tag, target iteration, donor iteration, donor config, target's new config]
    target, donor, _, _, _, new = changed[0]

    def rows_of(tag: str) -> tuple[Path, list[dict]]:
        trial_dir = next(d for d in experiment.iterdir() if d.name.endswith(f"_{int(tag.split('_')[0]):05d}"))
        return trial_dir, [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]

    trial_dir, rows = rows_of(target)
    after = [r for r in rows if r["config"]["sample"]["arch_lr"] == new["sample"]["arch_lr"]]
    assert after, "the perturbed trial reported nothing with its new arch_lr"
    first = after[0]
    # it went on from a donor's checkpoint, not from epoch 0: its next epoch follows one the donor
    # checkpointed, and its search time adds this epoch's to the donor's total there. (Read from the
    # donor's checkpoints, which the copy came from: synchronous PBT can pause the donor before Tune
    # logs the result that came with a checkpoint, leaving that row out of its result.json.)
    assert first["epoch"] >= 1 and first["training_iteration"] == first["epoch"] + 1
    donor_states = [torch.load(path, weights_only=False)["last"]
                    for path in rows_of(donor)[0].glob(f"checkpoint_*/{STATE_FILE}")]
    donor_last = next(last for last in donor_states if last["epoch"] == first["epoch"] - 1)
    assert first["search_seconds_total"] == pytest.approx(donor_last["search_seconds_total"] + first["search_seconds"])
    assert math.isclose(yaml.safe_load((trial_dir / "config.yaml").read_text())["search"]["arch_lr"],
                        rows[-1]["config"]["sample"]["arch_lr"])


def quadratic_trial(config: dict) -> None:
    """A stand-in search: 4 epochs whose error falls towards |lambda_ - 0.1|."""
    from ray import tune

    x = config["point"]["lambda_"]
    for epoch in range(4):
        done = epoch == 3
        tune.report({"valid_error": abs(x - 0.1) + 0.05 * (3 - epoch), "epoch": epoch, "done": done,
                     "finished": done})


@pytest.fixture
def by_value():
    import sys

    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])   # Ray workers cannot import tests/
    yield
    ray.shutdown()


@pytest.mark.slow
def test_grid_points_get_num_samples_draws_under_hyperband_and_optuna_and_hyperopt_propose_them(tmp_path, by_value):
    from orchestrator.sweep import run_sweep

    grid = spec_from_dict(spec(name="grid", sweep={"seed": [0, 1]}, scheduler={"hyperband": {"max_t": 4}},
                               resources={"cpu": 0.5}))
    results = run_sweep(grid, tmp_path, out=lambda line: None, trial_fn=quadratic_trial)
    draws = [(r.config["trial"]["point"]["seed"], r.config["sample"]["lambda_"]) for r in results]
    assert len(draws) == 6 and sorted(s for s, _ in draws) == [0, 0, 0, 1, 1, 1]
    assert len({x for _, x in draws}) == 6 and all(0.01 <= x <= 1.0 for _, x in draws)
    assert not results.errors
    names = sorted(d.name for d in (tmp_path / "grid").iterdir() if (d / "params.json").is_file())
    assert all(n.startswith("seed=") and ",lambda_=" in n for n in names), names

    for alg in ("optuna", "hyperopt"):   # Optuna's and HyperOpt's TPE propose the draws
        s = spec_from_dict(spec(name=alg, search_alg={alg: {"seed": 3}}, num_samples=4, max_concurrent=2))
        results = run_sweep(s, tmp_path, out=lambda line: None, trial_fn=quadratic_trial)
        assert len(results) == 4 and not results.errors
        assert len({r.config["sample"]["lambda_"] for r in results}) == 4
        assert yaml.safe_load((tmp_path / alg / "sweep.yaml").read_text())["search_alg"] == {alg: {"seed": 3}}
