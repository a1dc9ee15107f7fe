"""Sweep specs are validated before Ray starts; every bad case names the key."""

from pathlib import Path

import pytest
import yaml

from entrannas.cli import main
from orchestrator.spec import SpecError, spec_from_dict

from conftest import write_cifar

ABLATIONS = Path(__file__).resolve().parents[1] / "ablations"


def spec(**changes):
    data = {"name": "t", "base": {"dataset": "digits", "epochs": 2},
            "sweep": {"lambda_": [0.0, 0.1], "seed": [0, 1]}, "resources": {"cpu": 1}}
    data.update(changes)
    return data


def test_grid_is_the_cartesian_product_and_unions_of_grids_work():
    s = spec_from_dict(spec())
    assert len(s.points()) == 4 and s.swept_keys() == ["lambda_", "seed"]
    s = spec_from_dict(spec(sweep=[{"mode": ["darts", "entrannas"]}, {"mode": "dst", "lambda_": [0.0, 0.5]}]))
    assert s.points() == [{"mode": "darts"}, {"mode": "entrannas"}, {"mode": "dst", "lambda_": 0.0},
                          {"mode": "dst", "lambda_": 0.5}]
    assert s.swept_keys() == ["mode", "lambda_"]


def test_overlapping_blocks_run_each_point_once_and_a_fixed_value_is_not_swept():
    """Blocks are a union: a point two blocks share is one trial (a second would count its seed
    twice in the tables). A bare value, the same in every trial, is not a swept setting."""
    s = spec_from_dict(spec(sweep=[{"mode": "dst", "lambda_": [0.0, 0.5], "seed": 0},
                                   {"mode": "dst", "lambda_": [0.5, 1.0], "seed": 0}]))
    assert s.points() == [{"mode": "dst", "lambda_": lam, "seed": 0} for lam in (0.0, 0.5, 1.0)]
    assert s.swept_keys() == ["lambda_"]


def test_a_trial_holds_the_larger_of_the_search_and_the_evaluation_resources():
    s = spec_from_dict(spec(resources={"cpu": 4, "gpu": 0.5},
                            evaluate={"epochs": 1, "resources": {"cpu": 2, "gpu": 1}}))
    assert s.trial_resources() == {"cpu": 4, "gpu": 1, "workers": 1}
    assert spec_from_dict(spec(resources={"cpu": 3})).trial_resources() == {"cpu": 3, "gpu": 0, "workers": 1}


def test_set_overrides_fix_an_axis_and_evaluate_settings():
    s = spec_from_dict(spec(evaluate={"epochs": 5}), ["seed=3", "evaluate.epochs=1", "epochs=1"])
    assert s.points() == [{"lambda_": 0.0}, {"lambda_": 0.1}]
    assert s.base["seed"] == 3 and s.base["epochs"] == 1 and s.evaluate == {"epochs": 1}
    evaluation = s.eval_config(s.search_config(s.points()[0]))
    assert evaluation.seed == 3 and evaluation.dataset == "digits", "inherited from the search"


def test_every_setting_is_sweepable():
    s = spec_from_dict(spec(sweep={"placement": ["first", "all", [0, 1]], "tau_schedule": ["linear", "cosine"],
                                   "bottleneck_ratio": [1, 2], "feature_sharing": [True, False],
                                   "mode": ["entrannas", "dst"]}))
    assert len(s.points()) == 3 * 2 * 2 * 2 * 2
    assert s.search_config({"placement": [0, 1]}).engine_cells() == {0, 1}


BAD = [
    (spec(colour=1), "colour = 1: unknown spec key; allowed:"),
    (spec(max_failure=1), "max_failure = 1: unknown spec key; did you mean 'max_failures'?"),
    (spec(base={"colour": "red"}), "base.colour = 'red': unknown search setting"),
    (spec(sweep={"lamda": [0.1]}), "sweep.lamda = [0.1]: unknown search setting; did you mean 'lambda_'? allowed:"),
    (spec(sweep={"seed": []}), "sweep.seed = []: empty axis"),
    (spec(sweep={"mode": ["dst", "enas"]}), "mode = 'enas': allowed: darts, entrannas, dst, random (trial mode=enas)"),
    (spec(sweep={"lambda_": [0.1, -1.0]}), "lambda_ = -1.0: must be >= 0 (trial lambda_=-1.0)"),
    (spec(base={"dataset": "digits", "bottleneck_ratio": 3}), "base.bottleneck_ratio = 3: must divide"),
    (spec(sweep={"placement": [[0, 2]]}), "placement = [0, 2]: has no reduction Engine-cell"),
    (spec(resources={"cpu": 1, "tpu": 1}), "resources.tpu = 1: unknown resource"),
    (spec(resources={"cpu": 0}), "resources.cpu = 0: must be > 0"),
    (spec(resources={"gpu": -1}), "resources.gpu = -1: must be a number >= 0"),
    (spec(resources={"gpu": 1.5}), "resources.gpu = 1.5: fractions are allowed below 1 only; above, whole units"),
    (spec(evaluate={"epochs": 2, "resources": {"gpu": 2.5}}), "evaluate.resources.gpu = 2.5: fractions are allowed"),
    (spec(max_failures=-1), "max_failures = -1: must be an integer >= 0"),
    (spec(max_concurrent=0), "max_concurrent = 0: must be an integer >= 1"),
    (spec(name="a b"), "name = 'a b'"),
    (spec(evaluate={"epoch": 3}), "evaluate.epoch = 3: unknown setting; did you mean 'epochs'?"),
    (spec(evaluate={"auxiliary": True}), "evaluate.auxiliary = True"),
]


@pytest.mark.parametrize("data, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_specs_name_the_key(data, message):
    with pytest.raises(SpecError) as e:
        spec_from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize("data, message", BAD[:6] + [
    (spec(resources={"cpu": 9999}), "resources = {'cpu': 9999, 'gpu': 0}: no node can hold one trial"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_sweep_cli_refuses_bad_specs_with_exit_2_before_ray(tmp_path, capsys, no_ray, monkeypatch, data, message):
    if "9999" in message:   # the resource check itself runs before Ray starts
        monkeypatch.undo()
        monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray was started"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["sweep", str(path), "--storage", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_gpu_trials_on_a_machine_without_gpus_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("orchestrator.spec.local_node_resources", lambda: {"CPU": 2, "GPU": 0})
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray was started"))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec(resources={"cpu": 1, "gpu": 0.5})))
    assert main(["sweep", str(path), "--storage", str(tmp_path)]) == 2
    assert "gpu': 0.5}: no node can hold one trial; nodes have {cpu: 2, gpu: 0}" in capsys.readouterr().err


@pytest.mark.parametrize("path", sorted(ABLATIONS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_are_valid_and_say_what_they_answer(path, tmp_path):
    text = path.read_text()
    assert text.lstrip().startswith("#"), "each spec opens with a comment saying what question it answers"
    data = yaml.safe_load(text)
    if data["base"].get("data_dir"):   # CIFAR specs: point data_dir at a small copy in CIFAR's layout
        write_cifar(tmp_path, data["base"]["dataset"])
        data["base"]["data_dir"] = str(tmp_path)
    s = spec_from_dict(data)
    assert s.points()


def test_sweep_name_override_is_checked(tmp_path, capsys, no_ray):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec()))
    assert main(["sweep", str(path), "--name", "../escape", "--storage", str(tmp_path)]) == 2
    assert "--name = '../escape'" in capsys.readouterr().err
