import math
import time

import pytest
import torch

from entrannas.compiled import CapturedStructures
from entrannas.search import Search, SearchDiverged

from conftest import cosine_lrs, loss_and_accuracy_by_hand, record_as_is, tiny_config, untimed


def stable(record: dict) -> dict:
    """What the seed decides, less the facts of the process (host reads, compiled passes)."""
    return untimed(record, also=("derivations", "compile"))


def small(**changes):
    """Three short epochs: a quarter of digits, so about three steps per epoch."""
    values = dict(dataset="digits", epochs=3, batch_size=64, arch_warmup_epochs=1, subset_fraction=0.25)
    return tiny_config(**{**values, **changes})


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_same_seed_same_history(mode):
    a = [stable(r) for r in Search(small(mode=mode)).run()]
    b = [stable(r) for r in Search(small(mode=mode)).run()]
    assert a == b
    c = [stable(r) for r in Search(small(mode=mode, seed=1)).run()]
    assert a != c


def test_records_carry_what_spec_6_lists():
    record = next(Search(small(mode="dst")).run())
    for key in ("epoch", "seed", "tau", "genotype", "thresholds", "kept_connections", "train_loss",
                "train_acc", "valid_loss", "valid_acc", "seconds", "peak_memory_mb"):
        assert key in record
    assert len(record["thresholds"]["normal"]) == 4 and record["tau"] == 1.0
    assert record["kept_connections"]["reduce"] == [len(n) for n in record["genotype"]["reduce"]]
    # where it ran: the thread count changes the trajectory of a seed, so it is recorded
    assert (record["device"], record["device_name"]) == ("cpu", None)
    assert record["torch"] == torch.__version__ and record["threads"] == torch.get_num_threads()


def test_an_epoch_reports_the_seconds_its_validation_pass_took(monkeypatch):
    """``valid_seconds``: the share of the epoch's ``seconds`` spent in ``Search.evaluate``."""
    evaluate = Search.evaluate

    def slow_evaluate(self):
        time.sleep(0.3)
        return evaluate(self)

    monkeypatch.setattr(Search, "evaluate", slow_evaluate)
    record = Search(small(mode="entrannas", epochs=1, subset_fraction=0.1)).run_epoch()
    assert 0.3 <= record["valid_seconds"] < record["seconds"]   # less: the training steps came first


def test_each_epoch_reports_its_lr_and_the_super_nets_figures_on_the_arch_half():
    """An epoch's lr follows the cosine from lr to lr_min; its valid loss and accuracy are the
    super-net's (eval mode, this epoch's architecture) over the architecture half of the split."""
    search = Search(small(mode="dst", lr=0.2, lr_min=0.02))
    lrs = []
    for _ in range(3):
        record = search.run_epoch()
        lrs.append(record["lr"])
        search.model.eval()
        search.data.valid.set_epoch(record["epoch"])
        loss, accuracy, n = loss_and_accuracy_by_hand(lambda x: search.model(x, arch_grad=False), search.data.valid)
        search.model.train()
        assert n == len(search.data.valid.labels)
        assert record["valid_loss"] == pytest.approx(loss, rel=1e-5)
        assert record["valid_acc"] == pytest.approx(accuracy)
    assert lrs == pytest.approx(cosine_lrs(0.2, 0.02, 3))


def test_a_search_whose_loss_is_not_finite_stops_as_diverged():
    search = Search(small(mode="entrannas", lr=1e30))
    with pytest.raises(SearchDiverged, match="epoch 0: training loss is nan; lower lr or arch_lr"):
        search.run_epoch()
    assert search.epoch == 0, "the epoch that diverged does not count as done"


def test_resumed_search_equals_uninterrupted(tmp_path):
    config = small(mode="dst")
    whole = Search(config)
    history = [stable(r) for r in whole.run()]

    first = Search(config)
    part = [stable(first.run_epoch()), stable(first.run_epoch())]
    first.save(tmp_path / "ckpt.pt")
    del first
    second = Search(config)
    second.load(tmp_path / "ckpt.pt")
    assert second.epoch == 2
    part += [stable(r) for r in second.run()]

    assert part == history
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_dst_search_on_digits_learns():
    config = tiny_config(mode="dst", dataset="digits", epochs=4, batch_size=64, arch_warmup_epochs=1,
                         layers=5, init_channels=8)
    history = list(Search(config).run())
    assert max(r["valid_acc"] for r in history) > 0.6, "well above chance (0.1)"
    assert history[-1]["valid_acc"] > 0.4
    assert all(math.isfinite(r["train_loss"]) for r in history)


@pytest.mark.slow
def test_unrolled_search_runs_an_epoch():
    record = next(Search(small(mode="entrannas", unrolled=True, epochs=1, arch_warmup_epochs=0)).run())
    assert math.isfinite(record["valid_loss"])


def test_an_epoch_derives_the_structure_once_per_step_and_never_in_warm_up():
    search = Search(small(mode="entrannas", arch_warmup_epochs=1))
    warm, searching = search.run_epoch(), search.run_epoch()
    steps = min(len(search.data.train), len(search.data.valid))
    assert warm["derivations"] == 1                 # tau's value at the epoch's start, then none
    assert searching["derivations"] == steps + 1    # + the new tau at the start
    assert warm["compile"] is None
    assert warm["structures"] == 1 <= searching["structures"] <= steps


def test_an_epoch_counts_the_derived_architectures_its_steps_ran():
    """The record's ``structures``: one per derived architecture the weight steps ran, the same for
    sparse and masked Transit-cells (which read the mask on the host once per step instead), and
    for ``auto`` with built passes (a stand-in recorder on the CPU), whose record says how many
    passes went through the masked structure."""
    records = []
    for transit in ("sparse", "masked", "auto"):
        search = Search(small(mode="entrannas", arch_warmup_epochs=0, arch_lr=0.05, transit=transit))
        if transit == "auto":
            model = search.model
            model.compiled = CapturedStructures(model.run_structure, model, after=2, capture=record_as_is)
        seen = []
        record = search.run_epoch(on_step=lambda i, n, s=search, into=seen: into.append(s.model.derived_key))
        assert record["structures"] == len(set(seen)) > 1 and None not in seen
        records.append((record["structures"], seen))
    assert records[0] == records[1] == records[2]
    built = record["compile"]
    assert built["fallback_calls"] > 0 and built["compiles"] >= 1
