"""The CUDA-graph fast path (``cuda_graphs: true``) computes what the eager super-net computes.

The policy (when to record a derived architecture's passes, which recordings to keep) is checked on
the CPU with a stand-in recorder, and the recording itself with ``ReplayedPass``, which imitates the
tensors a replayed graph hands back. ``ENTRANNAS_TEST_DEVICE=cuda`` runs the comparisons with real
CUDA graphs on a GPU (``benchmarks/gpu_session.sh``).
"""

import os
import warnings

import pytest
import torch

from torch import nn

from entrannas.bilevel import BilevelOptimizer
from entrannas.config import ConfigError, check_device_support
from entrannas.cuda_graphs import CudaGraphs, capture_cuda_graphs
from entrannas.supernet import Derived

from conftest import tiny_batch, tiny_config, tiny_net

DEVICE = torch.device(os.environ.get("ENTRANNAS_TEST_DEVICE", "cpu"))
ON_CUDA = DEVICE.type == "cuda"
if ON_CUDA:   # compare real fp32 on both paths, not TF32 convolutions
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def batch(seed):
    return tiny_batch(seed, device=DEVICE)


@torch.no_grad()
def switch_transit_structure(*nets):
    """A new derived architecture for the tiny nets' Transit-cell (cell 2, a reduction cell):
    max_pool on edge 0."""
    for net in nets:
        net.alpha_reduce[0, net.primitives.index("max_pool_3x3")] += 3.0
        net.arch_changed()


@pytest.mark.parametrize("mode,graphs", [("dst", False), ("entrannas", False), ("dst", True)])
def test_a_search_step_waits_for_the_device_once(mode, graphs):
    """The derived architecture is read on the host once per step (``derive()`` after the arch
    update); nothing else in a step syncs, recorded passes included. On a GPU CUDA's sync debug mode
    counts every synchronising call; on the CPU the count of derivations (each one host read)
    stands in for it."""
    net = tiny_net(seed=0, mode=mode).to(DEVICE)
    if graphs and ON_CUDA:
        net.use_cuda_graphs(after=1)
    opt = BilevelOptimizer(net, tiny_config(mode=mode))
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
    if graphs and ON_CUDA:
        assert net.cuda_graphs.stats["eager_calls"] == 0
    if ON_CUDA:
        # One warning per synchronising call; the first use of the debug mode also warns that it is a
        # prototype ("...does not yet detect all synchronizing operations"), which is not a sync.
        syncs = [w for w in caught if "called a synchronizing CUDA operation" in str(w.message)]
        assert len(syncs) == 3, [str(w.message) for w in caught]


def _structures(names):
    return [Derived(masks=(), plans=(name,), key=name.encode(), device=torch.device("cpu")) for name in names]


def recording_runner(after=2, capacity=2, net=None):
    """A ``CudaGraphs`` whose recorder is a stand-in that notes what it was asked to record."""
    recorded = []

    def record(fn, net, plans, args, pool):
        recorded.append(plans[0])
        return lambda *a: "graph " + plans[0]

    net = net if net is not None else nn.Linear(1, 1)
    runner = CudaGraphs(lambda plans, x: "eager " + plans[0], net, after=after, capacity=capacity,
                                capture=record)
    return runner, recorded


def test_a_hot_architecture_is_recorded_and_the_most_recently_used_are_kept():
    runner, recorded = recording_runner(after=2, capacity=2)
    a, b, c = _structures("abc")
    x = torch.zeros(1)
    seen = [runner(s, x) for s in (a, a, a, b, b, a, c, c, a, b, b)]
    assert seen == ["eager a", "graph a", "graph a", "eager b", "graph b", "graph a",
                    "eager c", "graph c",    # recording c drops b, the least recently used
                    "graph a", "eager b", "graph b"]   # b is recorded again and drops c (a ran after c)
    assert recorded == ["a", "b", "c", "b"]
    assert runner.stats == {"captures": 4, "evictions": 2, "recorded_calls": 7, "eager_calls": 4}
    assert runner(c, x) == "eager c"


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
    assert recorded == ["a", "a", "a"] and runner.stats["captures"] == 3


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
    net.cuda_graphs = runner
    (a,) = _structures("a")
    x = torch.zeros(1)
    runner(a, x)
    net.to(torch.float64)                 # new parameter tensors: the recordings would read the old ones
    assert runner(a, x) == "graph a" and recorded == ["a", "a"]


def test_cuda_graphs_need_a_cuda_device_and_the_first_order_step():
    config = tiny_config(cuda_graphs=True)
    with pytest.raises(ConfigError, match="cuda_graphs = True: records CUDA graphs, so it needs a CUDA device"):
        check_device_support(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="cuda_graphs = True: records the first-order step's passes"):
        tiny_config(cuda_graphs=True, unrolled=True)
    if ON_CUDA:
        check_device_support(config, DEVICE)


def test_op_streams_need_a_cuda_device():
    config = tiny_config(op_streams=4)
    with pytest.raises(ConfigError, match="op_streams = 4: more than 1 needs a CUDA device"):
        check_device_support(config, torch.device("cpu"))
    with pytest.raises(ConfigError, match="op_streams = 0: must be"):
        tiny_config(op_streams=0)
    assert tiny_config(op_streams=4, cuda_graphs=True).op_streams == 4
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
    recordings = []

    def record(*args, **kwargs):
        recordings.append(ReplayedPass(*args, **kwargs))
        return recordings[-1]

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    eager, fast = tiny_net(seed=0, mode="dst"), tiny_net(seed=0, mode="dst")
    fast.use_cuda_graphs(after=1, capture=capture_cuda_graphs)
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
    assert fast.cuda_graphs.stats["recorded_calls"] == 12
    weight_pass = recordings[3]
    buffers = {g.untyped_storage().data_ptr() for g in weight_pass.grads if g is not None}
    aliased = [p for p in fast.parameters() if p.grad is not None and p.grad.untyped_storage().data_ptr() in buffers]
    assert len(aliased) == len(buffers) > 0


def test_a_pass_that_cannot_be_recorded_runs_eagerly_with_a_warning():
    def failing(fn, net, plans, args, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner = CudaGraphs(lambda plans, x: "eager " + plans[0], nn.Linear(1, 1), after=1, capture=failing)
    (a,) = _structures("a")
    x = torch.zeros(1)
    with pytest.warns(UserWarning, match="runs eagerly .RuntimeError: operation not permitted"):
        assert runner(a, x) == "eager a"
    assert runner(a, x) == "eager a"       # not tried again
    assert runner.stats["capture_failures"] == 1 and runner.stats["captures"] == 1
    assert runner.stats["eager_calls"] == 2 and runner.stats["recorded_calls"] == 0
