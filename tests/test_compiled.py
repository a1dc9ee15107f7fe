"""The compiled super-net computes what the eager one computes, per derived structure.

On the CPU the graphs go through dynamo and AOTAutograd with the ``aot_eager`` backend (inductor's
C++ code generation takes minutes here); ``ENTRANNAS_TEST_DEVICE=cuda`` runs the same tests with
inductor and CUDA graphs, ``ENTRANNAS_TEST_COMPILE=cudagraphs/default`` with another backend/mode,
``ENTRANNAS_TEST_COMPILE=capture`` with CUDA graphs recorded without torch.compile
(``benchmarks/gpu_session.sh`` runs them). The policy of ``compile: capture`` (when to record, which
recordings to keep) is checked on the CPU with a stand-in recorder.
"""

import os
import warnings
from unittest import mock

import pytest
import torch

from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from entrannas import derive

from entrannas.bilevel import BilevelOptimizer
from entrannas.compiled import CAPTURE_AFTER, DEFAULT_AFTER, CapturedStructures, CompiledStructures
from entrannas.config import ConfigError, check_device_support
from entrannas.supernet import Structure

from conftest import cotangent_loss, record_as_is, tiny_batch, tiny_config, tiny_net

DEVICE = torch.device(os.environ.get("ENTRANNAS_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"
# BACKEND/MODE, e.g. cudagraphs/default, or capture; the default is inductor with CUDA graphs on a GPU.
_setting = os.environ.get("ENTRANNAS_TEST_COMPILE", "inductor/reduce-overhead" if ON_CUDA else "aot_eager/default")
_backend, _mode = ("inductor", "capture") if _setting == "capture" else _setting.split("/")
COMPILE = dict(mode=_mode, backend=_backend)
# Inductor reorders float arithmetic and may pick other conv algorithms; aot_eager runs the same kernels.
TOL = dict(rtol=1e-3, atol=1e-4) if ON_CUDA else dict(rtol=1e-5, atol=1e-6)
if ON_CUDA:   # compare real fp32 on both paths, not TF32 convolutions
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def batch(seed):
    return tiny_batch(seed, device=DEVICE)


def pair(mode, after=1, **changes):
    """Two identical nets, the second compiled."""
    eager, fast = (tiny_net(seed=0, mode=mode, **changes).to(DEVICE) for _ in range(2))
    fast.compile_structures(**COMPILE, after=after)
    return eager, fast


def grads(net):
    return [p.grad.clone() if p.grad is not None else None for p in net.parameters()]


@torch.no_grad()
def switch_transit_structure(*nets):
    """A new derived structure for the tiny nets' Transit-cell (cell 2, a reduction cell): max_pool
    on edge 0."""
    for net in nets:
        net.alpha_reduce[0, net.primitives.index("max_pool_3x3")] += 3.0


def assert_grads_close(fast, eager, rtol, atol):
    """Each gradient within ``rtol`` of the eager one, plus ``atol`` times the largest eager gradient:
    gradients span orders of magnitude, and some are 0 up to rounding (a weight that the batch norm
    right after it makes scale-free), which another order of summation leaves at another rounding."""
    scale = max(g.abs().max().item() for g in eager if g is not None)
    for a, b in zip(fast, eager):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


# op_streams > 1 runs with capture or eagerly (torch.compile is refused): on a GPU the recorded graphs
# then branch, and they must still compute what one stream computes eagerly.
STREAMS = [("dst", "sparse", 4), ("entrannas", "masked", 4)] if _mode == "capture" else []


# channels_last runs other kernels than NCHW: on a GPU one of them was wrong (CUDA's avg-pool backward,
# pytorch/pytorch#188344) and got past the comparisons of one layout. DST at its initial state runs every
# op on every edge, pools included.
LAYOUTS = [("dst", "sparse", 1, True), ("entrannas", "sparse", 1, True)]


@pytest.mark.parametrize("mode,transit,op_streams,channels_last",
                         [("entrannas", "sparse", 1, False), ("dst", "sparse", 1, False),
                          ("entrannas", "masked", 1, False)] + [s + (False,) for s in STREAMS] + LAYOUTS)
def test_compiled_pass_matches_eager_outputs_and_gradients(mode, transit, op_streams, channels_last):
    """Against the eager pass in NCHW on one stream."""
    eager = tiny_net(seed=0, mode=mode, transit=transit).to(DEVICE)
    fast = tiny_net(seed=0, mode=mode, transit=transit, op_streams=op_streams,
                    channels_last=channels_last).to(DEVICE)
    # the other layout's kernels add up in another order (a wrong kernel is off by far more)
    tol = dict(rtol=1e-3, atol=1e-5) if channels_last and not ON_CUDA else TOL
    fast.compile_structures(**COMPILE, after=1)
    x, _ = batch(0)
    for arch_grad in (True, False):          # the arch step's pass and the weight step's
        out = [net(x, arch_grad=arch_grad) for net in (eager, fast)]
        torch.testing.assert_close(out[1], out[0], **tol)
        for o in out:
            cotangent_loss(o).backward()
        assert_grads_close(grads(fast), grads(eager), **tol)
        for net in (eager, fast):
            net.zero_grad(set_to_none=True)
    with torch.no_grad():                    # evaluation: a forward-only pass
        out = [net(x, arch_grad=False) for net in (eager, fast)]
    torch.testing.assert_close(out[1], out[0], **tol)
    assert fast.compiled.stats["compiled_calls"] == 3 and fast.compiled.stats["eager_calls"] == 0


def test_compiled_bf16_passes_match_eager_bf16():
    """Under the bi-level optimizer's bf16 autocast (capture refuses autocast's weight cache)."""
    eager, fast = pair("dst")
    opts = [BilevelOptimizer(net, tiny_config(mode="dst", precision="bf16")) for net in (eager, fast)]
    x, y = batch(1)
    results = []
    for opt in opts:
        arch_loss, _ = opt.frozen_arch_loss(x, y)
        arch_loss.backward()
        weight_loss, logits = opt.weight_loss(x, y)
        weight_loss.backward()
        results.append((logits.float(), torch.cat([p.grad.flatten() for p in opt.model.parameters()
                                                   if p.grad is not None])))
    (fast_logits, fast_grads), (eager_logits, eager_grads) = results[1], results[0]
    assert fast_grads.shape == eager_grads.shape
    assert (fast_logits - eager_logits).abs().max() <= 2e-2 * eager_logits.abs().max()
    assert torch.nn.functional.cosine_similarity(fast_grads, eager_grads, dim=0) > 0.99
    assert fast.compiled.stats["eager_calls"] == 0


@pytest.mark.parametrize("transit", ["sparse", "masked", "auto"])
def test_compiled_search_follows_the_eager_trajectory(transit):
    """Several bi-level steps, a derived structure that changes once (by hand), eager and compiled
    calls mixed by the hotness rule: the weights and alpha end where the eager run's end. Masked
    Transit-cells run one structure throughout, so it is built once. ``auto`` runs the masked
    structure while the derived one is not yet built (the eager net, not compiled, runs sparse)."""
    eager, fast = pair("entrannas", after=2, transit=transit)
    opts = [BilevelOptimizer(net, tiny_config(mode="entrannas", arch_lr=1e-6, transit=transit))
            for net in (eager, fast)]
    for step in range(5):
        if step == 3:
            switch_transit_structure(eager, fast)
        for opt in opts:
            opt.step(batch(step), batch(100 + step), update_arch=True)
    # auto's masked passes add the derived ops in another order than the eager net's sparse ones, and
    # 0-weighted terms besides: in fp32 the two trajectories part by rounding (1.1e-6 with torch 2.14.1,
    # 1.3e-6 with 2.5.1 after these 5 steps); the float64 test below finds them equal to 1e-9.
    tol = dict(TOL, atol=max(TOL["atol"], 1e-5)) if transit == "auto" else TOL
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, **tol, msg=name)
    stats = fast.compiled.stats
    assert stats["compiles"] == {"sparse": 2, "masked": 1, "auto": 3}[transit]
    assert stats["compiled_calls"] > 0 and stats["eager_calls"] > 0
    if transit != "sparse":   # the masked structure's first use per kind of pass (after=2), then built
        assert stats["eager_calls"] == 2
    if transit == "auto":     # per kind of pass: the first structure's first step, the second's
        assert stats["fallback_calls"] == 4


def test_a_structure_is_compiled_once_it_has_run_after_times_in_a_row():
    calls = []
    runner = CompiledStructures(lambda plans, x: "eager", mode="default", backend="eager", after=3, capacity=2)
    runner._compiled = lambda plans, x: calls.append(plans) or "compiled"
    x = torch.zeros(1)
    a, b, c = (Structure(masks=(), plans=(name,), key=name.encode()) for name in "abc")
    with pytest.warns(UserWarning, match="compile_cache"):
        seen = [runner(s, x) for s in (a, a, b, a, a, a, a, b, b, b, c, c, c)]
    assert seen == ["eager"] * 5 + ["compiled", "compiled"] + ["eager", "eager", "compiled"] + ["eager"] * 3
    assert runner.stats == {"compiles": 2, "compiled_calls": 3, "eager_calls": 10}
    assert runner(a, x) == "compiled"     # compiled once, compiled for good
    with torch.no_grad():                 # another kind of pass starts its own streak
        assert runner(a, x) == "eager"


def test_more_structures_than_dynamos_default_recompile_limit_all_get_compiled():
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def scale(plans, x):              # the plan drives Python control flow, as a cell's plan does
        for factor in plans:
            x = x * factor
        return x

    runner = CompiledStructures(scale, backend=counting_backend, after=1, capacity=20)
    x = torch.ones(3)
    for n in range(1, 13):            # 12 structures; dynamo's default limit is 8 per function
        structure = Structure(masks=(), plans=tuple(range(1, n + 1)), key=bytes([n]))
        assert runner(structure, x)[0].item() == torch.arange(1, n + 1).prod().item()
    assert len(graphs) == 12 and runner.stats["compiled_calls"] == 12


@pytest.mark.parametrize("mode,transit,compiled", [("dst", "sparse", False), ("entrannas", "sparse", False),
                                                   ("entrannas", "masked", False), ("entrannas", "masked", True)])
def test_a_search_step_waits_for_the_device_once(mode, transit, compiled):
    """The derived structure is read on the host once per step (masked Transit-cells: the mask, to
    drop the gradients of the ops left out); nothing else in a step syncs, compiled or recorded
    passes included (masked: one structure, built in the first step). On a GPU CUDA's sync debug
    mode counts every synchronising call; on the CPU the count of derivations (each one host read)
    stands in for it."""
    net = tiny_net(seed=0, mode=mode, transit=transit).to(DEVICE)
    if compiled:
        net.compile_structures(**COMPILE, after=1)
    opt = BilevelOptimizer(net, tiny_config(mode=mode, transit=transit))
    opt.step(batch(0), batch(100), update_arch=True)     # the first step also derives for the new tau
    batches = [(batch(s), batch(100 + s)) for s in range(1, 4)]   # copied to the device beforehand
    before = net.derivations
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            for train, valid in batches:
                opt.step(train, valid, update_arch=True)
        finally:
            if ON_CUDA:
                torch.cuda.set_sync_debug_mode("default")
    assert net.derivations - before == 3
    if compiled:
        assert net.compiled.stats["compiles"] == 1 and net.compiled.stats["eager_calls"] == 0
    if ON_CUDA:
        # One warning per synchronising call; the first use of the debug mode also warns that it is a
        # prototype ("...does not yet detect all synchronizing operations"), which is not a sync.
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        assert len(syncs) == 3, [str(w.message) for w in caught]


class _HostReads(TorchDispatchMode):
    """Records the ops that, on a GPU, would wait for it: those whose output size depends on the
    data (on meta tensors they raise) and copies between the host and the device."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        try:
            out = func(*args, **(kwargs or {}))
        except NotImplementedError as err:   # nonzero, item, masked_select, ... have no meta kernel
            self.reads.append(f"{func}: {str(err)[:80]}")
            raise
        devices = {t.device.type for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)}
        if len(devices) > 1:
            self.reads.append(f"{func} on {sorted(devices)}")
        return out


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_the_derivation_and_a_masked_pass_read_nothing_on_the_host(mode):
    """On meta tensors (shapes, no data), so on any machine: deriving the masks on the device
    (``device_masks``) and a whole masked forward and backward pass read no data on the host.
    The top-2 rule once picked each node's edges with a boolean index, a GPU sync per cell type and pass."""
    net = tiny_net(seed=0, mode=mode, transit="masked").to("meta")
    x = torch.empty(4, 1, 8, 8, device="meta")
    net(x)   # caches built once per device (the plan's index tensors) are copies from the host
    recorder = _HostReads()
    with recorder:
        masks = net.device_masks(net.arch_weights(detach=True))
        net(x).sum().backward()
    assert recorder.reads == []
    assert masks.shape == (2, derive.num_edges(net.spec.nodes), len(net.primitives)) and masks.dtype == torch.bool


def _structures(names):
    return [Structure(masks=(), plans=(name,), key=name.encode()) for name in names]


def recording_runner(after=2, capacity=2, net=None):
    """A ``CapturedStructures`` whose recorder is a stand-in that notes what it was asked to record."""
    recorded = []

    def record(fn, net, plans, args, pool):
        recorded.append(plans[0])
        return lambda *a: "graph " + plans[0]

    net = net if net is not None else nn.Linear(1, 1)
    runner = CapturedStructures(lambda plans, x: "eager " + plans[0], net, after=after, capacity=capacity,
                                capture=record)
    return runner, recorded


def test_capture_records_a_hot_structure_and_keeps_the_most_recently_used():
    runner, recorded = recording_runner(after=2, capacity=2)
    a, b, c = _structures("abc")
    x = torch.zeros(1)
    seen = [runner(s, x) for s in (a, a, a, b, b, a, c, c, a, b, b)]
    assert seen == ["eager a", "graph a", "graph a", "eager b", "graph b", "graph a",
                    "eager c", "graph c",    # recording c drops b, the least recently used
                    "graph a", "eager b", "graph b"]   # b is recorded again and drops c (a ran after c)
    assert recorded == ["a", "b", "c", "b"]
    assert runner.stats == {"compiles": 4, "captures": 4, "evictions": 2, "compiled_calls": 7, "eager_calls": 4}
    assert runner(c, x) == "eager c"


def test_a_fallback_runs_instead_of_the_eager_pass_until_the_structure_is_built():
    """``transit: auto``'s rule: a use through the fallback counts towards the structure's streak."""
    runner, recorded = recording_runner(after=2, capacity=4)
    a, b = _structures("ab")
    x = torch.zeros(1)
    seen = [runner(s, x, fallback=lambda: "masked") for s in (a, a, a, b, a, b, b)]
    assert seen == ["masked", "graph a", "graph a", "masked", "graph a", "graph b", "graph b"]
    assert recorded == ["a", "b"]
    assert runner.stats["fallback_calls"] == 2 and runner.stats["eager_calls"] == 0


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_auto_transit_follows_the_sparse_search_while_the_structure_churns(mode):
    """``transit: auto`` with built passes (a stand-in recorder, float64, on the CPU): a search whose
    derived architecture changes at most steps runs the masked structure at most passes and ends
    where the sparse search ends. So the ops a masked pass runs outside the derived set get no
    gradient (SGD's momentum and weight decay leave them alone), and no pass reads the device
    beyond the one derivation per step, nor derives the masks again on the device: a masked pass
    weights by the ones derived for the step."""
    sparse, auto = tiny_net(seed=0, mode=mode).double(), tiny_net(seed=0, mode=mode, transit="auto").double()
    auto.compiled = CapturedStructures(auto.run_structure, auto, after=2, capture=record_as_is)
    auto.device_masks = mock.Mock(wraps=auto.device_masks)   # counts the derivations on the device
    opts = [BilevelOptimizer(net, tiny_config(mode=mode, arch_lr=0.05, beta_lr=5.0, transit=net.spec.transit))
            for net in (sparse, auto)]
    derived = set()
    for step in range(8):
        for opt in opts:
            opt.step(tiny_batch(step, dtype=torch.float64), tiny_batch(100 + step, dtype=torch.float64),
                     update_arch=True)
        assert auto.last_structure.key == sparse.last_structure.key
        derived.add(sparse.last_structure.key)
    for (name, a), b in zip(auto.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert auto.derivations == sparse.derivations == auto.device_masks.call_count
    assert len(derived) >= 4 and auto.compiled.stats["fallback_calls"] >= 6
    assert auto.compiled.stats["compiled_calls"] > auto.compiled.stats["eager_calls"]


def test_capture_records_each_kind_of_pass_and_frozen_weights_are_another_kind():
    net = nn.Linear(1, 1)
    runner, recorded = recording_runner(after=1, capacity=4, net=net)
    (a,) = _structures("a")
    x = torch.zeros(1)
    assert runner(a, x) == "graph a"
    net.weight.requires_grad_(False)      # the arch step freezes the weights: other gradients to record
    assert runner(a, x) == "graph a"
    with torch.no_grad():
        assert runner(a, x) == "graph a"
    net.weight.requires_grad_(True)
    assert runner(a, x) == "graph a"
    assert recorded == ["a", "a", "a"] and runner.stats["compiles"] == 1 and runner.stats["captures"] == 3


def test_training_and_evaluation_mode_are_recorded_apart():
    """A recorded pass keeps the batch norms' mode of its recording: a pass without gradients in
    training mode (batch statistics) must not replay one recorded in evaluation mode."""
    net = nn.Sequential(nn.BatchNorm1d(1))
    runner, recorded = recording_runner(after=1, capacity=4, net=net)
    (a,) = _structures("a")
    x = torch.zeros(1)
    with torch.no_grad():
        net.eval()
        assert runner(a, x) == "graph a"
        net.train()
        assert runner(a, x) == "graph a"
    net.eval()
    assert runner(a, x) == "graph a"
    assert recorded == ["a", "a", "a"] and runner.stats["captures"] == 3


def test_moving_the_net_forgets_its_recordings():
    net = tiny_net(seed=0, mode="entrannas")
    runner, recorded = recording_runner(after=1, net=net)
    net.compiled = runner
    (a,) = _structures("a")
    x = torch.zeros(1)
    runner(a, x)
    net.to(torch.float64)                 # new parameter tensors: the recordings would read the old ones
    assert runner(a, x) == "graph a" and recorded == ["a", "a"]


def test_capture_needs_a_cuda_device_and_the_first_order_step():
    config = tiny_config(compile="capture")
    assert config.compile_after == CAPTURE_AFTER and tiny_config(compile="default").compile_after == DEFAULT_AFTER
    with pytest.raises(ConfigError, match="compile = 'capture': records CUDA graphs, so it needs a CUDA device"):
        check_device_support(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="compile = 'capture': records the first-order step's passes"):
        tiny_config(compile="capture", unrolled=True)
    if ON_CUDA:
        check_device_support(config, DEVICE)


def test_op_streams_need_a_cuda_device_and_no_torch_compile():
    config = tiny_config(op_streams=4)
    with pytest.raises(ConfigError, match="op_streams = 4: more than 1 needs a CUDA device"):
        check_device_support(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="op_streams = 4: more than 1 runs with compile: off or capture"):
        tiny_config(op_streams=4, compile="default", compile_backend="aot_eager")
    with pytest.raises(ConfigError, match="op_streams = 0: must be"):
        tiny_config(op_streams=0)
    assert tiny_config(op_streams=4, compile="capture").op_streams == 4
    if ON_CUDA:
        check_device_support(config, DEVICE)


class ReplayedPass:
    """``torch.cuda.make_graphed_callables`` on the CPU, as far as its tensors go: the pass runs
    eagerly, but like a replayed graph it hands back tensors that the next replay overwrites. Each
    forward copies the inputs into the recorded ones and returns a detached alias of one output
    buffer; each backward writes the gradients into one buffer per input and parameter and returns
    detached aliases of those. ``AccumulateGrad`` keeps such an alias as the parameter's ``.grad``
    rather than copying it, so a ``.grad`` changes under the next backward of the same pass:
    pytorch/pytorch#181723, which corrupts gradients accumulated over two backward passes."""

    def __init__(self, module, sample_args, num_warmup_iters, allow_unused_input, pool):
        assert all(a.is_leaf for a in sample_args) and allow_unused_input
        self.module, self.inputs, self.params = module, tuple(sample_args), tuple(module.parameters())
        self.surface = self.inputs + self.params
        self.wanted = [t.requires_grad for t in self.surface]   # as recorded
        self.targets = [t for t, w in zip(self.surface, self.wanted) if w]
        self.output, self.grads, self.last = None, [None] * len(self.surface), None
        replayed = self

        class Replay(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *surface):
                for static, x in zip(replayed.inputs, surface):
                    static.copy_(x)
                with torch.enable_grad():
                    out = replayed.module(*replayed.inputs)
                if replayed.output is None:
                    replayed.output = torch.empty_like(out)
                replayed.output.copy_(out.detach())
                replayed.last = out
                return replayed.output.detach()

            @staticmethod
            def backward(ctx, grad):
                found = iter(torch.autograd.grad(replayed.last, replayed.targets, grad, allow_unused=True))
                returned = []
                for i, w in enumerate(replayed.wanted):
                    g = next(found) if w else None
                    if g is None:
                        returned.append(None)
                        continue
                    if replayed.grads[i] is None:
                        replayed.grads[i] = torch.empty_like(g)
                    replayed.grads[i].copy_(g)
                    returned.append(replayed.grads[i].detach())
                return tuple(returned)

        self.replay = Replay

    def __call__(self, *args):
        return self.replay.apply(*args, *self.params)


# Clipping rescales the aliased buffers in place; it can also hide a doubled gradient (the same
# direction: on one structure it did), so the search runs once without it.
@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_recorded_passes_give_the_eager_search_even_where_their_buffers_alias_the_gradients(grad_clip, monkeypatch):
    """``capture_cuda_graphs`` on the CPU, with ``ReplayedPass`` for make_graphed_callables (CUDA only):
    it gets the pass and leaf copies of its inputs, and bi-level steps through the recorded passes (two
    structures) follow the eager ones although the weights' ``.grad`` are the recording's buffers, overwritten
    at each weight step's backward: every weight step starts from ``.grad = None``, and nothing
    reads a gradient after the next backward of its pass."""
    import entrannas.compiled as compiled

    recordings = []

    def record(*args, **kwargs):
        recordings.append(ReplayedPass(*args, **kwargs))
        return recordings[-1]

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    eager, fast = tiny_net(seed=0, mode="dst"), tiny_net(seed=0, mode="dst")
    fast.compiled = CapturedStructures(fast.run_structure, fast, after=1, capture=compiled.capture_cuda_graphs)
    opts = [BilevelOptimizer(net, tiny_config(mode="dst", grad_clip=grad_clip)) for net in (eager, fast)]
    for step in range(6):
        if step == 3:
            switch_transit_structure(eager, fast)
        for opt in opts:   # CPU batches on a GPU test run too: the nets stay on the CPU
            opt.step(tiny_batch(step), tiny_batch(100 + step), update_arch=True)
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # per structure, the arch pass (weights frozen: only alpha and beta require grad) and the weight pass
    assert [(r.wanted[:3], set(r.wanted[3:])) for r in recordings] == 2 * [
        ([False, True, True], {False, True}), ([False, False, False], {True})]
    assert fast.compiled.stats["compiled_calls"] == 12
    weight_pass = recordings[3]
    buffers = {g.untyped_storage().data_ptr() for g in weight_pass.grads if g is not None}
    aliased = [p for p in fast.parameters() if p.grad is not None and p.grad.untyped_storage().data_ptr() in buffers]
    assert len(aliased) == len(buffers) > 0


def test_a_pass_that_cannot_be_recorded_runs_eagerly_with_a_warning():
    def failing(fn, net, plans, args, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = CapturedStructures(lambda plans, x: "eager " + plans[0], nn.Linear(1, 1), after=1, capture=failing)
    (a,) = _structures("a")
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="runs eagerly .RuntimeError: operation not permitted"):
        assert runner(a, x) == "eager a"
    assert runner(a, x) == "eager a"       # not tried again
    assert runner.stats["capture_failures"] == 1 and runner.stats["captures"] == 1
    assert runner.stats["eager_calls"] == 2 and runner.stats["compiled_calls"] == 0
