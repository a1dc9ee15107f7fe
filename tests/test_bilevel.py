import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from entrannas.bilevel import BilevelOptimizer
from entrannas.supernet import ARCH_PARAMETER_NAMES

from conftest import cosine_lrs, tiny_batch, tiny_config, tiny_net


def test_lambda_pushes_thresholds_up():
    def betas_after(lambda_):
        net = tiny_net(mode="dst")
        opt = BilevelOptimizer(net, tiny_config(mode="dst", lambda_=lambda_, arch_lr=0.05))
        for s in range(5):
            opt.step(tiny_batch(s), tiny_batch(100 + s), update_arch=True)
        return torch.cat([net.beta_normal, net.beta_reduce]).detach()

    none, strong = betas_after(0.0), betas_after(5.0)
    assert (strong > none).all() and strong.mean() > 0.1


def test_first_order_arch_step_moves_alpha_weight_step_does_not():
    net = tiny_net(mode="entrannas")
    opt = BilevelOptimizer(net, tiny_config(mode="entrannas"))
    before = net.alpha_normal.detach().clone()
    opt.step(tiny_batch(0), tiny_batch(1), update_arch=False)
    assert torch.equal(net.alpha_normal, before) and net.alpha_normal.grad is None
    opt.step(tiny_batch(0), tiny_batch(1), update_arch=True)
    assert not torch.equal(net.alpha_normal, before)


@pytest.mark.parametrize("update_arch", [True, False])
def test_a_step_updates_alpha_on_the_valid_batch_then_the_weights_on_the_train_batch(monkeypatch, update_arch):
    """Bi-level, first order: the arch step's passes see the validation batch only, and run before
    the weight step, whose pass sees the training batch with alpha out of the graph."""
    net = tiny_net(mode="dst")
    opt = BilevelOptimizer(net, tiny_config(mode="dst"))
    train, valid = tiny_batch(0), tiny_batch(1)
    seen = []
    forward = net.forward

    def noting_forward(x, arch_grad=True):
        seen.append(("valid" if x is valid[0] else "train" if x is train[0] else "other", arch_grad))
        return forward(x, arch_grad)

    monkeypatch.setattr(net, "forward", noting_forward)
    opt.step(train, valid, update_arch=update_arch)
    assert seen == ([("valid", True)] if update_arch else []) + [("train", False)]


def test_the_optimisers_are_spec_6s():
    """The CIFAR defaults (PC-DARTS'): SGD lr 0.1, momentum 0.9, wd 3e-4, cosine to 0 over the epochs;
    Adam lr 6e-4, betas (0.5, 0.999), wd 1e-3 for alpha; and each reaches its optimiser."""
    config = tiny_config(mode="dst", dataset="synthetic")   # CIFAR's recipe, at a tiny size
    opt = BilevelOptimizer(tiny_net(mode="dst"), config)
    sgd, adam = opt.w_optimizer.param_groups[0], opt.a_optimizer.param_groups[0]
    assert (config.lr, config.momentum, config.weight_decay, config.lr_min) == (0.1, 0.9, 3e-4, 0.0)
    assert (sgd["lr"], sgd["momentum"], sgd["weight_decay"]) == (0.1, 0.9, 3e-4)
    assert (opt.w_scheduler.T_max, opt.w_scheduler.eta_min) == (config.epochs, 0.0)
    assert (config.arch_lr, config.arch_beta1, config.arch_beta2, config.arch_weight_decay) == (6e-4, 0.5, 0.999, 1e-3)
    assert (adam["lr"], adam["betas"], adam["weight_decay"]) == (6e-4, (0.5, 0.999), 1e-3)
    assert config.grad_clip == 5.0
    changed = tiny_config(mode="dst", arch_beta1=0.7, arch_beta2=0.99, momentum=0.5, epochs=4, lr=0.2, lr_min=0.02)
    opt = BilevelOptimizer(tiny_net(mode="dst"), changed)
    assert opt.a_optimizer.param_groups[0]["betas"] == (0.7, 0.99)
    assert opt.w_optimizer.param_groups[0]["momentum"] == 0.5
    # the weights' lr at the start of each epoch: cosine from lr to lr_min over the epochs
    lrs = []
    for _ in range(changed.epochs + 1):
        lrs.append(opt.w_optimizer.param_groups[0]["lr"])
        opt.w_optimizer.step()   # nothing has a gradient: no change, but the scheduler's order is kept
        opt.w_scheduler.step()
    assert lrs == pytest.approx(cosine_lrs(0.2, 0.02, 4, n=5)) and lrs[-1] == pytest.approx(0.02)


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_the_weight_step_clips_the_gradient_norm(grad_clip):
    net = tiny_net(mode="entrannas")
    opt = BilevelOptimizer(net, tiny_config(mode="entrannas", grad_clip=grad_clip))
    norms = []
    opt.w_optimizer.step = lambda: norms.append(
        torch.cat([p.grad.flatten() for p in net.weight_parameters() if p.grad is not None]).norm().item())
    opt.weight_step(tiny_batch(0))
    if grad_clip:
        assert norms == [pytest.approx(grad_clip, rel=1e-3)]
    else:   # 0 turns clipping off; this loss's gradient is far larger than the clip above
        assert norms[0] > 100 * 1e-3


