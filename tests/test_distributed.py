"""Data-parallel search: batch statistics over the global batch, gradients summed over processes, the
same alpha as one process; Ray Train workers in a sweep trial and on the command line."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entrannas.cli import main
from entrannas.config import ConfigError, SearchConfig
from entrannas.distributed import Shard, SyncedBatchNorm, check_data_parallel, run_local, synchronize_batchnorm
from entrannas.search import Search

import parallel_workers as workers
from conftest import tiny_config

#: a DST search small enough for a test, with C = 8 so that the bottleneck keeps 2 channels per op
DST = dict(mode="dst", dataset="digits", layers=3, init_channels=8, arch_warmup_epochs=0, batch_size=32)


def test_synced_batchnorm_alone_is_batchnorm_forward_backward_and_running_statistics():
    torch.manual_seed(0)
    x, g = torch.randn(7, 3, 4, 4) * 3 + 1, torch.randn(7, 3, 4, 4)
    plain = nn.BatchNorm2d(3, momentum=0.3)
    nn.init.uniform_(plain.weight), nn.init.uniform_(plain.bias)
    synced = nn.BatchNorm2d(3, momentum=0.3)
    synced.load_state_dict(plain.state_dict())
    synced.__class__, synced.shard = SyncedBatchNorm, Shard()   # what synchronize_batchnorm does on 2+
    outs = []
    for m in (plain, synced):
        xi = x.clone().requires_grad_(True)
        m(xi).backward(g)
        outs.append([m(x).detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    synced.eval()   # running statistics in eval mode: the plain BatchNorm
    torch.testing.assert_close(synced(x), plain.eval()(x))


def test_one_process_keeps_its_batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    assert type(synchronize_batchnorm(net, Shard())[1]) is nn.BatchNorm2d
    assert type(synchronize_batchnorm(net, Shard(0, 2))[1]) is SyncedBatchNorm


@pytest.mark.parametrize("setting, value", [("unrolled", True), ("cuda_graphs", True), ("op_streams", 4)])
def test_settings_a_data_parallel_search_cannot_run_are_refused_by_name(setting, value):
    config = SearchConfig(**{setting: value}).resolve()
    with pytest.raises(ConfigError, match=rf"{setting} = {value}: not with workers: 2"):
        check_data_parallel(config, 2)
    check_data_parallel(config, 1)
    with pytest.raises(ConfigError, match="workers = 0: a whole number"):
        check_data_parallel(config, 0)


def test_workers_below_one_exit_2_before_anything_runs(tmp_path, capsys):
    assert main(["search", "--workers", "0", "--out", str(tmp_path / "r")]) == 2
    assert "--workers = 0: a whole number of processes >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_global_batch_statistics_of_uneven_shards_equal_one_process(tmp_path):
    run_local(workers.batchnorm_shares, 2, str(tmp_path))   # 7 samples: shares of 4 and 3
    torch.manual_seed(0)
    x, g = torch.randn(7, 3, 4, 4) * 3 + 1, torch.randn(7, 3, 4, 4)
    weight, bias = torch.rand(3, requires_grad=True), torch.rand(3, requires_grad=True)
    xr = x.clone().requires_grad_(True)
    y = F.batch_norm(xr, None, None, weight, bias, training=True)
    y.backward(g)
    shares = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.testing.assert_close(torch.cat([s["y"] for s in shares]), y.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([s["grad"] for s in shares]), xr.grad, rtol=1e-5, atol=1e-5)
    # each process's weight gradient is its share's; summed, the whole batch's
    torch.testing.assert_close(shares[0]["weight_grad"] + shares[1]["weight_grad"], weight.grad, rtol=1e-5,
                               atol=1e-5)


def test_two_processes_take_the_same_arch_steps_as_one(tmp_path):
    """The search's alpha and beta after its first architecture steps: the same on both processes, and
    as one process on the whole batch within float tolerance (the sums add up in another order)."""
    config = tiny_config(**DST)
    run_local(workers.first_arch_steps, 2, config.to_dict(), 3, str(tmp_path))
    one = Search(config, torch.device("cpu"))
    start = one.model.alpha_normal.detach().clone()
    for _, (train, valid) in zip(range(3), zip(one.data.train, one.data.valid)):
        one.optimizer.step(train, valid, update_arch=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for single, rank0, rank1 in zip(one.model.arch_parameters(), *ranks):
        assert torch.equal(rank0, rank1)   # never drift apart
        torch.testing.assert_close(rank0, single.detach(), rtol=0, atol=1e-6)
    assert (one.model.alpha_normal.detach() - start).abs().max() > 1e-3   # alpha moved: the check compares steps


# -- Ray Train ------------------------------------------------------------------------------------
def _train_worker_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"RayTrainWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_a_sweep_trial_on_two_workers_survives_a_killed_worker(tmp_path):
    """A worker killed after the first epoch's checkpoint: Ray Train restarts both, and the trial
    continues from that checkpoint (the resumed search is the uninterrupted one: test_search)."""
    import ray

    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import run_sweep

    base = {**DST, "epochs": 2, "arch_warmup_epochs": 1, "batch_size": 64, "subset_fraction": 0.3}
    spec = spec_from_dict({"name": "dp", "base": base, "sweep": {"seed": [0]},
                           "resources": {"cpu": 1, "workers": 2}, "max_failures": 1})
    killed = []

    def kill_a_worker_after_the_first_checkpoint():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            if list((tmp_path / "dp").glob("*/workers/checkpoint_*")) and _train_worker_pids():
                pid = _train_worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.5)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    try:
        results = run_sweep(spec, tmp_path, out=lambda line: None)
    finally:
        ray.shutdown()
    killer.join(1)
    assert killed and len(results) == 1 and not results.errors
    trial = next(p for p in (tmp_path / "dp").iterdir() if (p / "result.json").is_file())
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]   # resumed from the checkpoint: no epoch twice
    assert rows[-1]["workers"] == 2 and rows[-1]["done"] and rows[-1]["images_per_second"] > 0
    assert json.loads(rows[-1]["genotype"])["normal"]


@pytest.mark.slow
def test_search_on_two_workers_from_the_command_line(tmp_path, capsys):
    import ray

    out = tmp_path / "run"
    try:
        status = main(["search", "--workers", "2", "--out", str(out), *sum(
            (["--set", f"{k}={v}"] for k, v in {**DST, "epochs": 1, "subset_fraction": 0.3}.items()), [])])
    finally:
        ray.shutdown()
    assert status == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [0] and history[0]["workers"] == 2 and history[0]["arch_updated"]
    assert json.loads((out / "genotype.json").read_text()) == history[-1]["genotype"]
    printed = capsys.readouterr().out
    assert "2 workers" in printed and printed.count("epoch   1 |") == 1
