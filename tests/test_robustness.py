"""Real studies end to end: paths, errors that cross Ray, exit codes, untrusted files, races, and
values that pass one check and then fail."""

import json
import os
import pickle
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from entrannas.cli import main
from entrannas.config import ConfigError, load_config
from entrannas.rundir import RunDir
from orchestrator.spec import SpecError, load_spec, spec_from_dict
from orchestrator.sweep import ExperimentError, check_dashboard, claim_experiment, trial_dirname

from conftest import write_cifar

ROOT = Path(__file__).resolve().parent.parent
#: tests/test_tuning.py runs the sampling and scheduler examples (shrunk, checking what they show)
SPECS = sorted(p for p in (ROOT / "ablations").glob("*.yaml") if p.name not in ("digits-asha.yaml", "digits-pbt.yaml"))
#: A search run in a few seconds: digits, three steps an epoch.
FAST = ["--set", "layers=3", "--set", "init_channels=4", "--set", "subset_fraction=0.25", "--set", "epochs=2",
        "--set", "arch_warmup_epochs=0"]


def one_line_error(err: str, *parts: str) -> None:
    """``err`` holds one error line and no traceback (progress bars aside)."""
    lines = [line for line in re.split(r"[\r\n]", err) if line.startswith("entrannas-tune")]
    assert len(lines) == 1 and lines[0].startswith("entrannas-tune: error:") and "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], (part, lines[0])


# -- paths --------------------------------------------------------------------------------------
def test_a_relative_data_dir_means_the_users_directory_and_is_saved_absolute(tmp_path, monkeypatch):
    write_cifar(tmp_path / "data", "cifar10")
    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["dataset=cifar10", "data_dir=./data"])
    assert config.data_dir == str(tmp_path / "data")
    spec = spec_from_dict({"name": "s", "base": {"dataset": "cifar10", "data_dir": "./data"}, "sweep": {"seed": [0]},
                           "evaluate": {"epochs": 1, "data_dir": "data"}})
    assert spec.base["data_dir"] == str(tmp_path / "data") and spec.evaluate["data_dir"] == str(tmp_path / "data")
    monkeypatch.chdir("/")   # where a trial runs: the stored path still finds the data
    assert spec.search_config({"seed": 0}).data_dir == str(tmp_path / "data")


def test_a_data_dir_without_the_cifar_folder_is_refused_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", str(ROOT / "ablations" / "methods.yaml"), "--storage", str(tmp_path / "runs")]) == 2
    one_line_error(capsys.readouterr().err, "cifar-10-batches-py")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_cifar_spec_with_a_relative_data_dir_finishes_every_trial(tmp_path, monkeypatch, capsys):
    write_cifar(tmp_path / "data", "cifar10", n_per_batch=8)
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: rel\nbase: {dataset: cifar10, data_dir: ./data, layers: 3, init_channels: 4, epochs: 1, "
                    "batch_size: 16, arch_warmup_epochs: 0}\nsweep: {mode: [entrannas, dst]}\n"
                    "resources: {cpu: 1}\nmax_concurrent: 2\n")
    assert main(["sweep", str(spec), "--storage", "runs", "--no-report"]) == 0
    trials = [json.loads(line) for p in (tmp_path / "runs" / "rel").glob("*/result.json")
              for line in p.read_text().splitlines()[-1:]]
    assert len(trials) == 2 and all(t["done"] for t in trials)


# -- errors cross Ray intact; the sweep's exit status ------------------------------------------------
def test_the_projects_errors_survive_pickling_as_ray_sends_them():
    import ray.cloudpickle

    error = ConfigError("op_streams", 2, "more than 1 needs a CUDA device; this job runs on cpu")
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, ray.cloudpickle.loads)):
        back = loads(dumps(error))
        assert isinstance(back, ConfigError) and str(back) == str(error) and back.field == "op_streams"


