"""Every fast path computes what the plain fp32 eager path computes (to the precision's tolerance)."""

import itertools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import bench
import imitated_pool
from bench import block_of, check_against_eager, gradient_differences, main as bench_main
from entrannas.bilevel import BilevelOptimizer
from entrannas.genotype import Genotype, genotype_masks
from entrannas.ops import DARTS_PRIMITIVES
from entrannas.zoo import ZOO, load_genotype

from conftest import tiny_batch, tiny_config, tiny_net

DST_PRIMS = tuple(p for p in DARTS_PRIMITIVES if p != "none")
ROOT = Path(__file__).resolve().parent.parent
DST_GENOTYPE = ROOT / "benchmarks" / "genotypes" / "dst-digits.json"


def outputs_and_grads(mode: str, **changes):
    net = tiny_net(seed=0, mode=mode, **changes)
    opt = BilevelOptimizer(net, tiny_config(mode=mode, **changes))
    loss, logits = opt.arch_loss(*tiny_batch(0))
    loss.backward()
    weights = [p.grad for p in net.weight_parameters() if p.grad is not None]
    return logits.float(), [a.grad.clone() for a in net.arch_parameters()], weights


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_channels_last_matches_the_eager_path(mode):
    logits, arch, weights = outputs_and_grads(mode)
    logits_cl, arch_cl, weights_cl = outputs_and_grads(mode, channels_last=True)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-4, atol=1e-5)
    assert (len(arch_cl), len(weights_cl)) == (len(arch), len(weights))
    for a, b in zip(arch_cl, arch):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    for a, b in zip(weights_cl, weights):
        torch.testing.assert_close(a.contiguous(), b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_bf16_autocast_stays_close_to_fp32(mode):
    logits, arch, _ = outputs_and_grads(mode)
    logits_bf, arch_bf, _ = outputs_and_grads(mode, precision="bf16")
    # bf16 keeps 8 bits of mantissa: compare directions. alpha's gradient is a small difference of
    # nearly equal terms (the softmax derivative at near-uniform alpha), so it is the noisiest.
    cos = lambda a, b: F.cosine_similarity(a.flatten().float(), b.flatten(), dim=0)  # noqa: E731
    assert cos(logits_bf, logits) > 0.99
    assert all(cos(a, b) > 0.85 for a, b in zip(arch_bf, arch))


def test_bench_prints_json_a_table_and_checks_each_fast_path(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert bench_main(["--configs", "darts", "entrannas", "dst+bf16", "--layers", "3", "--channels", "4",
                       "--batch-size", "4", "--image-size", "8", "--steps", "2", "--repeats", "2", "--warmup", "1",
                       "--device", "cpu", "--frozen-arch", "--check", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)
    assert json.loads(out.read_text()) == doc
    darts, entrannas, dst = doc["results"]
    assert [r["config"] for r in doc["results"]] == ["darts", "entrannas", "dst+bf16"]
    assert (dst["mode"], dst["precision"], dst["channels_last"]) == ("dst", "bf16", False)
    assert all(r["seconds_per_step"] > 0 and len(r["seconds_per_step_blocks"]) == 2 for r in doc["results"])
    assert darts["speedup_vs_darts"] == 1.0
    assert entrannas["speedup_vs_darts"] == pytest.approx(darts["seconds_per_step"] / entrannas["seconds_per_step"])
    # A frozen architecture: one derivation per step (after the arch update), one structure throughout.
    assert all(r["derivations_per_step"] == 1.0 and r["architectures_while_timing"] == 1 for r in doc["results"])
    assert entrannas["check"]["arch_pass"]["logits_max_rel_error"] == 0.0      # the eager path itself
    assert 0 < dst["check"]["weight_pass"]["logits_max_rel_error"] < 0.1       # bf16: close, not equal
    assert dst["check"]["arch_pass"]["grad_cosine"] > 0.9
    assert "s/step" in captured.err and "x darts" in captured.err and "dst+bf16" in captured.err
    # The projection: ceil(25,000 / batch) steps an epoch, the 15 warm-up epochs at the
    # weight-only step, the other 35 at the full step, which is the median block; beside it, the same
    # with a validation pass over as many batches in each of the 50 epochs.
    for r in doc["results"]:
        assert r["seconds_per_step"] == sorted(r["seconds_per_step_blocks"])[1]
        batches = math.ceil(25_000 / 4)
        minutes = batches * (15 * r["seconds_per_warmup_step"] + 35 * r["seconds_per_step"]) / 60
        assert r["projected_50_epoch_minutes"] == pytest.approx(minutes)
        assert r["seconds_per_valid_batch"] > 0 and r["seconds_per_valid_batch_initial"] is None
        assert r["projected_50_epoch_minutes_with_validation"] == pytest.approx(
            minutes + batches * 50 * r["seconds_per_valid_batch"] / 60)
    assert "+ valid" in captured.err


def test_the_bench_times_validation_as_a_search_runs_it(monkeypatch, capsys):
    """The validation pass is timed as ``Search.evaluate`` runs it: the optimizer's logits in eval
    mode without autograd; the steps before and after run in training mode."""
    calls, weight_passes = [], []
    logits, weight_loss = BilevelOptimizer.logits, BilevelOptimizer.weight_loss

    def recording(self, x):
        calls.append((self.model.training, torch.is_grad_enabled()))
        return logits(self, x)

    def recording_weight_loss(self, x, y, total=None):
        weight_passes.append(self.model.training)
        return weight_loss(self, x, y, total)

    monkeypatch.setattr(BilevelOptimizer, "logits", recording)
    monkeypatch.setattr(BilevelOptimizer, "weight_loss", recording_weight_loss)
    assert bench_main(["--configs", "entrannas", "--layers", "3", "--channels", "4", "--batch-size", "4",
                       "--image-size", "8", "--steps", "2", "--repeats", "3", "--warmup", "1", "--device", "cpu",
                       "--frozen-arch", "--check"]) == 0
    assert calls == [(False, False)] * (1 + 2 * 3)   # warm-up, then 3 blocks of 2
    assert len(weight_passes) > 2 * 3 and all(weight_passes)   # --check's passes come after validation
    capsys.readouterr()


def test_the_checks_references_are_the_eager_path_against_itself():
    """The references that scale a check's gradient cosine: the same batch (or an input that bf16
    represents exactly) gives the eager gradients back; another batch gives other gradients."""
    net = tiny_net(seed=0, mode="entrannas")
    opt = BilevelOptimizer(net, tiny_config(mode="entrannas", precision="bf16"))
    x, y = tiny_batch(0)
    exact = (x.to(torch.bfloat16).float(), y)
    same = check_against_eager(opt, exact, other_batch=exact)
    other = check_against_eager(opt, (x, y), other_batch=tiny_batch(1))
    for check in (same, other):
        assert set(check) == {"arch_pass", "weight_pass"}
        assert all(0.8 < c["grad_cosine"] < 0.99999 for c in check.values())   # bf16 against fp32
    for c in same.values():
        assert c["reference"]["input_rounded_to_bf16"] > 0.99999 and c["reference"]["other_batch"] > 0.99999
    for c in other.values():
        assert c["reference"]["other_batch"] < 0.99


def test_a_bench_stopped_by_sigterm_prints_and_keeps_what_it_measured(tmp_path):
    """`timeout` (gpu_session.sh) stops a bench with SIGTERM: the configurations measured so far are
    printed as a table and kept in --out, marked stopped, and the exit status says so."""
    import signal
    import time

    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--configs", "entrannas", "dst", "dst", "dst", "dst",
           "--layers", "3", "--channels", "4", "--batch-size", "2", "--image-size", "8", "--steps", "30",
           "--repeats", "3", "--warmup", "1", "--device", "cpu", "--threads", "1", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    deadline = time.time() + 120
    while not out.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)   # the first configuration is written when it is done
    time.sleep(1.0)   # into the second configuration's timing (dst: 90 steps, several seconds)
    assert out.exists() and proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    doc = json.loads(stdout)
    assert doc["stopped"].startswith("stopped (SIGTERM) after ") and doc["stopped"].endswith("of 5 configurations")
    assert json.loads(out.read_text())["stopped"] == doc["stopped"]
    assert 1 <= len(doc["results"]) < 5 and doc["results"][0]["config"] == "entrannas"
    assert not any("error" in r for r in doc["results"])   # the stop is not a failing configuration
    assert "s/step" in stderr and "\nentrannas " in stderr and "stopped (SIGTERM)" in stderr


def test_the_check_names_the_parameters_that_hold_most_of_a_difference():
    """Two parameters, the second's gradient off: it holds the whole difference and its own cosine."""
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    ref = torch.tensor([3.0, 4.0, 1.0, 0.0, 0.0])
    fast = torch.tensor([3.0, 4.0, 0.0, 1.0, 0.0])
    worst = gradient_differences([("a", a), ("b", b)], fast, ref)["largest_differences"]
    assert [w["parameter"] for w in worst] == ["b", "a"]
    assert worst[0]["share_of_difference"] == pytest.approx(1.0) and worst[1]["share_of_difference"] == 0.0
    assert worst[0]["cosine"] == pytest.approx(0.0, abs=1e-7) and worst[1]["cosine"] == pytest.approx(1.0)
    assert worst[0]["share_of_gradient"] == pytest.approx(1 / 26)
    assert worst[1]["share_of_gradient"] == pytest.approx(25 / 26)
    assert len(gradient_differences([("a", a), ("b", b)], fast, ref, top=1)["largest_differences"]) == 1


def test_the_check_gives_the_cosine_per_block_from_the_output_back():
    """Per block, summed over its parameters: cells.1's two parameters together have cosine 0.6
    (dot 3, norms 5 and 1); the untouched blocks 1; the order is the backward pass's."""
    named = [(n, torch.nn.Parameter(torch.zeros(k))) for n, k in
             (("stem0.0.weight", 1), ("cells.1.ops.0.0.weight", 1), ("cells.1.squeeze.0.weight", 1),
              ("classifier.weight", 1))]
    ref = torch.tensor([2.0, 3.0, 4.0, 1.0])
    fast = torch.tensor([2.0, 1.0, 0.0, 1.0])
    rows = gradient_differences(named, fast, ref)["by_block"]
    assert [r["block"] for r in rows] == ["classifier", "cells.1", "stem0"]
    assert [r["cosine"] for r in rows] == pytest.approx([1.0, 0.6, 1.0])
    assert [r["share_of_difference"] for r in rows] == pytest.approx([0.0, 1.0, 0.0])
    assert block_of("cells.12.preprocess0.op.1.weight") == "cells.12" and block_of("alpha_normal") == "alpha_normal"


def test_a_backward_pass_bent_inside_one_cell_shows_from_that_cell_back():
    """A wrong gradient into cell 3's inputs (a hook scales it) leaves the gradients of the cells
    after it and of cell 3's own weights as they are, and bends those of everything before: the
    first block whose cosine drops is the cell the backward pass went wrong in, or the one before."""
    net = tiny_net(seed=0, mode="dst", layers=5)
    opt = BilevelOptimizer(net, tiny_config(mode="dst", layers=5))
    flipped = lambda module, grad_in, grad_out: tuple(-3 * g if g is not None else None for g in grad_in)  # noqa: E731
    net.cells[3].register_full_backward_hook(flipped)
    rows = {r["block"]: r["cosine"] for r in check_against_eager(opt, tiny_batch(0, n=16))["weight_pass"]["by_block"]}
    assert list(rows) == ["classifier", "cells.4", "cells.3", "cells.2", "cells.1", "cells.0", "stem0"]
    assert all(rows[b] > 0.99999 for b in ("classifier", "cells.4", "cells.3"))
    assert all(rows[b] < 0.9 for b in ("cells.2", "cells.1", "cells.0", "stem0"))


@pytest.fixture
def tf32_flags():
    """torch's TF32 flags as torch sets them, restored after the test (the bench sets them process-wide)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_bench_records_tf32_and_no_tf32_turns_it_off(capsys, tf32_flags):
    small = ["--configs", "entrannas", "--layers", "3", "--channels", "4", "--batch-size", "2", "--image-size", "8",
             "--steps", "1", "--repeats", "1", "--warmup", "1", "--device", "cpu"]
    assert bench_main(small) == 0
    assert json.loads(capsys.readouterr().out)["tf32"] == {"cudnn": True, "matmul": False}
    assert bench_main(small + ["--no-tf32", "--check"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tf32"] == {"cudnn": False, "matmul": False} and doc["args"]["tf32"] is False
    (row,) = doc["results"]
    names = [w["parameter"] for w in row["check"]["weight_pass"]["largest_differences"]]
    assert len(names) == 3 and all(not n.startswith(("alpha", "beta")) for n in names)


def test_bench_sets_placement_sharing_and_ratio_per_config_or_for_all(capsys):
    """``--set KEY=VALUE`` sets a search setting for every configuration, ``MODE+KEY=VALUE`` for one
    (over ``--set``): EnTranNAS with the DARTS configuration's placement, sharing and ratio does the
    DARTS configuration's work (the same super-net, a top-2 derivation it does not use)."""
    assert bench_main(["--configs", "darts+placement=all", "entrannas",
                       "entrannas+placement=all+feature_sharing=false+bottleneck_ratio=1",
                       "entrannas+placement=0,2", "--set", "placement=last", "--layers", "3", "--channels", "4",
                       "--batch-size", "4", "--image-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "1",
                       "--count-ops", "--device", "cpu", "--frozen-arch"]) == 0
    darts, last, like_darts, listed = json.loads(capsys.readouterr().out)["results"]
    assert (darts["placement"], last["placement"], listed["placement"]) == ("all", "last", [0, 2])
    assert (like_darts["placement"], like_darts["feature_sharing"], like_darts["bottleneck_ratio"]) == ("all", False, 1)
    assert (last["feature_sharing"], last["bottleneck_ratio"]) == (True, 4)   # the mode's defaults
    assert like_darts["op_count"]["ops_per_step"] == darts["op_count"]["ops_per_step"]
    assert last["op_count"]["ops_per_step"] < darts["op_count"]["ops_per_step"]


@pytest.mark.parametrize("argv,named", [
    (["--configs", "entrannas+bottleneck_ratio=3"], "bottleneck_ratio"),
    (["--configs", "entrannas+placment=all"], "unknown setting 'placment'; did you mean 'placement'?"),
    (["--set", "layers=5"], "--layers"),
    (["--set", "epochs=100"], "50-epoch"),
    (["--set", "placement=[0, 9]"], "cell index 9"),
])
def test_bench_refuses_a_bad_setting_before_timing_anything(argv, named, capsys):
    assert bench_main(argv + ["--device", "cpu", "--layers", "3", "--channels", "4"]) == 2
    captured = capsys.readouterr()
    assert named in captured.err and captured.out == ""


def test_bench_profile_lists_where_a_step_spends_its_time(capsys):
    assert bench_main(["--configs", "entrannas", "dst", "--layers", "3", "--channels", "4", "--batch-size", "4",
                       "--image-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "1", "--profile", "2",
                       "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    entrannas, dst = (r["profile"] for r in json.loads(captured.out)["results"])
    for prof in (entrannas, dst):
        times = [t["ms_per_step"] for t in prof["top"]]
        assert times == sorted(times, reverse=True) and 0 < sum(times) <= prof["ms_per_step"] * (1 + 1e-9)
        assert {"aten::convolution_backward", "aten::native_batch_norm"} <= {t["name"] for t in prof["top"]}
    # DST's initial state keeps every op of every edge in its Transit-cells: more work per step.
    assert dst["calls_per_step"] > entrannas["calls_per_step"]
    assert "aten ops per step" in captured.err


def test_bench_counts_the_kernels_and_bytes_of_a_step(capsys):
    assert bench_main(["--configs", "darts", "entrannas", "dst", "--layers", "3", "--channels", "4", "--batch-size", "4", "--image-size", "8", "--steps", "1",
                       "--repeats", "1", "--warmup", "1", "--count-ops", "--device", "cpu", "--frozen-arch"]) == 0
    captured = capsys.readouterr()
    darts, entrannas, dst = json.loads(captured.out)["results"]
    counts = [r["op_count"] for r in (darts, entrannas, dst)]
    for c in counts:
        assert c["ops_per_step"] >= sum(t["calls"] for t in c["top"]) > 0 and c["gb_per_step"] > 0
        assert {"convolution", "convolution_backward", "native_batch_norm"} <= {t["op"] for t in c["top"]}
        assert not {"view", "detach", "empty"} & {t["op"] for t in c["top"]}   # no kernel of their own
    # The super-net's own work: DARTS runs every op everywhere, DST's dense start more than EnTranNAS.
    assert counts[0]["ops_per_step"] > counts[2]["ops_per_step"] > counts[1]["ops_per_step"]
    assert "kernel-launching ops per step" in captured.err


def test_bench_times_a_search_settled_at_a_given_genotype(capsys, tmp_path):
    """--arch: each mode runs its genotype's structure while timing (MODE=GENOTYPE for one mode); the
    warm-up epochs are projected at the initial state's weight step (DST: every op on every edge)."""
    genotype = tmp_path / "g.json"
    genotype.write_text(ZOO["PC_DARTS"].to_json())
    assert bench_main(["--configs", "entrannas", "dst", "darts", "--layers", "3", "--channels", "4",
                       "--batch-size", "4", "--image-size", "8", "--steps", "1", "--repeats", "1", "--warmup", "1",
                       "--count-ops", "--device", "cpu", "--arch", str(genotype), f"dst={DST_GENOTYPE}"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["results"]
    for r in rows:
        wanted = DST_GENOTYPE if r["mode"] == "dst" else genotype
        assert r["arch"] == str(wanted) and r["architectures_while_timing"] == 1
        timed, prims = Genotype.from_dict(r["genotype"]), (DST_PRIMS if r["mode"] == "dst" else DARTS_PRIMITIVES)
        assert all(torch.equal(a, b) for a, b in zip(genotype_masks(timed, prims, 4),
                                                     genotype_masks(load_genotype(str(wanted)), prims, 4)))
        assert r["seconds_per_warmup_step_initial"] > 0
        assert r["seconds_per_valid_batch_initial"] > 0
        steps = -(-25_000 // 4)
        assert r["projected_50_epoch_minutes"] * 60 == pytest.approx(
            steps * (15 * r["seconds_per_warmup_step_initial"] + 35 * r["seconds_per_step"]))
        assert r["projected_50_epoch_minutes_with_validation"] * 60 == pytest.approx(
            r["projected_50_epoch_minutes"] * 60
            + steps * (15 * r["seconds_per_valid_batch_initial"] + 35 * r["seconds_per_valid_batch"]))
    entrannas, dst, darts = (r["op_count"]["ops_per_step"] for r in rows)
    # Settled at 25 ops in its two cells, DST's Engine-cells run those alone; EnTranNAS's run every op.
    assert dst < entrannas < darts
    assert "timed settled: entrannas at " in captured.err


@pytest.mark.parametrize("args, message", [
    (["--configs", "enas"], "--configs = 'enas': starts with a mode"),
    (["--configs", "dst+turbo"], "--configs = 'dst+turbo': unknown variant 'turbo'"),
    (["--steps", "0"], "--steps = 0: must be >= 1"),
    (["--profile", "-1"], "--profile = -1: must be >= 0"),
    (["--configs", "dst+compile"], "--configs = 'dst+compile': unknown variant 'compile'"),
    (["--configs", "dst", "dst+bf16+cl"], "channels_last = True: with precision bf16 on the CPU"),
    (["--configs", "dst", "--arch", "nosuch"], "'nosuch' is neither a known name"),
    (["--configs", "dst+streams"], "op_streams = 4: more than 1 needs a CUDA device"),
    (["--configs", "dst", "--arch", "NASNet"], "--arch = 'NASNet': dst cannot derive it: normal: the genotype has 5"),
    (["--configs", "dst", "entrannas", "--arch", "DARTS_V2", f"entrannas={DST_GENOTYPE}"],
     "dst-digits.json': entrannas cannot derive it: normal: node 3 takes 3 input(s)"),
])
def test_bench_refuses_bad_input_before_timing(args, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "Timed", lambda *a: pytest.fail("timed despite bad input"))
    assert bench_main([*args, "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err


def test_a_failing_configuration_spares_the_others(capsys, monkeypatch, tmp_path):
    block = bench.Timed.block

    def flaky(self):   # fails in the second round
        if self.label == "entrannas" and self.blocks:
            raise RuntimeError("out of memory")
        return block(self)

    monkeypatch.setattr(bench.Timed, "block", flaky)
    out = tmp_path / "b.json"
    assert bench_main(["--configs", "darts", "entrannas", "dst", "--layers", "3", "--channels", "4",
                       "--batch-size", "4", "--image-size", "8", "--steps", "1", "--repeats", "2", "--warmup", "1",
                       "--device", "cpu", "--out", str(out)]) == 1
    rows = json.loads(out.read_text())["results"]
    assert [r["config"] for r in rows] == ["darts", "entrannas", "dst"]
    assert rows[1] == {"config": "entrannas", "error": "RuntimeError: out of memory"}
    assert rows[2]["speedup_vs_darts"] > 0
    assert "failed: RuntimeError: out of memory" in capsys.readouterr().err


def test_configurations_are_timed_in_turns_in_wall_and_cpu_time_on_fixed_threads(capsys, monkeypatch):
    """A B C A B C: a change in the machine's load falls on every configuration alike; each round's
    block in wall and process CPU time, the median of each reported with its spread."""
    order = []
    block = bench.Timed.block
    monkeypatch.setattr(bench.Timed, "block", lambda self: (order.append(self.label), block(self))[1])
    threads = torch.get_num_threads()
    try:
        assert bench_main(["--configs", "darts", "entrannas", "dst", "--layers", "3", "--channels", "4",
                           "--batch-size", "4", "--image-size", "8", "--steps", "2", "--repeats", "3",
                           "--warmup", "1", "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert order == ["darts", "entrannas", "dst"] * 3
    doc = json.loads(capsys.readouterr().out)
    assert doc["threads"] == 1   # fixed on the CPU unless --threads says otherwise
    darts = doc["results"][0]
    for r in doc["results"]:
        assert len(r["seconds_per_step_blocks"]) == len(r["cpu_seconds_per_step_blocks"]) == 3
        assert r["cpu_seconds_per_step"] == sorted(r["cpu_seconds_per_step_blocks"])[1] > 0
        blocks = r["seconds_per_step_blocks"]
        assert r["seconds_per_step_spread"] == pytest.approx((max(blocks) - min(blocks)) / sorted(blocks)[1])
        assert r["speedup_vs_darts_cpu_time"] == pytest.approx(darts["cpu_seconds_per_step"] / r["cpu_seconds_per_step"])


def test_releasing_a_configuration_runs_on_every_device_kind(monkeypatch):
    """The clean-up between configurations once failed on CUDA only (a local import shadowed torch);
    run its CUDA branch here with the cache release stubbed."""
    released = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(True))
    bench._release(torch.device("cuda"))
    assert released == [True]


def _pool_gradient_by_loops(g: torch.Tensor, size: int, stride: int, offset: int) -> torch.Tensor:
    """avg_pool2d's input gradient (3x3, padding 1, count_include_pad=False) as CUDA's kernels state it,
    pixel by pixel: pixel (h, w) takes every window that covers padded position (h + offset, w + offset).
    offset 1 (the padding) is the NCHW kernel; offset 0 the channels_last one before its fix."""
    out = torch.zeros(g.shape[:2] + (size, size), dtype=g.dtype)
    pooled = g.shape[-1]

    def in_image(start: int) -> int:   # how many of a window's rows (or columns) lie in the image
        return min(start + 3, size) - max(start, 0)

    for h, w, ph, pw in itertools.product(range(size), range(size), range(pooled), range(pooled)):
        if ph * stride <= h + offset < ph * stride + 3 and pw * stride <= w + offset < pw * stride + 3:
            out[..., h, w] += g[..., ph, pw] / (in_image(ph * stride - 1) * in_image(pw * stride - 1))
    return out


@pytest.mark.parametrize("stride,size", [(1, 5), (2, 6), (2, 5)])
def test_the_imitated_pool_kernel_is_the_one_pytorch_fixed(stride, size):
    """tests/imitated_pool.py: in NCHW its pool gradient is autograd's; in channels_last it is the
    broken kernel's, stated pixel by pixel (the loops agree with autograd at the padding offset)."""
    bug = imitated_pool
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    g = torch.randn(2, 3, (size - 1) // stride + 1, (size - 1) // stride + 1, dtype=torch.float64)
    grads = {}
    with bug.imitate_pool_grad_bug():
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout).requires_grad_(True)
            y = F.avg_pool2d(xi, 3, stride, 1, count_include_pad=False)
            grads[layout] = torch.autograd.grad(y, xi, g.contiguous(memory_format=layout))[0]
    xi = x.clone().requires_grad_(True)
    right = torch.autograd.grad(F.avg_pool2d(xi, 3, stride, 1, count_include_pad=False), xi, g)[0]
    torch.testing.assert_close(_pool_gradient_by_loops(g, size, stride, offset=1), right)
    torch.testing.assert_close(grads[torch.contiguous_format], right)
    torch.testing.assert_close(grads[torch.channels_last], _pool_gradient_by_loops(g, size, stride, offset=0))
    assert not torch.allclose(grads[torch.channels_last], right)


@pytest.mark.parametrize("channels", [3, 1])
def test_avg_pool_probes_for_the_broken_kernel_and_pools_around_it(monkeypatch, channels):
    """ops.AvgPool: with the imitated kernel the probe finds it wrong, and a channels_last input then gets
    NCHW's gradient and a channels_last output; told the kernel is right, the wrong gradient comes through.
    One channel: channels_last strides with ``is_contiguous()`` true, which the kernel still runs in
    channels_last."""
    from entrannas import ops

    bug = imitated_pool
    cpu = torch.device("cpu")
    assert ops.pool_grad_is_wrong(cpu) is False   # the CPU's own kernel
    pool = ops.OPS["avg_pool_3x3"](channels, 1, False)
    x = torch.randn(2, channels, 6, 6)
    g = torch.randn(2, channels, 6, 6)
    xi = x.clone().requires_grad_(True)
    right = torch.autograd.grad(pool(xi), xi, g)[0]

    def channels_last_pass():   # clone, not contiguous: one channel is already contiguous in channels_last
        xi = x.clone(memory_format=torch.channels_last).requires_grad_(True)
        y = pool(xi)
        return y, torch.autograd.grad(y, xi, g.clone(memory_format=torch.channels_last))[0]

    with bug.imitate_pool_grad_bug():
        y, grad = channels_last_pass()
        assert ops.pool_grad_is_wrong(cpu) is True
        assert y.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous() == (channels == 1)
        torch.testing.assert_close(grad, right)
        ops._POOL_GRAD_WRONG[cpu] = False
        assert not torch.allclose(channels_last_pass()[1], right, atol=1e-4)
    assert ops.pool_grad_is_wrong(cpu) is False   # the imitation leaves nothing behind
    # where it cannot probe (a CUDA graph being recorded, torch.compile tracing), it takes the safe way
    monkeypatch.setattr(ops, "_POOL_GRAD_WRONG", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert ops.pool_grad_is_wrong(cpu) is True and ops._POOL_GRAD_WRONG == {}


@pytest.mark.parametrize("fixed", [True, False])
def test_a_channels_last_search_has_the_right_gradients_despite_a_wrong_pool_kernel(fixed):
    """Settled DST (its genotype has avg_pool_3x3 edges) in channels_last with the imitated kernel,
    checked against NCHW eager: the same gradients with the fix; far off without it."""
    from entrannas import ops

    bug = imitated_pool
    net = tiny_net(seed=0, mode="dst", channels_last=True)
    net.set_architecture(load_genotype(str(DST_GENOTYPE)))
    opt = BilevelOptimizer(net, tiny_config(mode="dst", channels_last=True))
    with bug.imitate_pool_grad_bug():
        if not fixed:
            ops._POOL_GRAD_WRONG[torch.device("cpu")] = False
        check = check_against_eager(opt, tiny_batch(0, n=16))["weight_pass"]
    if fixed:
        assert check["grad_cosine"] > 0.99999
    else:
        assert check["grad_cosine"] < 0.99
    assert check["logits_max_rel_error"] < 1e-5   # the forward pass is right either way


def test_the_end_to_end_benchmark_times_whole_search_commands(tmp_path, capsys):
    """benchmarks/e2e.py, tiny: each configuration a real ``search`` process on a CIFAR-format copy of
    the learnable set; per-epoch phases, structures per epoch and peak memory in its JSON."""
    from e2e import main as e2e_main

    out = tmp_path / "e2e.json"
    tiny = ["--set", "layers=3", "--set", "init_channels=4", "--set", "batch_size=32", "--set", "arch_warmup_epochs=1"]
    assert e2e_main(["--configs", "darts", "entrannas", "dst", "--epochs", "2", "--darts-epochs", "2",
                     "--train-images", "200", "--test-images", "50", "--device", "cpu", "--data", str(tmp_path / "d"),
                     *tiny, "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == doc
    assert (tmp_path / "d" / "cifar-10-batches-py" / "data_batch_5").is_file()
    darts, entrannas, dst = doc["results"]
    for r in doc["results"]:
        assert r["epochs_run"] == 2 and not r["projected"] and not r["stopped_at_time_limit"]
        assert r["wall_seconds"] > r["startup_seconds"] > 0
        assert r["search_minutes"] == pytest.approx(r["wall_seconds"] / 60)
        first, second = r["epochs"]
        assert (first["arch_updated"], second["arch_updated"]) == (False, True)
        for e in r["epochs"]:
            assert e["train"] > 0 and e["valid"] > 0 and e["other"] >= 0
            assert e["wall"] == pytest.approx(e["train"] + e["valid"] + e["other"])
            assert e["architectures"] >= 1 and e["peak_memory_mb"] > 0
        assert r["architectures_per_epoch"] == [e["architectures"] for e in r["epochs"]]
        # the epochs, timed from the lines the command printed, fit in the process's wall time
        assert r["startup_seconds"] + sum(e["wall"] for e in r["epochs"]) <= r["wall_seconds"]
        assert r["peak_memory_mb"] == max(e["peak_memory_mb"] for e in r["epochs"])
    assert darts["speedup_vs_darts"] == 1.0
    assert entrannas["speedup_vs_darts"] == pytest.approx(darts["search_minutes"] / entrannas["search_minutes"])


def test_the_end_to_end_benchmark_projects_a_search_stopped_at_its_time_limit(tmp_path, capsys):
    from e2e import main as e2e_main

    tiny = ["--set", "layers=3", "--set", "init_channels=4", "--set", "batch_size=32", "--set", "arch_warmup_epochs=1"]
    assert e2e_main(["--configs", "entrannas", "--epochs", "500", "--train-images", "200", "--test-images", "50",
                     "--device", "cpu", "--time-limit", "12", *tiny]) == 0
    (row,) = json.loads(capsys.readouterr().out)["results"]
    assert row["stopped_at_time_limit"] and row["projected"] and 2 <= row["epochs_run"] < 500
    full = statistics.median(e["wall"] for e in row["epochs"] if e["arch_updated"])
    warm = row["epochs"][0]["wall"]
    # 1 warm-up epoch, 399 with architecture steps and the 100 settling ones (500 // 5) at their time
    assert row["search_minutes"] == pytest.approx((row["startup_seconds"] + warm + 499 * full) / 60)
