import json

import pytest
import torch
import torch.nn.functional as F

from entrannas.cli import main
from entrannas.config import EvalConfig
from entrannas.search import Search
from entrannas.train import Evaluation, TrainingDiverged, evaluate, training_loss
from entrannas.zoo import ZOO

from conftest import cosine_lrs, loss_and_accuracy_by_hand, tiny_config, untimed

SMALL = dict(dataset="digits", epochs=3, layers=3, init_channels=8, subset_fraction=0.3)


def test_recipes_are_the_darts_defaults():
    cifar = EvalConfig(dataset="synthetic").resolve()
    assert (cifar.epochs, cifar.batch_size, cifar.layers, cifar.init_channels, cifar.lr) == (600, 96, 20, 36, 0.025)
    assert (cifar.auxiliary, cifar.auxiliary_weight, cifar.drop_path_prob, cifar.cutout) == (True, 0.4, 0.2, 16)
    assert (cifar.weight_decay, cifar.grad_clip, cifar.lr_schedule) == (3e-4, 5.0, "cosine")
    assert EvalConfig(dataset="synthetic", epochs=30, layers=8).resolve().epochs == 30, "overridable"


def test_the_training_loss_adds_the_auxiliary_heads_at_its_weight():
    gen = torch.Generator().manual_seed(0)
    logits, aux = torch.randn(6, 10, generator=gen), torch.randn(6, 10, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    config = EvalConfig(dataset="synthetic", label_smoothing=0.1).resolve()   # auxiliary_weight 0.4
    plain = F.cross_entropy(logits, y, label_smoothing=0.1)
    extra = F.cross_entropy(aux, y, label_smoothing=0.1)
    torch.testing.assert_close(training_loss(logits, aux, y, config), plain + 0.4 * extra)
    torch.testing.assert_close(training_loss(logits, None, y, config), plain)


@pytest.mark.slow
def test_a_searched_genotype_learns_digits():
    search = Search(tiny_config(mode="entrannas", dataset="digits", epochs=1, subset_fraction=0.3))
    list(search.run())
    genotype = search.model.genotype()
    history = list(evaluate(genotype, EvalConfig(**{**SMALL, "epochs": 4, "subset_fraction": 1.0})))
    assert history[-1]["test_error"] < 0.5, "well above chance (error 0.9)"
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]


def test_drop_path_ramps_linearly_with_the_epoch():
    config = EvalConfig(**SMALL, drop_path_prob=0.3)
    assert [round(r["drop_path_prob"], 6) for r in evaluate(ZOO["DARTS_V2"], config)] == [0.0, 0.1, 0.2]


def test_the_optimiser_and_both_lr_schedules_follow_the_config():
    """SGD gets the config's momentum and weight decay; each epoch's lr is the cosine from lr to lr_min,
    or with ``lr_schedule: step`` lr * lr_gamma ** epoch."""
    config = EvalConfig(**SMALL, lr=0.2, lr_min=0.02, momentum=0.8, weight_decay=1e-3)
    sgd = Evaluation(ZOO["DARTS_V2"], config).optimizer.param_groups[0]
    assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (0.2, 0.8, 1e-3)
    lrs = [r["lr"] for r in evaluate(ZOO["DARTS_V2"], config)]
    assert lrs == pytest.approx(cosine_lrs(0.2, 0.02, 3))
    step = [r["lr"] for r in evaluate(ZOO["DARTS_V2"], config, lr_schedule="step", lr_gamma=0.5)]
    assert step == pytest.approx([0.2, 0.1, 0.05])


def test_an_epochs_test_error_is_the_networks_on_the_test_set():
    evaluation = Evaluation(ZOO["DARTS_V2"], EvalConfig(**SMALL))
    progress = []
    record = evaluation.run_epoch(on_step=lambda step, steps: progress.append((step, steps)))
    steps = len(evaluation.data.train)   # the progress bar's count: steps, not a batch's size
    assert progress == [(i + 1, steps) for i in range(steps)]
    model = evaluation.model.eval()
    loss, accuracy, n = loss_and_accuracy_by_hand(lambda x: model(x)[0], evaluation.data.test)
    assert n == len(evaluation.data.test.labels)
    assert record["test_loss"] == pytest.approx(loss, rel=1e-5)
    assert record["test_error"] == pytest.approx(1 - accuracy)