def test_regularizer_only_in_dst():
    net = tiny_net(mode="entrannas")
    assert BilevelOptimizer(net, tiny_config(mode="entrannas", lambda_=3.0)).regularizer() == 0
    net = tiny_net(mode="dst", beta_init=0.0)
    reg = BilevelOptimizer(net, tiny_config(mode="dst", lambda_=3.0)).regularizer()
    # Eq. 11 per cell type: 1/(n-1) sum_j -log t_j = log 2 for each of the two cells
    assert reg.item() == pytest.approx(3.0 * 2 * torch.log(torch.tensor(2.0)).item())


def test_regularizer_adds_each_cells_mean_over_its_nodes():
    """Eq. 11: lambda * 1/(n-1) sum_j -log t_j, the mean over one cell's nodes, for each cell type."""
    net = tiny_net(mode="dst")
    with torch.no_grad():
        net.beta_normal.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
        net.beta_reduce.copy_(torch.tensor([3.0, -2.0, 0.5, 0.0]))
    t_n, t_r = torch.sigmoid(net.beta_normal.detach()), torch.sigmoid(net.beta_reduce.detach())
    by_hand = 0.7 * ((-torch.log(t_n)).sum() / 4 + (-torch.log(t_r)).sum() / 4)
    reg = BilevelOptimizer(net, tiny_config(mode="dst", lambda_=0.7)).regularizer()
    assert reg.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_beta_takes_a_plain_gradient_step_so_lambda_sets_its_pace():
    """beta: SGD at beta_lr with no weight decay (Adam would move it by about arch_lr whatever
    lambda is); alpha: Adam with arch_weight_decay. With the loss's own gradient taken out, one
    step moves beta by beta_lr * lambda * (1 - t) / n_nodes: ten times as far at ten times lambda."""
    def beta_step(lambda_):
        net = tiny_net(mode="dst")
        config = tiny_config(mode="dst", lambda_=lambda_, beta_lr=0.5, arch_weight_decay=0.1)
        opt = BilevelOptimizer(net, config)
        assert opt.b_optimizer.param_groups[0]["weight_decay"] == 0
        assert {id(p) for p in opt.a_optimizer.param_groups[0]["params"]} == {id(net.alpha_normal), id(net.alpha_reduce)}
        before = torch.cat([net.beta_normal, net.beta_reduce]).detach().clone()
        opt.frozen_arch_loss = lambda x, y, total=None: (opt.regularizer(), None)   # the regulariser alone
        opt.arch_step(tiny_batch(0), tiny_batch(1))
        return torch.cat([net.beta_normal, net.beta_reduce]).detach() - before

    small, large = beta_step(0.1), beta_step(1.0)
    assert small == pytest.approx(torch.full((8,), 0.5 * 0.1 * 0.5 / 4), rel=1e-5)
    assert large == pytest.approx(10 * small, rel=1e-5)


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
@pytest.mark.parametrize("after_a_weight_step", [False, True])
def test_unrolled_gradient_matches_exact_second_order_gradient(mode, after_a_weight_step):
    """DARTS Eq. 7, with its finite-difference Hessian term, against autograd through the
    virtual step w' = w - xi (momentum * buffer + grad_w L_train + wd w), in float64: from a fresh
    optimiser, and after a weight step has filled SGD's momentum buffers."""
    # Smooth enough for finite differences: no max-pool, whose argmax flips under tiny shifts.
    prims = ("sep_conv_3x3", "avg_pool_3x3", "skip_connect", "dil_conv_3x3")
    config = tiny_config(mode=mode, primitives=prims, unrolled=True, lr=0.05, weight_decay=3e-4, lambda_=0.2)
    net = tiny_net(mode=mode, primitives=prims, beta_init=-0.5).double()
    train, valid = tiny_batch(0, dtype=torch.float64), tiny_batch(1, dtype=torch.float64)
    opt = BilevelOptimizer(net, config)
    # A small radius: this tiny net's loss has ReLU kinks that DARTS' 0.01 straddles.
    opt.fd_radius = 1e-6
    if after_a_weight_step:
        opt.weight_step(tiny_batch(2, dtype=torch.float64))
    opt._unrolled_backward(train, valid)
    estimate = [a.grad.clone() for a in net.arch_parameters()]

    params = dict(net.named_parameters())
    names = [n for n in params if n not in ARCH_PARAMETER_NAMES]
    buffers = {n: b.clone() for n, b in net.named_buffers()}
    loss = lambda values, xy: F.cross_entropy(functional_call(net, ({**params, **values}, buffers), (xy[0],)), xy[1])  # noqa: E731
    grads = torch.autograd.grad(loss({}, train), [params[n] for n in names], create_graph=True, allow_unused=True)
    grads = [g if g is not None else 0 for g in grads]   # ops outside the derived set
    buffers_of = {n: opt.w_optimizer.state.get(params[n], {}).get("momentum_buffer") for n in names}
    assert any(b is not None for b in buffers_of.values()) == after_a_weight_step
    moment = {n: 0 if b is None else config.momentum * b for n, b in buffers_of.items()}
    unrolled = {n: params[n] - 0.05 * (moment[n] + g + 3e-4 * params[n]) for n, g in zip(names, grads)}
    val = loss(unrolled, valid) + opt.regularizer()
    exact = torch.autograd.grad(val, net.arch_parameters())
    first_order = torch.autograd.grad(loss({}, valid) + opt.regularizer(), net.arch_parameters())
    for e, x in zip(estimate, exact):
        torch.testing.assert_close(e, x, rtol=1e-3, atol=1e-4 * x.abs().max().item())
    assert any((x - f).abs().max() > 1e-4 for x, f in zip(exact, first_order)), \
        "the second-order term is not negligible here, so the check means something"


