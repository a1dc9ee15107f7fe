import math
import time

import pytest
import torch

from entrannas.genotype import Genotype
from entrannas.search import RandomSearch, Search, SearchDiverged, genotype_stability, search_job
from entrannas.zoo import ZOO

from conftest import cosine_lrs, loss_and_accuracy_by_hand, record_as_is, tiny_config, untimed


def stable(record: dict) -> dict:
    """What the seed decides, less the facts of the process (host reads, recorded passes)."""
    return untimed(record, also=("derivations", "cuda_graphs"))


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
    """``valid_seconds``: the share of the epoch's ``seconds`` spent in ``Search.evaluate`` (the
    super-net's pass and the derived network's)."""
    evaluate = Search.evaluate

    def slow_evaluate(self, derived=False):
        time.sleep(0.3)
        return evaluate(self, derived)

    monkeypatch.setattr(Search, "evaluate", slow_evaluate)
    record = Search(small(mode="entrannas", epochs=1, subset_fraction=0.1)).run_epoch()
    assert 0.6 <= record["valid_seconds"] < record["seconds"]   # less: the training steps came first


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
    assert warm["cuda_graphs"] is None
    assert warm["architectures"] == 1 <= searching["architectures"] <= steps


def test_an_epoch_counts_the_derived_architectures_its_steps_ran():
    """The record's ``architectures``: one per derived architecture the weight steps ran, the same with
    recorded passes (a stand-in recorder on the CPU), whose record says how many passes were recorded."""
    records = []
    for graphs in (False, True):
        search = Search(small(mode="entrannas", arch_warmup_epochs=0, arch_lr=0.05))
        if graphs:
            search.model.use_cuda_graphs(after=2, capture=record_as_is)
        seen = []
        record = search.run_epoch(on_step=lambda i, n, s=search, into=seen: into.append(s.model.derived.key))
        assert record["architectures"] == len(set(seen)) > 1 and None not in seen
        records.append((record["architectures"], seen))
    assert records[0] == records[1]
    assert record["cuda_graphs"]["eager_calls"] > 0 and record["cuda_graphs"]["captures"] >= 1


def test_tau_anneals_before_the_settling_epochs_which_freeze_the_architecture():
    """tau goes from tau_start to tau_end over the epochs before the settling ones; those keep
    tau_end, make no arch step and so derive one genotype, while the weights train on it."""
    search = Search(small(mode="dst", epochs=5, arch_warmup_epochs=1, settle_epochs=2, tau_end=0.2))
    records, arch = [], []
    for record in search.run():
        records.append(record)
        arch.append([p.detach().clone() for p in search.model.arch_parameters()])
    assert [r["tau"] for r in records] == pytest.approx([1.0, 0.6, 0.2, 0.2, 0.2])
    assert [r["arch_updated"] for r in records] == [False, True, True, False, False]
    assert all(torch.equal(a, b) for a, b in zip(arch[2], arch[4]))
    assert records[2]["genotype"] == records[3]["genotype"] == records[4]["genotype"]
    assert [r["genotype_stability"] for r in records[3:]] == [1.0, 1.0] and records[0]["genotype_stability"] is None
    assert records[4]["lr"] > 0 and records[4]["train_loss"] < records[2]["train_loss"] * 2


def test_the_last_fifth_of_the_epochs_settle_unless_set():
    assert [tiny_config(epochs=e).settle_epochs for e in (1, 4, 5, 10, 50)] == [0, 0, 1, 2, 10]
    assert tiny_config(epochs=10, settle_epochs=0).settle_epochs == 0


def test_genotype_stability_is_the_share_of_choices_kept():
    a = ZOO["DARTS_V2"]
    d = a.to_dict()
    d["normal"][0] = [["sep_conv_5x5", 0], ["sep_conv_3x3", 1]]   # one of 16 choices changed
    b = Genotype.from_dict(d)
    assert genotype_stability(a, a) == 1.0
    assert genotype_stability(a, b) == pytest.approx(15 / 17)      # 15 shared of 17 in either
    d["normal"][0] = d["normal"][0] + [["skip_connect", 1]]         # DST: one more input kept
    assert genotype_stability(b, Genotype.from_dict(d)) == pytest.approx(16 / 17)


def test_an_epoch_reports_the_derived_networks_accuracy_beside_the_super_nets():
    """``derived_valid_acc``: the architecture split through ``derived_forward`` (every cell a
    Transit-cell), and ``supernet_gap`` the super-net's accuracy minus it."""
    search = Search(small(mode="entrannas", epochs=2))
    record = search.run_epoch()
    search.data.valid.set_epoch(0)
    search.model.eval()
    _, acc, _ = loss_and_accuracy_by_hand(search.model.derived_forward, search.data.valid)
    assert record["derived_valid_acc"] == pytest.approx(acc)
    assert record["supernet_gap"] == pytest.approx(record["valid_acc"] - acc)


def test_random_mode_draws_a_top2_genotype_by_the_seed_and_trains_nothing():
    genotypes = [search_job(tiny_config(mode="random", seed=s, epochs=7)).genotype() for s in (0, 0, 1)]
    assert genotypes[0] == genotypes[1] != genotypes[2]
    for cell in (genotypes[0].normal, genotypes[0].reduce):
        for node in cell:
            assert len(node) == 2 and len({i for _, i in node}) == 2
            assert all(op != "none" for op, _ in node)
    job = search_job(tiny_config(mode="random", seed=3, epochs=7))
    assert isinstance(job, RandomSearch) and job.config.epochs == 1
    records = list(job.run())
    assert len(records) == 1 and records[0]["genotype"] == job.genotype().to_dict()
    assert "valid_acc" not in records[0]
