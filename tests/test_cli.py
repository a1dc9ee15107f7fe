import json
import subprocess
import sys

import pytest
import yaml

import entrannas.search
import entrannas.train
from entrannas.cli import main
from entrannas.config import ConfigError, SearchConfig, load_config, read_yaml
from entrannas.rundir import RunDir, RunDirError

from conftest import untimed

FAST = ["--set", "layers=3", "--set", "init_channels=4", "--set", "subset_fraction=0.2", "--set", "batch_size=64"]


@pytest.fixture
def no_model(monkeypatch):
    """Bad input must be refused before any data is loaded or model built."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Search or an Evaluation was started for bad input")
    monkeypatch.setattr(entrannas.search.Search, "__init__", refuse)
    monkeypatch.setattr(entrannas.train.Evaluation, "__init__", refuse)


BAD = [
    (["--set", "colour=red"], "colour = 'red': unknown setting; allowed: mode, dataset"),
    (["--set", "lamda=0.1"], "lamda = 0.1: unknown setting; did you mean 'lambda_'? allowed: mode, dataset"),
    (["--set", "mode=enas"], "mode = 'enas': allowed: darts, entrannas, dst, random"),
    (["--set", "settle_epochs=10"], "settle_epochs = 10: must be less than epochs (10)"),
    (["--set", "settle_epochs=-1"], "settle_epochs = -1: must be an integer >= 0"),
    (["--set", "beta_lr=-1"], "beta_lr = -1.0: must be >= 0"),
    (["--set", "placement=middle"], "placement = 'middle': allowed: first, last, all"),
    (["--set", "placement=[0, 9]"], "placement = [0, 9]: cell index 9 is not in 0..4"),
    (["--set", "tau_schedule=step"], "tau_schedule = 'step': allowed: constant, linear, exponential, cosine"),
    (["--set", "primitives=[sep_conv_3x3, conv_9x9]"], "primitives = 'conv_9x9': unknown operation; allowed:"),
    (["--set", "bottleneck_ratio=3"], "bottleneck_ratio = 3: must divide every cell's channel count"),
    (["--set", "placement=[0, 2]"], "placement = [0, 2]: has no reduction Engine-cell"),
    (["--set", "placement=[1, 3]"], "placement = [1, 3]: has no normal Engine-cell"),
    (["--set", "lambda_=-0.1"], "lambda_ = -0.1: must be >= 0"),
    (["--set", "epochs=0"], "epochs = 0: must be an integer >= 1"),
    (["--set", "epochs=two"], "epochs = 'two': must be an integer"),
    (["--set", "dataset=cifar10", "--set", "data_dir=/nonexistent/cifar"],
     "data_dir = '/nonexistent/cifar': is not an existing directory"),
    (["--set", "dataset=imagenet"], "data_dir = None: dataset imagenet needs a data directory"),
    (["--config", "/nonexistent.yaml"], "--config = '/nonexistent.yaml': is not a readable file"),
    (["--set", "novalue"], "--set = 'novalue': expected key=value"),
    # the fast paths that did not pay are gone: their settings are unknown
    (["--set", "compile=reduce-overhead"], "compile = 'reduce-overhead': unknown setting"),
    (["--set", "transit=masked"], "transit = 'masked': unknown setting"),
    (["--set", "transit=auto"], "transit = 'auto': unknown setting"),
    (["--set", "cuda_graphs=maybe"], "cuda_graphs = 'maybe': must be true or false"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_input_exits_2_with_a_message(args, message, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    assert main(["search", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (out / "history.jsonl").exists()


EVAL_BAD = [
    ("lr_schedule=linear", "lr_schedule = 'linear': allowed: cosine, step"),
    ("momentum=1", "momentum = 1.0: must be in [0, 1)"),
    ("drop_path_prob=-0.1", "drop_path_prob = -0.1: must be in [0, 1)"),
    ("lr=0", "lr = 0.0: must be > 0"),
    ("lr_min=-0.001", "lr_min = -0.001: must be >= 0"),
    ("cutout=-1", "cutout = -1: must be an integer >= 0"),
    ("subset_fraction=0", "subset_fraction = 0.0: must be in (0, 1]"),
    ("layers=2", "layers = 2: must be >= 3 so that the net has a normal and a reduction cell"),
    ("device=tpu", "device = 'tpu': allowed: auto, cpu, cuda, cuda:N, mps"),
]


@pytest.mark.parametrize("setting, message", EVAL_BAD, ids=[s.split("=")[0] for s, _ in EVAL_BAD])
def test_bad_evaluation_settings_exit_2_before_training(setting, message, tmp_path, capsys, no_model):
    out = tmp_path / "run"
    assert main(["evaluate", "--genotype", "DARTS_V2", "--set", setting, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not out.exists()


@pytest.mark.parametrize("settings, message", [
    (["precision=bf16", "channels_last=true"], "channels_last = True: with precision bf16 on the CPU"),
    (["cuda_graphs=true"], "cuda_graphs = True: records CUDA graphs, so it needs a CUDA device"),
])
def test_a_setting_the_device_cannot_run_is_refused_before_anything_is_written(settings, message, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(entrannas.search, "build_search_data",
                        lambda *a: pytest.fail("data loaded for a setting the device cannot run"))
    args = ["search", *[a for s in settings for a in ("--set", s)], "--set", "device=cpu"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_console_script_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "entrannas", "search", "--set", "mode=nope", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2 and "mode = 'nope'" in proc.stderr


def test_yaml_numbers_and_dataset_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mode: dst\ndataset: digits\nepochs: 3\narch_lr: 1e-3\n")
    config = load_config(path)
    assert config.arch_lr == 1e-3 and config.epochs == 3
    assert "none" not in config.primitives, "DST has no 'none' candidate"
    assert config.placement == "first" and config.feature_sharing and config.bottleneck_ratio == 4
    cifar = SearchConfig(dataset="synthetic").resolve()
    assert (cifar.epochs, cifar.batch_size, cifar.layers, cifar.init_channels) == (50, 256, 8, 16)
    assert cifar.engine_cells() == {0, 2}, "Sec. 2.5: cells 0 and 2 of an 8-cell net"


def test_yaml_reads_only_true_and_false_as_booleans(tmp_path):
    """YAML 1.1 (PyYAML's) reads an unquoted off, yes, n... as booleans; a mode or a precision may be
    such a word, so every YAML the project reads takes YAML 1.2's booleans."""
    path = tmp_path / "c.yaml"
    path.write_text("mode: n\nfeature_sharing: false\n")
    with pytest.raises(ConfigError, match="mode = 'n': allowed"):
        load_config(path)
    path.write_text("precision: off\nfeature_sharing: false\n")
    with pytest.raises(ConfigError, match="precision = 'off': allowed: fp32, bf16"):
        load_config(path)
    with pytest.raises(ConfigError, match="feature_sharing = 'on': must be true or false"):
        load_config(None, ["feature_sharing=on"])
    # and YAML 1.2's numbers: 1e-3 is one (YAML 1.1 wants a dot: 1.0e-3)
    assert read_yaml("[on, off, yes, no, y, n, True, FALSE, 1e-3, -2E+2, 1.5e-3, null]") == [
        "on", "off", "yes", "no", "y", "n", True, False, 0.001, -200.0, 0.0015, None]


def test_resolved_config_is_valid_and_round_trips():
    config = SearchConfig(mode="darts").resolve()
    assert SearchConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))).resolve() == config
    with pytest.raises(ConfigError):
        SearchConfig.from_dict({"batch_size": True})


