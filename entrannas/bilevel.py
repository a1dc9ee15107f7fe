"""Bi-level optimisation (docs/method.md, Bi-level optimisation): weights on the training half, alpha/beta on the other half.

``step(train_batch, valid_batch, update_arch)`` does one architecture step on the validation batch
(first-order by default, or DARTS' unrolled second-order step) and one weight step on the training
batch. Losses come back as tensors so that a step never waits for the device. With a ``Shard`` of
several processes each step runs this process's share of the (global) batches and sums the
gradients over the processes (``entrannas.distributed``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call

from . import derive
from .distributed import Shard, loss_share
from .runtime import fused_available
from .supernet import ARCH_PARAMETER_NAMES, SearchNetwork


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Up-cast half-precision logits for the loss; fp32 and fp64 stay as they are."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


#: Settings a search can change between epochs and continue from its checkpoint (read at each step,
#: or re-applied by ``load_state_dict``): what population-based training may perturb.
MUTABLE_SETTINGS = ("arch_lr", "beta_lr", "arch_weight_decay", "lambda_")


class BilevelOptimizer:
    #: Finite-difference radius of the unrolled step's Hessian term, over the norm of the vector (DARTS).
    fd_radius = 0.01

    def __init__(self, model: SearchNetwork, config, epochs: Optional[int] = None, shard: Optional[Shard] = None):
        self.model, self.config = model, config
        self.shard = shard or Shard()
        self.bf16 = config.precision == "bf16"
        self.lambda_ = config.lambda_ if model.spec.mode == "dst" else 0.0
        # Multi-tensor updates instead of a Python loop over hundreds of tensors. Not fused SGD: its
        # kernel fails once an op that a Transit-cell switched in gets its first gradient (a
        # momentum buffer missing among present ones), which the foreach path handles.
        self.w_optimizer = torch.optim.SGD(model.weight_parameters(), lr=config.lr, momentum=config.momentum,
                                           weight_decay=config.weight_decay, foreach=True)
        self.w_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            self.w_optimizer, T_max=epochs or config.epochs, eta_min=config.lr_min)
        alphas = [model.alpha_normal, model.alpha_reduce]
        self.a_optimizer = torch.optim.Adam(alphas, lr=config.arch_lr,
                                            betas=(config.arch_beta1, config.arch_beta2),
                                            weight_decay=config.arch_weight_decay,
                                            fused=fused_available(alphas))
        # DST's thresholds take a plain gradient step with no weight decay: Adam would normalise
        # the step to about arch_lr whatever lambda is, and weight decay would pull t back to 0.5,
        # so lambda (Eq. 11) would barely set the sparsity.
        self.b_optimizer = (torch.optim.SGD([model.beta_normal, model.beta_reduce], lr=config.beta_lr)
                            if model.beta_normal is not None else None)

    # -- losses ---------------------------------------------------------------------------------
    def regularizer(self) -> torch.Tensor:
        """Eq. 11's lambda * 1/(n-1) sum_j -log t_j, a mean over the nodes of one cell, for the normal
        and the reduction cell, added up (DST only)."""
        m = self.model
        if m.beta_normal is None:
            return m.alpha_normal.new_zeros(())
        return self.lambda_ * (derive.dst_regularizer(m.beta_normal) + derive.dst_regularizer(m.beta_reduce))

    def autocast(self, x: torch.Tensor):
        """bf16 autocast for forward passes when ``precision: bf16`` (losses stay fp32).

        Without autocast's weight cache: recording CUDA graphs (``cuda_graphs``) refuses it, and a
        super-net pass casts each weight once anyway."""
        return torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16,
                              cache_enabled=False)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The super-net's logits for an evaluation pass (a search's validation each epoch): no
        gradient to alpha or beta, the steps' precision, up-cast for the loss. The caller sets eval
        mode and turns autograd off."""
        with self.autocast(x):
            return full_precision(self.model(x, arch_grad=False))

    def derived_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The derived architecture's logits with the super-net's weights (``derived_forward``)."""
        with self.autocast(x):
            return full_precision(self.model.derived_forward(x))

    def arch_loss(self, x: torch.Tensor, y: torch.Tensor, total: Optional[int] = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The validation loss plus the regularizer; with ``total`` (the global batch size), this
        process's share of both (``loss_share``; the regularizer split evenly)."""
        with self.autocast(x):
            logits = self.model(x)
        reg = self.regularizer() if total is None else self.regularizer() / self.shard.world
        return loss_share(full_precision(logits), y, total) + reg, logits

    def weight_loss(self, x: torch.Tensor, y: torch.Tensor, total: Optional[int] = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training loss with alpha and beta out of the graph (the weight step's)."""
        with self.autocast(x):
            logits = self.model(x, arch_grad=False)
        return loss_share(full_precision(logits), y, total), logits

    def frozen_arch_loss(self, x: torch.Tensor, y: torch.Tensor, total: Optional[int] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-order arch step's loss: the weights frozen while it is built, so that its
        backward pass computes gradients for alpha and beta only."""
        with self.model.frozen_weights():
            return self.arch_loss(x, y, total)

    # -- steps ----------------------------------------------------------------------------------
    def arch_optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.a_optimizer] + ([self.b_optimizer] if self.b_optimizer is not None else [])

    def arch_step(self, train_batch, valid_batch) -> torch.Tensor:
        for opt in self.arch_optimizers():
            opt.zero_grad(set_to_none=True)
        if self.config.unrolled:
            loss = self._unrolled_backward(train_batch, valid_batch)
        else:
            loss, _ = self.frozen_arch_loss(*self.shard.split(valid_batch))
            loss.backward()
            self.shard.reduce_gradients(self.model.arch_parameters())
        for opt in self.arch_optimizers():
            opt.step()
        self.model.derive()   # the architecture the next passes run
        return loss.detach()

    def weight_step(self, train_batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss (this process's share) and this process's correct predictions."""
        x, y, total = self.shard.split(train_batch)
        # None, not zeros: a recorded pass's gradients are its buffers (cuda_graphs.capture_cuda_graphs)
        self.w_optimizer.zero_grad(set_to_none=True)
        loss, logits = self.weight_loss(x, y, total)
        loss.backward()
        self.shard.reduce_gradients(self.model.weight_parameters())
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.weight_parameters(), self.config.grad_clip, foreach=True)
        self.w_optimizer.step()
        return loss.detach(), (logits.argmax(1) == y).sum()

    def step(self, train_batch, valid_batch, update_arch: bool) -> dict[str, torch.Tensor]:
        out = {}
        if update_arch:
            out["arch_loss"] = self.arch_step(train_batch, valid_batch)
        out["train_loss"], out["train_correct"] = self.weight_step(train_batch)
        return out

    # -- second order (DARTS Eq. 7-8) ---------------------------------------------------------------
    def _unrolled_backward(self, train_batch, valid_batch) -> torch.Tensor:
        """Set alpha's grad to DARTS' second-order estimate (DARTS Eqs. 7-8):
        grad_a L_val(w', a) - xi * [grad_a L_train(w+, a) - grad_a L_train(w-, a)] / (2 eps),
        with w' = w - xi * (momentum + grad_w L_train + wd * w) one virtual SGD step at the current
        lr xi, and w+- = w +- eps * grad_w' L_val(w', a) (central finite differences)."""
        model = self.model
        params = dict(model.named_parameters())
        weights = {n: p for n, p in params.items() if n not in ARCH_PARAMETER_NAMES}
        arch = model.arch_parameters()
        xi = self.w_optimizer.param_groups[0]["lr"]
        buffers = {n: b.clone() for n, b in model.named_buffers()}   # virtual steps leave BN stats alone
        x_t, y_t = train_batch

        def loss_at(values: dict, x, y) -> torch.Tensor:
            with self.autocast(x):
                logits = functional_call(model, ({**params, **values}, buffers), (x,))
            return F.cross_entropy(full_precision(logits), y)

        # Ops outside this iteration's derived set are unused: their gradient is zero.
        grads = torch.autograd.grad(loss_at({}, x_t, y_t), list(weights.values()), allow_unused=True)
        unrolled = {}
        for (name, w), g in zip(weights.items(), grads):
            buf = self.w_optimizer.state.get(w, {}).get("momentum_buffer")
            moment = self.config.momentum * buf if buf is not None else 0.0
            step = moment + (g if g is not None else 0.0) + self.config.weight_decay * w
            unrolled[name] = (w - xi * step).detach().requires_grad_(True)

        val_loss = loss_at(unrolled, *valid_batch) + self.regularizer()
        d = torch.autograd.grad(val_loss, arch + list(unrolled.values()), allow_unused=True)
        d = [torch.zeros_like(t) if g is None else g for g, t in zip(d, arch + list(unrolled.values()))]
        d_arch, vector = d[:len(arch)], d[len(arch):]

        eps = self.fd_radius / torch.cat([v.flatten() for v in vector]).norm().clamp_min(1e-12)
        shifted = lambda sign: {n: (w + sign * eps * v).detach()            # noqa: E731
                                for (n, w), v in zip(weights.items(), vector)}
        g_pos = torch.autograd.grad(loss_at(shifted(+1), x_t, y_t), arch, allow_unused=True)
        g_neg = torch.autograd.grad(loss_at(shifted(-1), x_t, y_t), arch, allow_unused=True)
        for a, g, gp, gn in zip(arch, d_arch, g_pos, g_neg):
            hessian_term = (gp if gp is not None else 0) - (gn if gn is not None else 0)
            a.grad = g - xi * hessian_term / (2 * eps)
        return val_loss.detach()

    def derive(self):
        """The genotype derived from the current architecture parameters."""
        return self.model.genotype()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"w_optimizer": self.w_optimizer.state_dict(), "w_scheduler": self.w_scheduler.state_dict(),
                 "a_optimizer": self.a_optimizer.state_dict()}
        if self.b_optimizer is not None:
            state["b_optimizer"] = self.b_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimizers' state; the architecture step's settings (``MUTABLE_SETTINGS``)
        are this optimizer's config, not the checkpoint's, so that a run continued with other values
        of them (population-based training) uses the new ones."""
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.w_scheduler.load_state_dict(state["w_scheduler"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        for group in self.a_optimizer.param_groups:
            group.update(lr=self.config.arch_lr, weight_decay=self.config.arch_weight_decay)
        if self.b_optimizer is not None:
            self.b_optimizer.load_state_dict(state["b_optimizer"])
            for group in self.b_optimizer.param_groups:
                group["lr"] = self.config.beta_lr