def test_an_evaluation_whose_loss_is_not_finite_stops_as_diverged():
    evaluation = Evaluation(ZOO["DARTS_V2"], EvalConfig(**SMALL, lr=1e30))
    with pytest.raises(TrainingDiverged, match="epoch 0: training loss is nan; lower lr"):
        evaluation.run_epoch()
    assert evaluation.epoch == 0


def test_evaluation_resumes_exactly(tmp_path):
    """Resumed after epoch 1 of 4: the random state (epoch 1 drew drop-path masks, epoch 0 runs at
    probability 0) and the lr schedule (it sets epoch 3's lr) come back with the weights."""
    config = EvalConfig(**{**SMALL, "epochs": 4}, drop_path_prob=0.2)
    whole = Evaluation(ZOO["PC_DARTS"], config)
    expected = [untimed(r) for r in whole.run()]
    first = Evaluation(ZOO["PC_DARTS"], config)
    got = [untimed(first.run_epoch()), untimed(first.run_epoch())]
    first.save(tmp_path / "c.pt")
    second = Evaluation(ZOO["PC_DARTS"], config)
    second.load(tmp_path / "c.pt")
    got += [untimed(r) for r in second.run()]
    assert got == expected
    with pytest.raises(ValueError, match="different genotype"):
        Evaluation(ZOO["DARTS_V1"], config).load(tmp_path / "c.pt")


FAST = ["--set", "epochs=1", "--set", "layers=3", "--set", "init_channels=8", "--set", "subset_fraction=0.2"]


@pytest.mark.slow
def test_evaluate_cli_from_a_search_directory(tmp_path, capsys):
    search_dir, eval_dir = tmp_path / "search", tmp_path / "eval"
    assert main(["search", "--set", "mode=dst", *FAST, "--set", "init_channels=4", "--out", str(search_dir)]) == 0
    assert main(["evaluate", "--genotype", str(search_dir), *FAST, "--out", str(eval_dir)]) == 0
    assert "M parameters" in capsys.readouterr().out
    result = json.loads((eval_dir / "result.json").read_text())
    assert result["genotype"] == json.loads((search_dir / "genotype.json").read_text())
    assert 0 <= result["test_error"] <= 1 and result["params_m"] > 0 and result["multiply_adds_m"] > 0
    assert len((eval_dir / "history.jsonl").read_text().splitlines()) == 1
    # resuming with another genotype is refused
    assert main(["evaluate", "--genotype", "DARTS_V1", *FAST, "--out", str(eval_dir), "--resume"]) == 2
    assert "genotype.json differs" in capsys.readouterr().err


# a valid reduction cell, beside each broken normal cell
REDUCE = '"reduce": [[["max_pool_3x3", 0]]], "reduce_concat": [2]'


@pytest.mark.parametrize("content, message", [
    ('{"normal": [[["conv_9x9", 0]]], "normal_concat": [2], %s}' % REDUCE, "unknown operation 'conv_9x9'"),
    ('{"normal": [[["sep_conv_3x3", 3]]], "normal_concat": [2], %s}' % REDUCE, "not an earlier node"),
    ('{"normal": [[]], "normal_concat": [2], %s}' % REDUCE, "node 2 has no inputs"),
    ('{"normal": [[["sep_conv_3x3", 0]]], "normal_concat": [7], %s}' % REDUCE, "node 7 does not exist"),
    ("Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)], normal_concat=[2], reduce=[(", "does not parse"),
])
def test_bad_genotype_files_exit_2_before_training(tmp_path, capsys, monkeypatch, content, message):
    import entrannas.train

    monkeypatch.setattr(entrannas.train.Evaluation, "__init__",
                        lambda *a, **k: pytest.fail("training started for a bad genotype"))
    path = tmp_path / "g.txt"
    path.write_text(content)
    assert main(["evaluate", "--genotype", str(path), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_unknown_genotype_name_lists_the_zoo(tmp_path, capsys):
    assert main(["evaluate", "--genotype", "DARTS_V3", "--out", str(tmp_path / "o")]) == 2
    assert "DARTS_V2" in capsys.readouterr().err


def test_auxiliary_on_digits_is_refused(tmp_path, capsys):
    assert main(["evaluate", "--genotype", "DARTS_V2", "--set", "auxiliary=true", "--out", str(tmp_path / "o")]) == 2
    assert "auxiliary = True" in capsys.readouterr().err