@pytest.mark.slow
def test_search_cli_writes_outputs_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["search", "--set", "mode=dst", "--set", "epochs=2", *FAST, "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "epoch   2 | train loss" in printed and "kept n[" in printed and "| archs " in printed
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["mode"] == "dst" and config["placement"] == "first" and config["seed"] == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0, 1]
    assert json.loads((out / "genotype.json").read_text()) == history[-1]["genotype"]
    assert (out / "checkpoint.pt").is_file()

    # the same directory again without --resume is refused, and nothing is lost
    before = (out / "history.jsonl").read_text()
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (out / "history.jsonl").read_text() == before

    # --resume with a different config is refused
    assert main([*args[:-2], "--set", "seed=3", "--out", str(out), "--resume"]) == 2
    assert "seed: 0 -> 3" in capsys.readouterr().err

    # resuming a finished run does nothing more
    assert main([*args, "--resume"]) == 0
    assert len((out / "history.jsonl").read_text().splitlines()) == 2


def test_a_directory_that_holds_a_run_is_refused_without_resume_and_kept(tmp_path):
    RunDir(tmp_path).prepare({"seed": 0}, resume=False)
    RunDir(tmp_path).append_history({"epoch": 0})
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    with pytest.raises(RunDirError, match="already holds a run; pass --resume to continue it"):
        RunDir(tmp_path).prepare({"seed": 1}, resume=False)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_evaluate_reports_the_last_epochs_test_error_only(tmp_path, capsys, monkeypatch):
    errors = iter([0.4, 0.2, 0.3])

    def epoch_without_training(self, on_step=None):
        record = {"epoch": self.epoch, "test_error": next(errors), "seconds": 0.5}
        self.epoch += 1
        return record

    monkeypatch.setattr(entrannas.train.Evaluation, "run_epoch", epoch_without_training)
    args = ["evaluate", "--genotype", "DARTS_V2", "--set", "epochs=3", *FAST, "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    result = json.loads((tmp_path / "eval" / "result.json").read_text())
    # the last epoch's test error, and no best-over-epochs figure: that would select on the test set
    assert (result["test_error"], result["epochs"], result["seconds"]) == (0.3, 3, 1.5)
    assert not any("best" in key for key in result)
    # the same directory again without --resume is refused, and nothing is lost
    before = (tmp_path / "eval" / "history.jsonl").read_text()
    assert main(args) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert (tmp_path / "eval" / "history.jsonl").read_text() == before


@pytest.mark.slow
def test_interrupted_cli_search_resumes_to_the_same_result(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    common = ["search", "--set", "mode=entrannas", *FAST]
    assert main([*common, "--set", "epochs=3", "--out", str(whole)]) == 0
    # interrupt after epoch 2: run a 3-epoch search whose loop we stop early
    original = entrannas.search.Search.run

    def two_epochs(self, on_step=None):
        for record in original(self, on_step):
            yield record
            if self.epoch == 2:
                return

    entrannas.search.Search.run = two_epochs
    try:
        assert main([*common, "--set", "epochs=3", "--out", str(part)]) == 0
    finally:
        entrannas.search.Search.run = original
    with open(part / "history.jsonl", "a") as fh:   # a record written after the checkpoint, then a crash
        fh.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    assert main([*common, "--set", "epochs=3", "--out", str(part), "--resume"]) == 0
    assert [untimed(r) for r in RunDir(part).history()] == [untimed(r) for r in RunDir(whole).history()]
    assert (part / "genotype.json").read_text() == (whole / "genotype.json").read_text()


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default(tmp_path):
    """A run started by an earlier version has no ``cuda_graphs`` in its config.yaml; it ran what
    ``cuda_graphs: false`` runs, so resuming it with that value is allowed, and another is refused."""
    from entrannas.rundir import RunDir, RunDirError

    config = SearchConfig(mode="dst").resolve().to_dict()
    old = {k: v for k, v in config.items() if k != "cuda_graphs"}
    run = RunDir(tmp_path / "run")
    run.prepare(old, resume=False)
    (tmp_path / "run" / "history.jsonl").write_text("")
    defaults = SearchConfig.field_defaults()
    assert defaults["cuda_graphs"] is False and defaults["primitives"] == list(SearchConfig().primitives)
    assert run.prepare(config, resume=True, defaults=defaults) is False    # accepted (no checkpoint yet)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(old))     # prepare rewrote it
    with pytest.raises(RunDirError, match="cuda_graphs: None -> True"):
        run.prepare({**config, "cuda_graphs": True}, resume=True, defaults=defaults)
    with pytest.raises(RunDirError, match="cuda_graphs: None -> False"):
        run.prepare(config, resume=True)                                    # without the defaults


def test_a_random_mode_search_writes_the_seeds_genotype(tmp_path, capsys):
    """``--set mode=random``: a genotype drawn by the seed, no training; same seed, same file."""
    files = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        assert main(["search", "--set", "mode=random", "--set", f"seed={seed}", "--out", str(tmp_path / name)]) == 0
        files.append((tmp_path / name / "genotype.json").read_text())
    assert files[0] == files[1] != files[2]