@pytest.mark.slow
def test_a_sweep_whose_trials_all_fail_exits_1_and_names_each_cause(tmp_path, capsys):
    """A trial that raises the project's ConfigError (a setting its device cannot run) fails after
    its retries; the summary shows the one-line cause and the sweep exits 1."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: failing\nbase: {dataset: digits, layers: 3, init_channels: 4, epochs: 1, op_streams: 2}\n"
                    "sweep: {seed: [0, 1]}\nresources: {cpu: 1}\nmax_concurrent: 2\nmax_failures: 0\n")
    assert main(["sweep", str(spec), "--storage", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    causes = [line for line in captured.out.splitlines() if "cause:" in line]
    assert len(causes) == 2 and all("op_streams = 2: more than 1 needs a CUDA device" in c for c in causes)
    assert "2 of 2 trials did not finish" in captured.err
    import pandas as pd

    trials = pd.read_csv(tmp_path / "failing" / "report" / "trials.csv")
    assert list(trials["status"]) == ["failed", "failed"]
    assert trials["error"].str.contains("op_streams = 2: more than 1 needs a CUDA device").all()


# -- one experiment per name --------------------------------------------------------------------
def test_of_two_claims_on_one_experiment_exactly_one_wins(tmp_path):
    spec = spec_from_dict({"name": "same", "sweep": {"seed": [0]}})
    outcomes, barrier = [], threading.Barrier(8)

    def claim():
        barrier.wait()
        try:
            claim_experiment(tmp_path / "same", spec)
            outcomes.append("won")
        except ExperimentError as e:
            outcomes.append(str(e))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("won") == 1 and all("already holds a sweep" in o for o in outcomes if o != "won")


@pytest.mark.slow
def test_two_same_name_sweeps_started_together_exit_0_and_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: twin\nbase: {dataset: digits, layers: 3, init_channels: 4, epochs: 1, "
                    "subset_fraction: 0.25}\nsweep: {seed: [0]}\nresources: {cpu: 1}\n")
    cmd = [sys.executable, "-m", "entrannas", "sweep", str(spec), "--storage", str(tmp_path / "runs"), "--no-report"]
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already holds a sweep" in loser
    assert len([p for p in (tmp_path / "runs" / "twin").iterdir() if (p / "params.json").is_file()]) == 1


def test_storage_that_cannot_be_written_is_refused_before_ray(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nbase: {dataset: digits}\nsweep: {seed: [0]}\n")
    assert main(["sweep", str(spec), "--storage", str(blocker / "runs")]) == 2
    one_line_error(capsys.readouterr().err, "--storage: cannot write", str(blocker))


# -- untrusted and damaged files ----------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_crafted_to_run_code_is_refused_without_running_it(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "ran"
    assert main(["search", *FAST, "--set", "epochs=1", "--out", str(out)]) == 0
    torch.save({"version": 2, "epoch": 0, "payload": _RunsCode(marker)}, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["search", *FAST, "--set", "epochs=1", "--out", str(out), "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "checkpoint.pt: cannot be read as a checkpoint")
    assert not marker.exists()


def test_a_truncated_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", *FAST, "--out", str(out)]) == 0
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert main(["search", *FAST, "--out", str(out), "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "checkpoint.pt: cannot be read as a checkpoint")


def test_a_history_cut_mid_line_resumes_from_the_checkpoint_or_refuses_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", *FAST, "--out", str(out)]) == 0
    history = (out / "history.jsonl").read_text()
    # the last record half written: the checkpoint has done both epochs, the history lacks one
    (out / "history.jsonl").write_text(history[: len(history) - 40])
    capsys.readouterr()
    assert main(["search", *FAST, "--out", str(out), "--resume"]) == 2
    one_line_error(capsys.readouterr().err, "history.jsonl holds epochs [0]", "cannot be resumed")
    # a partial record past the checkpoint (a crash while appending it) is dropped, and the run goes on
    run = RunDir(out)
    (out / "history.jsonl").write_text(history.splitlines()[0] + "\n" + history.splitlines()[1][:30])
    assert [r["epoch"] for r in run.history()] == [0]
    run.truncate_history(1)
    assert [r["epoch"] for r in run.history()] == [0]


def test_a_history_record_is_added_whole_or_not_at_all(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.append_history({"epoch": 0})
    import entrannas.rundir as rundir

    def crash(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(rundir, "write_text_atomic", crash)
    with pytest.raises(OSError):
        run.append_history({"epoch": 1})
    assert (tmp_path / "history.jsonl").read_text() == '{"epoch": 0}\n'


def test_a_full_disk_while_checkpointing_is_one_line_exit_1_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["search", *FAST, "--set", "epochs=1", "--out", str(out)]) == 0
    before = (out / "checkpoint.pt").read_bytes()
    import entrannas.runtime as runtime

    def full(obj, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:642] . basic_ios::clear: iostream error")

    monkeypatch.setattr(runtime.torch, "save", full)
    capsys.readouterr()
    assert main(["search", *FAST, "--set", "epochs=2", "--out", str(tmp_path / "second")]) == 1
    one_line_error(capsys.readouterr().err, "cannot write", "checkpoint.pt.tmp", "iostream error")
    assert (out / "checkpoint.pt").read_bytes() == before and not (tmp_path / "second" / "checkpoint.pt").exists()


# -- bad input: one line, exit 2, before any work or directory ---------------------------------------
def test_report_out_that_is_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    assert main(["search", "--set", "mode=random", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["report", str(run), "--out", str(target)]) == 2
    one_line_error(capsys.readouterr().err, "--out", "exists and is not a directory")
    assert target.read_text() == "keep me"


def test_a_300_character_name_exits_2(tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: s\nbase: {dataset: digits}\nsweep: {seed: [0]}\n")
    assert main(["sweep", str(spec), "--name", "n" * 300, "--storage", str(tmp_path / "runs")]) == 2
    one_line_error(capsys.readouterr().err, "--name", "at most 100")
    assert not (tmp_path / "runs").exists()


def test_a_subset_too_small_for_the_split_exits_2_before_any_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["search", "--set", "subset_fraction=0.0001", "--out", str(out)]) == 2
    one_line_error(capsys.readouterr().err, "subset_fraction = 0.0001", "at least 10")
    assert not out.exists()


def test_yaml_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nbase: {dataset: digits\nsweep: {seed: [0]}\n")
    with pytest.raises(SpecError, match=r"bad\.yaml:3:\d+: not valid YAML"):
        load_spec(bad)
    with pytest.raises(ConfigError, match=r"bad\.yaml:3:\d+: not valid YAML"):
        load_config(bad)


# -- specs shrink fully from the command line ------------------------------------------------------
def test_resources_and_concurrency_can_be_set_from_the_command_line_and_two_gpus_are_refused(tmp_path):
    write_cifar(tmp_path, "cifar10")
    methods = ROOT / "ablations" / "methods.yaml"
    spec = load_spec(methods, ["resources.gpu=0", "resources.cpu=1", "max_concurrent=1", "evaluate.resources.gpu=0",
                               f"data_dir={tmp_path}"])
    assert (spec.resources, spec.max_concurrent, spec.evaluate["resources"]["gpu"]) == (
        {"cpu": 1, "gpu": 0, "workers": 1}, 1, 0)
    with pytest.raises(SpecError, match=r"resources.gpu = 2: a process runs on one device.*set workers"):
        spec_from_dict({"name": "s", "sweep": {"seed": [0]}, "resources": {"gpu": 2}})


def test_a_dashboard_without_its_packages_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.dashboard.optional_deps", None)   # import fails
    with pytest.raises(ExperimentError, match=r"ray\[default\].*pip install -e '\.\[dashboard\]'"):
        check_dashboard(True)
    check_dashboard(False)


def test_trial_folders_are_named_by_their_settings():
    trial = SimpleNamespace(trial_id="a1b2_00003",
                            config={"trial": {"point": {"mode": "dst", "lambda_": 0.1, "placement": [0, 2]}}})
    name = trial_dirname(trial)
    assert name == "mode=dst,lambda_=0.1,placement=0-2_a1b2_00003"
    assert all(c.isalnum() or c in "_.,=-" for c in name)


def test_the_report_counts_each_distinct_genotype_once_and_on_the_meta_device(monkeypatch):
    from entrannas import evalnet
    from entrannas.zoo import ZOO
    from results.collect import standard_cost

    devices = []
    forward = evalnet.NetworkCIFAR.forward

    def noting(self, x):
        devices.append(x.device.type)
        return forward(self, x)

    monkeypatch.setattr(evalnet.NetworkCIFAR, "forward", noting)
    standard_cost.cache_clear()
    text = json.dumps(ZOO["DARTS_V1"].to_dict())
    first = standard_cost(text, "cifar10")
    assert standard_cost(text, "cifar10") == first and devices == ["meta"]
    assert first[0] > 2 and first[1] > 400


# -- every shipped spec runs ---------------------------------------------------------------------------
#: Shrinks any shipped spec to a smoke run: tiny nets, one epoch, one seed, no GPU.
SMOKE = ["seed=0", "epochs=1", "arch_warmup_epochs=0", "layers=3", "init_channels=8", "batch_size=16",
         "resources.gpu=0", "resources.cpu=1", "max_concurrent=2", "evaluate.epochs=1", "evaluate.layers=3",
         "evaluate.init_channels=4", "evaluate.batch_size=16", "evaluate.auxiliary=false",
         "evaluate.resources.gpu=0", "evaluate.resources.cpu=1"]


@pytest.mark.slow
@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_every_shipped_spec_runs_shrunk_on_a_small_cifar_copy(path, tmp_path):
    write_cifar(tmp_path / "data", "cifar10", n_per_batch=8)
    text = path.read_text()
    shrink = [s for s in SMOKE if "evaluate:" in text or not s.startswith("evaluate.")]
    shrink.append(f"data_dir={tmp_path / 'data'}")
    if "placement:" in text:
        shrink.append("layers=6")    # its explicit placement names cell 5
    if "settle_epochs:" in text:
        shrink.append("epochs=3")    # it sweeps settle_epochs up to 2
    if "num_samples:" in text:
        shrink.append("num_samples=2")
    if "asha:" in text:
        shrink.append("scheduler=asha")   # its grace period from epoch 1
    if "digits" in text:             # a tenth of the images, as many steps as the CIFAR copy's
        shrink += ["subset_fraction=0.1"] + (["evaluate.subset_fraction=0.1"] if "evaluate:" in text else [])
    args = ["sweep", str(path), "--storage", str(tmp_path / "runs"), "--no-report"]
    for item in shrink:
        args += ["--set", item]
    assert main(args) == 0


def test_what_a_search_and_a_trial_checkpoint_loads_weights_only(tmp_path):
    """A search's state and a trial's (the search's, and its last metrics, which name where it ran)
    hold tensors and plain data only, so that a weights-only load reads them back."""
    from entrannas.records import trial_metrics
    from entrannas.runtime import load_checkpoint, save_atomic
    from entrannas.search import Search

    from conftest import tiny_config

    search = Search(tiny_config(dataset="digits", subset_fraction=0.1, epochs=2, arch_warmup_epochs=0))
    record = search.run_epoch()
    state = {"stage": "search", "search": search.state_dict(), "last": trial_metrics(record)}
    save_atomic(state, tmp_path / "trial.pt")
    back = load_checkpoint(tmp_path / "trial.pt")
    assert back["last"] == state["last"] and back["search"]["epoch"] == 1