@pytest.mark.parametrize("mode", ["entrannas", "dst"])
def test_arch_step_gives_the_full_backward_gradient_without_weight_gradients(mode):
    net = tiny_net(mode=mode)
    opt = BilevelOptimizer(net, tiny_config(mode=mode))
    loss, _ = opt.arch_loss(*tiny_batch(1))
    loss.backward()                      # the plain backward: arch and weight gradients
    expected = [a.grad.clone() for a in net.arch_parameters()]
    assert any(p.grad is not None for p in net.weight_parameters())
    net.zero_grad(set_to_none=True)
    opt.a_optimizer.step = lambda: None  # keep the gradients to compare them
    opt.arch_step(tiny_batch(0), tiny_batch(1))
    for a, g in zip(net.arch_parameters(), expected):
        torch.testing.assert_close(a.grad, g, rtol=0, atol=0)
    assert all(p.grad is None for p in net.weight_parameters())
    assert all(p.requires_grad for p in net.weight_parameters())   # restored after the step


def test_an_op_switched_in_by_a_transit_cell_starts_training():
    """Its weights get their first gradient (and momentum buffer) while the others have theirs."""
    net = tiny_net(mode="entrannas")
    opt = BilevelOptimizer(net, tiny_config(mode="entrannas"))
    k = net.primitives.index("sep_conv_3x3")
    transit = next(c for c in net.cells if not c.engine)      # cell 2, a reduction cell
    with torch.no_grad():                                      # every edge: max_pool (no weights)
        net.alpha_reduce.fill_(-5.0)
        net.alpha_reduce[:, net.primitives.index("max_pool_3x3")] = 5.0
    net.arch_changed()                                         # an edit by hand: derive anew
    opt.step(tiny_batch(0), tiny_batch(1), update_arch=False)
    weight = transit.ops[0][k][0][1].weight                   # sep_conv_3x3's first depthwise conv on input 0
    assert weight.grad is None and opt.w_optimizer.state.get(weight) is None
    with torch.no_grad():
        net.alpha_reduce[0, k] = 10.0                          # now sep_conv_3x3 wins on edge 0
    net.arch_changed()
    before = weight.detach().clone()
    opt.step(tiny_batch(2), tiny_batch(3), update_arch=False)
    assert not torch.equal(weight, before) and "momentum_buffer" in opt.w_optimizer.state[weight]


def test_after_an_arch_step_the_passes_run_the_architecture_derived_from_the_new_alpha():
    """The optimiser derives after each architecture step: the weight step that follows, and the
    next arch step, run what the updated alpha derives, not what the first pass derived."""
    net = tiny_net(mode="entrannas")
    opt = BilevelOptimizer(net, tiny_config(mode="entrannas", arch_lr=0.5))
    seen = []
    for step in range(4):
        opt.step(tiny_batch(step), tiny_batch(100 + step), update_arch=True)
        fresh = net.derived_masks()
        assert all(torch.equal(a, b) for a, b in zip(net.derived.masks, fresh))
        seen.append(fresh[0].numpy().tobytes() + fresh[1].numpy().tobytes())
    assert len(set(seen)) > 1, "alpha moved the derived architecture"
