"""Mutation audit: does every equation of the method (Eqs. 3-11) have a test that fails when it is wrong?

    python tests/mutants.py [--only ID ...] [--fast] [--list] [--no-baseline] [--timeout S] [--jobs N]
                            [--out FILE.json]

Each mutant below changes one rule the way a plausible bug would (a wrong sign, the wrong axis, a
normalisation left out, the wrong batch): a rule of the method, by its topic (1 search space, 2 Engine- and Transit-cells, 3 feature
sharing, 4 DST, 5 bottleneck, 6 optimisation, 7 genotypes, 8 evaluation network; docs/method.md), or of the data
path, the fast paths (they compute what the eager path does), the bench's figures, run directories and
resume ("runs"), bad input ("input"), the sweeps and their trials, and the report ("results").
For each, a copy of the working tree gets the edit, and pytest runs the tests that guard that rule
with the copy first on ``sys.path``, stopping at the first failure. The slow tests (end-to-end runs: Ray
sweeps, a CLI search) run only for the mutants marked ``slow``, which ``--fast`` leaves out. A mutant is *killed*
when a test fails, and *survives* when every test passes: then nothing checks that rule. First the
unmutated copy must pass the same tests (the baseline), or the audit means nothing. Prints JSON (per
mutant: the result, the first failing test, seconds) and a short table; exit status 1 if a mutant
survives (or its tests could not run), 2 if the audit cannot start.

Every edit's text must occur exactly once in its file; a mutant whose text has gone (the code was
changed) is reported before anything runs. Mutants that compute the same thing by another route
(equivalent mutants, such as a DST Engine-cell computing its zero-weighted ops) are not listed:
they cannot be killed, and the method allows them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    spec: str                                   # the rule it breaks: a topic number (and equation), or a part
    what: str
    edits: tuple[tuple[str, str, str], ...]     # (file, text, replacement)
    tests: tuple[str, ...]
    slow: bool = False                          # its tests are slow ones (Ray sweeps, a CLI search)


def _m(id: str, spec: str, what: str, path: str, old: str, new: str, *tests: str, slow: bool = False) -> Mutant:
    return Mutant(id, spec, what, ((path, old, new),), tests, slow)


DERIVE, SUPERNET, BILEVEL = "entrannas/derive.py", "entrannas/supernet.py", "entrannas/bilevel.py"
CELLS = "entrannas/cells.py"
DATA, T_DATA = "entrannas/data.py", "tests/test_data.py"
SEARCH, TRAIN, RUNDIR = "entrannas/search.py", "entrannas/train.py", "entrannas/rundir.py"
RUNTIME = "entrannas/runtime.py"
T_SEARCH, T_TRAIN = "tests/test_search.py", "tests/test_train.py"
CONFIG, T_CLI = "entrannas/config.py", "tests/test_cli.py"
COLLECT, REPORT, T_RESULTS = "results/collect.py", "results/report.py", "tests/test_results.py"
TRIAL, T_TRIAL = "orchestrator/trial.py", "tests/test_trial.py"
T_DERIVE, T_SUPERNET, T_BILEVEL = "tests/test_derive.py", "tests/test_supernet.py", "tests/test_bilevel.py"
T_EVAL, T_OPS, T_GENO = "tests/test_evalnet.py", "tests/test_ops.py", "tests/test_genotype.py"
BENCH, T_FASTPATHS = "benchmarks/bench.py", "tests/test_fastpaths.py"
#: ops.AvgPool's test for going round a device's broken channels_last pool kernel
POOL_DETOUR = "if self.padding and x.stride() != _nchw_strides(x.shape) and pool_grad_is_wrong(x.device):"
T_BENCH = f"{T_FASTPATHS}::test_bench_prints_json_a_table_and_checks_each_fast_path"
T_BENCH_VALID = f"{T_FASTPATHS}::test_the_bench_times_validation_as_a_search_runs_it"
#: test_cuda_graphs.py's tests of the recording policy and of recorded passes (a stand-in on the CPU)
T_CAPTURE = tuple(f"tests/test_cuda_graphs.py::test_{name}" for name in (
    "a_hot_architecture_is_recorded_and_the_most_recently_used_are_kept",
    "capture_records_each_kind_of_pass_and_frozen_weights_are_another_kind",
    "training_and_evaluation_mode_are_recorded_apart", "moving_the_net_forgets_its_recordings",
    "recorded_passes_give_the_eager_search_even_where_their_buffers_alias_the_gradients"))

MUTANTS: tuple[Mutant, ...] = (
    # -- 1: the search space
    _m("ops-dil-conv-dilation", "1", "dil_conv_3x3 with dilation 1 (same weights, other receptive field)",
       "entrannas/ops.py", "DilConv(C, C, 3, stride, 2, 2, affine)", "DilConv(C, C, 3, stride, 1, 1, affine)",
       T_OPS, T_EVAL),
    _m("ops-avg-pool-counts-padding", "1", "avg_pool_3x3 divides by 9 at the border (count_include_pad)",
       "entrannas/ops.py", "AvgPool(3, stride=stride, padding=1, count_include_pad=False)",
       "AvgPool(3, stride=stride, padding=1, count_include_pad=True)", T_OPS, T_EVAL),
    _m("ops-sep-conv-once", "1", "sep_conv applies its depthwise-pointwise pair once, not twice",
       "entrannas/ops.py", "            DilConv(C_in, C_out, kernel, 1, padding, 1, affine),\n", "", T_OPS, T_EVAL),
    _m("ops-factorized-reduce-offset", "1", "FactorizedReduce's second conv reads the same pixels as the first",
       "entrannas/ops.py", "F.pad(self.conv_2.weight, (1, 0, 1, 0))", "F.pad(self.conv_2.weight, (0, 1, 0, 1))",
       T_OPS),
    _m("ops-search-pool-no-bn", "1", "search pools without their BatchNorm(affine=False)",
       "entrannas/ops.py", 'if search and name.endswith("pool_3x3"):', 'if False and name.endswith("pool_3x3"):',
       T_OPS, T_SUPERNET),
    _m("search-bn-affine", "1", "search ops with affine BatchNorm",
       CELLS, "2 if reduction and i < N_INPUTS else 1, affine=False,",
       "2 if reduction and i < N_INPUTS else 1, affine=True,", T_SUPERNET),
    _m("search-one-reduction", "1", "the super-net reduces once, at 1/3 depth only",
       SUPERNET, "reductions = (spec.layers // 3, 2 * spec.layers // 3)", "reductions = (spec.layers // 3,)",
       T_SUPERNET),
    # -- 2: Engine-cells, Transit-cells, temperature, the top-2 rule
    _m("eq5-tau-multiplies", "2, Eq. 5", "softmax(alpha * tau) for softmax(alpha / tau)",
       DERIVE, "return F.softmax(alpha / tau, dim=-1)", "return F.softmax(alpha * tau, dim=-1)", T_DERIVE),
    _m("eq5-wrong-axis", "2, Eq. 5", "softmax over the edges instead of the ops",
       DERIVE, "return F.softmax(alpha / tau, dim=-1)", "return F.softmax(alpha / tau, dim=0)", T_DERIVE),
    _m("eq6-engine-no-gradient", "2, Eq. 6", "Engine-cell coefficients detached from alpha",
       SUPERNET, "coef = w[plan.rows, plan.cols] if", "coef = w[plan.rows, plan.cols].detach() if",
       T_SUPERNET, T_BILEVEL),
    _m("eq3-transit-weighted", "2, Eq. 3", "Transit-cells weight their ops by p (not a plain sum)",
       SUPERNET, "if cell.engine and not transit_only else None",
       "if cell.engine and not transit_only else w[plan.rows, plan.cols]", T_SUPERNET),
    _m("transit-stale-architecture", "2", "Transit-cells keep the first derived architecture",
       BILEVEL, "        self.model.derive()   # the architecture the next passes run\n", "", T_SUPERNET, T_BILEVEL),
    _m("transit-ignores-tau", "2", "a new tau does not re-derive the architecture",
       SUPERNET, "            self.derived = None   # another temperature may derive another architecture\n", "",
       T_SUPERNET),
    _m("placement-first", "2", "the default placement takes the last reduction cell",
       "entrannas/config.py", "return {normals[0], reductions[0]}", "return {normals[0], reductions[-1]}",
       "tests/test_cli.py::test_yaml_numbers_and_dataset_defaults"),
    _m("placement-no-reduce-engine", "2", "a placement with no reduction Engine-cell is accepted",
       "entrannas/config.py", "if not engines & reductions:", "if False:", "tests/test_cli.py"),
    _m("tau-constant-ends", "2", "constant schedule at tau_end", "entrannas/temperature.py",
       "return float(tau_start)", "return float(tau_end)", T_DERIVE),
    _m("tau-linear-reversed", "2", "linear schedule from tau_end to tau_start", "entrannas/temperature.py",
       "return tau_start + (tau_end - tau_start) * frac", "return tau_end + (tau_start - tau_end) * frac",
       T_DERIVE),
    _m("tau-short-of-end", "2", "schedules reach tau_end one epoch after the last", "entrannas/temperature.py",
       "epoch / max(epochs - 1, 1)", "epoch / max(epochs, 1)", T_DERIVE),
    _m("tau-exponential-curve", "2", "exponential schedule with the wrong exponent", "entrannas/temperature.py",
       "tau_start * (tau_end / tau_start) ** frac", "tau_start * (tau_end / tau_start) ** (frac ** 2)", T_DERIVE),
    _m("tau-cosine-reversed", "2", "cosine schedule rising", "entrannas/temperature.py",
       "(1.0 + math.cos(math.pi * frac))", "(1.0 - math.cos(math.pi * frac))", T_DERIVE),
    _m("eq4-none-counts", "2, Eq. 4", "the top-2 rule lets `none` score an edge",
       DERIVE, 'scored[:, list(primitives).index("none")] = float("-inf")', "pass", T_DERIVE, T_SUPERNET),
    _m("eq4-top1", "2, Eq. 4", "one input per node instead of two",
       DERIVE, "n_inputs: int = 2, k: int = 2)", "n_inputs: int = 2, k: int = 1)", T_DERIVE, T_SUPERNET),
    _m("eq4-weakest-edges", "2, Eq. 4", "the two weakest edges kept",
       DERIVE, "order = torch.sort(edge_score, descending=True, stable=True).indices",
       "order = torch.sort(edge_score, descending=False, stable=True).indices", T_DERIVE),
    _m("eq4-argmin-op", "2, Eq. 4", "the weakest op of a kept edge",
       DERIVE, "edge_score, edge_op = scored.max(dim=1)",
       "edge_score, edge_op = scored.max(dim=1).values, scored.masked_fill(scored.isinf(), 9e9).argmin(dim=1)",
       T_DERIVE),
    _m("log-p-without-normaliser", "2, Eq. 4", "edges ranked by alpha's lead over the edge's own max",
       DERIVE, "return rel - torch.log1p(others)", "return rel", T_DERIVE, T_SUPERNET),
    _m("dst-engine-uses-p", "4, Eq. 10", "DST Engine-cells weighted by p, not q_hat",
       SUPERNET, 'if self.spec.mode == "dst":\n                out.append(derive.dst_coefficients',
       'if False:\n                out.append(derive.dst_coefficients', T_SUPERNET),
    # -- 3: feature sharing
    _m("sharing-ignored", "3", "ops always per edge, sharing or not",
       CELLS, "sources = (range(n_sources) if sharing", "sources = (range(n_sources) if False", T_SUPERNET),
    _m("sharing-last-node-feeds", "3", "op instances for the last node, which feeds none",
       CELLS, "n_sources = N_INPUTS + n_nodes - 1", "n_sources = N_INPUTS + n_nodes", T_SUPERNET),
    # -- 4: DST
    _m("eq7-per-edge-max", "4, Eq. 7", "p normalised by its edge's max, not its node's",
       DERIVE, "p_hat = p / node_max[node_of_edge, None]", "p_hat = p / p.amax(dim=1, keepdim=True)", T_DERIVE),
    _m("eq7-left-out", "4, Eq. 7", "no connection normalisation",
       DERIVE, "p_hat = p / node_max[node_of_edge, None]", "p_hat = p", T_DERIVE),
    _m("eq8-minus-beta", "4, Eq. 8", "t = sigmoid(-beta)",
       DERIVE, "t = torch.sigmoid(beta).clamp(max=MAX_THRESHOLD)", "t = torch.sigmoid(-beta).clamp(max=MAX_THRESHOLD)",
       T_DERIVE, T_BILEVEL),
    _m("eq8-other-nodes-threshold", "4, Eq. 8", "each node cut by another node's threshold",
       DERIVE, "q = F.relu(p_hat - t[node_of_edge, None])", "q = F.relu(p_hat - t.flip(0)[node_of_edge, None])",
       T_DERIVE),
    _m("eq8-hard-cut", "4, Eq. 8", "p_hat kept where above t, not relu(p_hat - t)",
       DERIVE, "q = F.relu(p_hat - t[node_of_edge, None])", "q = p_hat * (p_hat > t[node_of_edge, None])", T_DERIVE),
    _m("eq9-left-out", "4, Eq. 9", "no operation normalisation",
       DERIVE, "return q / total.clamp_min(torch.finfo(q.dtype).tiny)", "return q", T_DERIVE),
    _m("eq9-per-node", "4, Eq. 9", "q normalised over the node, not the edge",
       DERIVE, "total = q.sum(dim=1, keepdim=True)",
       "total = q.new_zeros(n_nodes).index_add(0, node_of_edge, q.sum(dim=1))[node_of_edge, None]", T_DERIVE),
    _m("eq10-keeps-zeros", "4, Eq. 10", "the derived set keeps ops with q_hat = 0",
       DERIVE, "return q_hat.detach() > 0", "return q_hat.detach() >= 0", T_DERIVE, T_SUPERNET),
    _m("eq11-sum", "4, Eq. 11", "the regulariser sums over nodes instead of averaging",
       DERIVE, "return F.softplus(-beta).mean()", "return F.softplus(-beta).sum()", T_DERIVE, T_BILEVEL),
    _m("eq11-wrong-sign", "4, Eq. 11", "-log(1 - t) for -log t",
       DERIVE, "return F.softplus(-beta).mean()", "return F.softplus(beta).mean()", T_DERIVE, T_BILEVEL),
    _m("eq11-normal-cell-only", "4, Eq. 11", "the regulariser over the normal cell's nodes only",
       BILEVEL, "derive.dst_regularizer(m.beta_normal) + derive.dst_regularizer(m.beta_reduce)",
       "2 * derive.dst_regularizer(m.beta_normal)", T_BILEVEL),
    _m("eq11-mean-over-both-cells", "4, Eq. 11", "one mean over both cells' nodes, not a mean per cell",
       BILEVEL, "derive.dst_regularizer(m.beta_normal) + derive.dst_regularizer(m.beta_reduce)",
       "derive.dst_regularizer(torch.cat([m.beta_normal, m.beta_reduce]))", T_BILEVEL),
    _m("beta-adam", "4, Eq. 11", "beta stepped by Adam with alpha, so lambda's size is normalised away",
       BILEVEL, "torch.optim.SGD([model.beta_normal, model.beta_reduce], lr=config.beta_lr)",
       "torch.optim.Adam([model.beta_normal, model.beta_reduce], lr=config.beta_lr)", T_BILEVEL),
    _m("eq11-lambda-dropped", "4, Eq. 11", "lambda ignored",
       BILEVEL, 'self.lambda_ = config.lambda_ if model.spec.mode == "dst" else 0.0', "self.lambda_ = 0.0",
       T_BILEVEL),
    # -- 5: the bottleneck
    _m("bottleneck-full-width", "5", "ops on C channels whatever the ratio",
       CELLS, "C_op = C // ratio", "C_op = C", T_SUPERNET),
    _m("bottleneck-ratio-unchecked", "5", "a ratio that does not divide the channels is accepted",
       "entrannas/config.py", "if channels % self.bottleneck_ratio:", "if False:", "tests/test_cli.py"),
    # -- 6: optimisation
    _m("arch-step-on-train", "6", "the arch step on the weights' batch",
       BILEVEL, "loss, _ = self.frozen_arch_loss(*self.shard.split(valid_batch))",
       "loss, _ = self.frozen_arch_loss(*self.shard.split(train_batch))",
       T_BILEVEL),
    _m("weight-step-on-valid", "6", "the weight step on the arch's batch",
       BILEVEL, 'out["train_correct"] = self.weight_step(train_batch)',
       'out["train_correct"] = self.weight_step(valid_batch)', T_BILEVEL),
    _m("weight-grad-unclipped", "6", "the weight step without gradient clipping",
       BILEVEL, "if self.config.grad_clip > 0:", "if False:", T_BILEVEL),
    _m("arch-adam-default-betas", "6", "the arch optimiser with Adam's default betas, not (0.5, 0.999)",
       BILEVEL, "betas=(config.arch_beta1, config.arch_beta2)", "betas=(0.9, 0.999)", T_BILEVEL, T_DERIVE,
       "tests/test_cli.py"),
    _m("split-overlaps", "6", "the arch half is the weights' half",
       DATA, "valid = TensorBatches(images[n - n_valid:], labels[n - n_valid:]",
       "valid = TensorBatches(images[:n_valid], labels[:n_valid]", T_DATA),
    _m("warmup-one-epoch-long", "6", "arch updates start an epoch after the warm-up",
       "entrannas/search.py", "return c.arch_warmup_epochs <= self.epoch < c.epochs - c.settle_epochs",
       "return c.arch_warmup_epochs < self.epoch < c.epochs - c.settle_epochs", "tests/test_search.py"),
    _m("settling-moves-alpha", "6", "the settling epochs still take architecture steps",
       "entrannas/search.py", "return c.arch_warmup_epochs <= self.epoch < c.epochs - c.settle_epochs",
       "return c.arch_warmup_epochs <= self.epoch", "tests/test_search.py"),
    _m("tau-anneals-through-settling", "2", "tau keeps annealing through the settling epochs",
       "entrannas/search.py", "self.epoch, c.epochs - c.settle_epochs, c.tau_start", "self.epoch, c.epochs, c.tau_start",
       "tests/test_search.py"),
    _m("derived-forward-keeps-engines", "2, Eq. 3", "the derived network's pass mixes in its Engine-cells",
       SUPERNET, "if cell.engine and not transit_only else None", "if cell.engine else None", T_SUPERNET),
    _m("unrolled-hessian-sign", "6", "second order: the Hessian term added",
       BILEVEL, "a.grad = g - xi * hessian_term / (2 * eps)", "a.grad = g + xi * hessian_term / (2 * eps)",
       T_BILEVEL),
    _m("unrolled-one-sided", "6", "second order: the central difference over eps, not 2 eps",
       BILEVEL, "a.grad = g - xi * hessian_term / (2 * eps)", "a.grad = g - xi * hessian_term / eps", T_BILEVEL),
    _m("unrolled-no-momentum", "6", "second order: the virtual step forgets the momentum",
       BILEVEL, 'moment = self.config.momentum * buf if buf is not None else 0.0', "moment = 0.0", T_BILEVEL),
    _m("unrolled-no-weight-decay", "6", "second order: the virtual step forgets the weight decay",
       BILEVEL, "step = moment + (g if g is not None else 0.0) + self.config.weight_decay * w",
       "step = moment + (g if g is not None else 0.0)", T_BILEVEL),
    # -- 7: genotypes
    _m("darts-notation-three-per-node", "7", "DARTS notation read three pairs per node",
       "entrannas/genotype.py", "return [pairs[i:i + 2] for i in range(0, len(pairs), 2)]",
       "return [pairs[i:i + 3] for i in range(0, len(pairs), 3)]", T_GENO),
    # -- 8: the evaluation network
    _m("eval-concat-all", "8", "every node concatenated, whatever the genotype's concat",
       "entrannas/evalnet.py", "return torch.cat([states[i] for i in self.concat], dim=1)",
       "return torch.cat(states[2:], dim=1)", T_EVAL),
    _m("eval-aux-head-early", "8", "the auxiliary head at 1/3 depth",
       "entrannas/evalnet.py", "if index == 2 * self._layers // 3 and", "if index == self._layers // 3 and", T_EVAL),
    _m("drop-path-unscaled", "8", "drop-path without rescaling the kept samples",
       "entrannas/evalnet.py", "return x / keep * mask", "return x * mask", T_EVAL),
    _m("drop-path-on-identity", "8", "drop-path on skip connections too",
       "entrannas/evalnet.py", "if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):",
       "if self.training and drop_prob > 0:", T_EVAL),
    _m("drop-path-not-ramped", "8", "the full drop-path probability from the first epoch",
       "entrannas/train.py", "model.drop_path_prob = c.drop_path_prob * self.epoch / c.epochs",
       "model.drop_path_prob = c.drop_path_prob", "tests/test_train.py"),
    _m("aux-weight-ignored", "8", "the auxiliary loss at weight 1",
       "entrannas/train.py", "loss = loss + config.auxiliary_weight * loss_share(",
       "loss = loss + loss_share(", "tests/test_train.py"),
    _m("crop-padding-2", "8", "random crops of the image padded by 2, not 4", DATA,
       "CROP_PADDING = 4", "CROP_PADDING = 2", T_DATA),
    _m("flip-never", "8", "the batches never mirrored", DATA,
       "flips = (torch.rand(n, generator=gen) < 0.5)", "flips = (torch.rand(n, generator=gen) < 0.0)",
       T_DATA),
    _m("search-subset-ignored", "6", "the search's subset_fraction ignored: every image searched", DATA,
       "n_train = int(n * config.train_portion * config.subset_fraction)", "n_train = int(n * config.train_portion)",
       T_DATA),
    _m("eval-subset-ignored", "8", "the evaluation's subset_fraction ignored: every image trained on", DATA,
       "    if config.subset_fraction < 1:\n        idx, _ = split_per_class(train_y",
       "    if False:\n        idx, _ = split_per_class(train_y", T_DATA),
    _m("batches-same-order-every-epoch", "6", "every epoch's batches in the first epoch's order and crops", DATA,
       "manual_seed(self.seed * 100_003 + self.epoch)\n        # All of the epoch's",
       "manual_seed(self.seed * 100_003)\n        # All of the epoch's", T_DATA),
    _m("search-data-unaugmented", "6", "the search's CIFAR batches without crops and flips", DATA,
       "shuffle=True,\n                          seed=config.seed, augment=augment)\n    valid",
       "shuffle=True,\n                          seed=config.seed, augment=None)\n    valid", T_DATA),
    _m("eval-data-unaugmented", "8", "the evaluation's CIFAR batches without crops and flips", DATA,
       "augment=augment, cutout=config.cutout)", "augment=None, cutout=config.cutout)", T_DATA),
    _m("crop-offsets-swapped", "8", "random crop reads its row offset as the column's",
       DATA, "rows = (offsets[0, :, None] + torch.arange(H", "rows = (offsets[1, :, None] + torch.arange(H", T_DATA),
    _m("flip-ignored", "8", "random crop never mirrors", DATA,
       "cols = torch.where(flips[:, None], cols.flip(1), cols)", "cols = cols", T_DATA),
    _m("cutout-centre-transposed", "8", "cutout's square centred at (column, row)", DATA,
       "cy, cx = centers[0], centers[1]", "cy, cx = centers[1], centers[0]", T_DATA),
    _m("genotype-self-input", "7", "a genotype node may take itself as input", "entrannas/genotype.py",
       "not 0 <= inp < state:", "not 0 <= inp <= state:", T_GENO),
    _m("genotype-concat-input-node", "7", "a cell's concat may list one of its two input nodes",
       "entrannas/genotype.py", "not N_INPUTS <= c <= last:", "not 0 <= c <= last:", T_GENO),
    # -- the recipes' schedules and what an epoch reports (6 and 8)
    _m("search-lr-floor-ignored", "6", "the weights' cosine schedule ends at 0 whatever lr_min says", BILEVEL,
       "T_max=epochs or config.epochs, eta_min=config.lr_min)", "T_max=epochs or config.epochs, eta_min=0.0)",
       T_BILEVEL),
    _m("search-lr-never-anneals", "6", "the search's weight lr stays at lr (the scheduler never steps)", SEARCH,
       "        self.optimizer.w_scheduler.step()\n", "", T_SEARCH),
    _m("search-valid-on-train-half", "6", "an epoch's valid loss and accuracy measured on the weights' half",
       SEARCH, "return loss_and_accuracy(logits, self.data.valid, self.device, self.shard)",
       "return loss_and_accuracy(logits, self.data.train, self.device, self.shard)", T_SEARCH),
    _m("valid-seconds-whole-epoch", "6", "an epoch's valid_seconds counts the whole epoch, training included",
       SEARCH, 'record["valid_seconds"] = end - valid_start', 'record["valid_seconds"] = end - start',
       "tests/test_search.py::test_an_epoch_reports_the_seconds_its_validation_pass_took"),
    _m("eval-lr-floor-ignored", "8", "the evaluation's cosine schedule ends at 0 whatever lr_min says", TRAIN,
       "eta_min=config.lr_min)", "eta_min=0.0)", T_TRAIN),
    _m("eval-step-schedule-ignored", "8", "lr_schedule: step runs the cosine schedule", TRAIN,
       'if config.lr_schedule == "cosine":', "if True:", T_TRAIN),
    _m("eval-weight-decay-ignored", "8", "the evaluation's SGD without weight decay", TRAIN,
       "weight_decay=config.weight_decay,\n", "weight_decay=0.0,\n", T_TRAIN),
    _m("eval-test-on-train-set", "8", "the test error measured on the training set", TRAIN,
       "self.model(x)[0], self.data.test, self.device, self.shard)",
       "self.model(x)[0], self.data.train, self.device, self.shard)",
       T_TRAIN),
    _m("eval-selects-on-test", "8", "result.json's test error is the best epoch's, a selection on the test set",
       "entrannas/cli.py", '"test_error": history[-1]["test_error"], "epochs"',
       '"test_error": min(r["test_error"] for r in history), "epochs"', T_TRAIN, "tests/test_cli.py"),
    # -- runs: a run directory is never overwritten, and a resumed run ends where an uninterrupted one does
    _m("run-overwritten", "runs", "a directory that holds a run is run again without --resume", RUNDIR,
       "if self.has_run() and not resume:", "if False:", "tests/test_cli.py"),
    _m("resume-config-unchecked", "runs", "--resume accepts a config other than the saved one", RUNDIR,
       "            if changed:\n", "            if False:\n", "tests/test_cli.py"),
    _m("resume-keeps-stale-records", "runs", "resume keeps the history written after the checkpoint", RUNDIR,
       'r.get("epoch", -1) < epochs_done]', 'r.get("epoch", -1) <= epochs_done]', "tests/test_cli.py", slow=True),
    _m("search-resume-no-optimizer", "runs", "a resumed search restarts its optimisers (momentum, Adam, lr)",
       SEARCH, '        self.optimizer.load_state_dict(state["optimizer"])\n', "", T_SEARCH),
    _m("eval-resume-no-scheduler", "runs", "a resumed evaluation restarts its lr schedule", TRAIN,
       '        self.scheduler.load_state_dict(state["scheduler"])\n', "", T_TRAIN),
    _m("eval-resume-no-rng", "runs", "a resumed evaluation does not restore the random state", TRAIN,
       '        set_rng_state(state["rng"], self.device)', "        pass", T_TRAIN),
    _m("search-divergence-unnoticed", "runs", "a search whose loss is NaN goes on", SEARCH,
       "if not np.isfinite(train_loss):", "if False:", T_SEARCH),
    _m("eval-divergence-unnoticed", "runs", "an evaluation whose loss is NaN goes on", TRAIN,
       "if not math.isfinite(train_loss):", "if False:", T_TRAIN),
    # -- input: a bad setting stops the command with its field, value and what is allowed, before any work
    _m("unit-interval-closed", "input", "momentum, drop-path and label smoothing of 1 accepted", CONFIG,
       "if not 0 <= getattr(self, name) < 1:", "if not 0 <= getattr(self, name) <= 1:", T_CLI),
    _m("positive-accepts-zero", "input", "an lr of 0 accepted", CONFIG,
       "if not getattr(self, name) > 0:", "if getattr(self, name) < 0:", T_CLI),
    _m("subset-fraction-zero", "input", "a subset_fraction of 0 accepted", CONFIG,
       "if not 0 < self.subset_fraction <= 1:", "if not 0 <= self.subset_fraction <= 1:", T_CLI),
    _m("eval-lr-schedule-unchecked", "input", "an unknown lr_schedule runs the step schedule", CONFIG,
       "        if self.lr_schedule not in LR_SCHEDULES:", "        if False:", T_CLI),
    _m("eval-two-layers-accepted", "input", "an evaluation network of 2 cells (no normal cell) accepted", CONFIG,
       'if self.layers < 3:\n            raise ConfigError("layers", self.layers, "must be >= 3 so that',
       'if self.layers < 2:\n            raise ConfigError("layers", self.layers, "must be >= 3 so that', T_CLI),
    _m("device-unchecked", "input", "an unknown device accepted (torch fails later)", CONFIG,
       'if not (self.device == "auto" or', "if not (True or", T_CLI),
    # -- sweep specs: the grid of trials and what each holds
    _m("grid-zipped", "sweep", "a block's axes zipped, not crossed", "orchestrator/spec.py",
       "itertools.product(*(block[k] for k in keys))", "zip(*(block[k] for k in keys))", "tests/test_spec.py"),
    _m("grid-duplicates", "sweep", "a point in two blocks runs twice", "orchestrator/spec.py",
       "if point not in out:", "if True:", "tests/test_spec.py"),
    _m("fixed-value-counted-as-swept", "sweep", "a bare (fixed) value in a block listed as swept",
       "orchestrator/spec.py", "if len({repr(p.get(k)) for p in points}) > 1]",
       "if len({repr(p.get(k)) for p in points}) >= 1]", "tests/test_spec.py"),
    _m("no-retries", "sweep", "a failing trial is not retried", "orchestrator/sweep.py",
       "tune.FailureConfig(max_failures=spec.max_failures,", "tune.FailureConfig(max_failures=0,",
       "tests/test_orchestrator.py::test_failing_trials_are_retried_then_reported", slow=True),
    _m("retry-from-scratch", "sweep", "a retried trial starts again instead of from its checkpoint",
       "orchestrator/trial.py", "return read_state(tune.get_checkpoint())", "return None",
       "tests/test_orchestrator.py::test_failing_trials_are_retried_then_reported", slow=True),
    _m("resume-drops-unfinished", "sweep", "resume leaves the trials the killed driver was running",
       "orchestrator/sweep.py", "resume_unfinished=True,", "resume_unfinished=False,",
       "tests/test_orchestrator.py::test_killed_driver_then_resume", slow=True),
    _m("dp-arch-gradients-not-summed", "data-parallel", "each process steps alpha and beta with its own share's gradient",
       BILEVEL, "self.shard.reduce_gradients(self.model.arch_parameters())", "pass",
       "tests/test_distributed.py::test_two_processes_take_the_same_arch_steps_as_one"),
    _m("dp-batch-statistics-per-process", "data-parallel", "batch normalisation over each process's share alone",
       "entrannas/distributed.py", "            if type(m) is nn.BatchNorm2d:", "            if False:",
       "tests/test_distributed.py::test_global_batch_statistics_of_uneven_shards_equal_one_process",
       "tests/test_distributed.py::test_two_processes_take_the_same_arch_steps_as_one"),
    _m("dp-loss-share-mean", "data-parallel", "each process's loss the mean over its share, not its part of the batch's",
       "entrannas/distributed.py", 'reduction="sum", **kwargs) / total', "**kwargs)",
       "tests/test_distributed.py::test_two_processes_take_the_same_arch_steps_as_one"),
    _m("resources-from-evaluation", "sweep", "a trial holds the evaluation's resources, even when smaller",
       "orchestrator/spec.py", "res[key] = max(res.get(key, 0), value)", "res[key] = value", "tests/test_spec.py"),
    _m("trial-done-before-evaluation", "sweep", "a trial is done when its search ends, before its evaluation",
       TRIAL, '"done": eval_config is None and search.epoch == search_config.epochs',
       '"done": search.epoch == search_config.epochs', T_TRIAL),
    _m("trial-threads-ignored", "sweep", "a trial's CPU share leaves torch's thread count alone", TRIAL,
       "torch.set_num_threads(max(1, int(cpus)))", "pass", T_TRIAL),
    _m("trial-restart-forgets-search", "sweep", "a restarted trial searches again from scratch", TRIAL,
       '            search.load_state_dict(state["search"])\n', "", T_TRIAL),
    _m("trial-restart-searches-again", "sweep", "a trial restarted in its evaluation runs its search again",
       TRIAL, 'if state is None or state["stage"] == "search":', "if True:", T_TRIAL),
    _m("trial-restart-forgets-seconds", "sweep", "a trial restarted in its evaluation forgets the seconds spent",
       TRIAL, '        eval_seconds = state["eval_seconds_total"]\n', "", T_TRIAL),
    _m("trial-evaluates-diverged", "sweep", "a trial whose search diverged evaluates its genotype", TRIAL,
       '                                 metric))\n            return\n', '                                 metric))\n',
       T_TRIAL),
    _m("stopped-as-done", "sweep", "a trial a scheduler stopped counts as done", "entrannas/records.py",
       'return "done" if last.get("finished", True) else "stopped"', 'return "done"', "tests/test_tuning.py"),
    _m("pbt-keeps-old-arch-lr", "sweep", "a search continued under a perturbed arch_lr runs with the checkpoint's",
       BILEVEL, "group.update(lr=self.config.arch_lr, weight_decay=self.config.arch_weight_decay)", "pass",
       "tests/test_tuning.py"),
    _m("randint-upper-excluded", "input", "randint [lo, hi] never draws hi", "orchestrator/tuning.py",
       "tune.randint(args[0], args[1] + 1)", "tune.randint(args[0], args[1])", "tests/test_tuning.py"),
    _m("sampled-values-unchecked", "input", "a sampled setting's range is not validated like a fixed value",
       "orchestrator/spec.py", "        for drawn in _sampled_corners(sample):", "        for drawn in [{}]:",
       "tests/test_tuning.py"),
    _m("resources-negative", "input", "a negative resource amount accepted", "orchestrator/spec.py",
       "not isinstance(amount, (int, float)) or amount < 0:", "not isinstance(amount, (int, float)):",
       "tests/test_spec.py"),
    _m("resources-fraction-above-one", "input", "1.5 GPUs per trial accepted (Ray takes whole units above 1)",
       "orchestrator/spec.py", "if amount > 1 and amount != int(amount):", "if False:", "tests/test_spec.py"),
    _m("resources-fit-cpu-only", "input", "a GPU trial accepted on nodes without GPUs", "orchestrator/spec.py",
       '        if need["gpu"]:\n            counts.append(', '        if False:\n            counts.append(',
       "tests/test_spec.py"),
    # -- the ablation tables report what the trials measured (mean and spread over seeds)
    _m("table-population-std", "results", "the spread over seeds as the population sd (ddof=0)",
       "results/tables.py", "series.std(ddof=1)", "series.std(ddof=0)", "tests/test_results.py"),
    _m("table-failed-as-zero", "results", "a failed trial's missing error averaged in as 0",
       "results/tables.py", 'series = pd.to_numeric(group[v], errors="coerce").dropna()',
       'series = pd.to_numeric(group[v], errors="coerce").fillna(0)', "tests/test_results.py"),
    _m("table-diverged-not-failed", "results", "diverged trials not counted as failed",
       "results/tables.py", 'group["status"].isin(["failed", "diverged"])', 'group["status"].isin(["failed"])',
       "tests/test_results.py"),
    _m("gpu-hours-whole-gpus", "results", "GPU-hours as if each trial held a whole GPU",
       "results/collect.py", "((search_s or 0) * gpu + (eval_s or 0) * eval_gpu) / 3600",
       "((search_s or 0) + (eval_s or 0)) / 3600", "tests/test_results.py"),
    _m("kept-total-normal-only", "results", "a trial's kept connections count the normal cell only", COLLECT,
       'out["kept_total"] = sum(out["kept_normal"]) + sum(out["kept_reduce"])',
       'out["kept_total"] = sum(out["kept_normal"])', T_RESULTS),
    _m("op-counts-normal-only", "results", "the operation frequencies count the normal cell only", COLLECT,
       '    for cell in ("normal", "reduce"):\n        for node in genotype[cell]:',
       '    for cell in ("normal",):\n        for node in genotype[cell]:', T_RESULTS),
    _m("epoch-kept-normal-only", "results", "an epoch's kept connections count the normal cell only", COLLECT,
       '"kept_total": (sum(kept_n) + sum(kept_r)) if kept_n and kept_r else None,',
       '"kept_total": sum(kept_n) if kept_n and kept_r else None,', T_RESULTS),
    _m("threshold-first-node", "results", "an epoch's threshold is its first node's, not the mean over nodes",
       COLLECT, 'thresholds[f"threshold_{cell}"] = sum(t) / len(t)', 'thresholds[f"threshold_{cell}"] = t[0]',
       T_RESULTS),
    _m("valid-error-as-accuracy", "results", "a record's valid error read as its accuracy (trials and runs)",
       "entrannas/records.py", 'return None if record.get("valid_acc") is None else 1 - record["valid_acc"]',
       'return None if record.get("valid_acc") is None else record["valid_acc"]', T_RESULTS, T_TRIAL),
    _m("run-done-after-an-epoch", "results", "a search directory with any epoch counted as done", COLLECT,
       'done = len(history) >= int(config.get("epochs") or 0) > 0', "done = len(history) > 0", T_RESULTS),
    _m("cost-at-search-size", "results", "parameters counted on an 8-cell, 16-channel network, not DARTS' 20 and 36",
       COLLECT, "NetworkCIFAR(genotype, 36, 20, classes)", "NetworkCIFAR(genotype, 16, 8, classes)", T_RESULTS),
    _m("cost-cifar100-ten-classes", "results", "CIFAR-100's cost counted with a 10-class classifier", COLLECT,
       'classes = 100 if dataset == "cifar100" else 10', "classes = 10", T_RESULTS),
    _m("report-no-failed-list", "results", "the report does not list the failed and diverged trials", REPORT,
       "        if len(failed):", "        if False:", T_RESULTS),
    _m("report-no-joint-table", "results", "no table by two swept settings together", REPORT,
       "        if len(keys) > 1:", "        if False:", T_RESULTS),
    # -- the bench's figures
    _m("projection-no-warmup", "bench", "the 50-epoch projection times every epoch at the full step",
       BENCH, "+ (config.epochs - config.arch_warmup_epochs) * full_batch)",
       "+ config.epochs * full_batch)", T_BENCH),
    _m("projection-all-images", "bench", "an epoch of the projection runs all 50,000 images, not 25,000",
       BENCH, "STEPS_PER_EPOCH_CIFAR = 25_000", "STEPS_PER_EPOCH_CIFAR = 50_000", T_BENCH),
    _m("step-time-fastest-block", "bench", "the step time from the fastest block, not the median",
       BENCH, "per_step = statistics.median_high(self.blocks)", "per_step = self.blocks[0]", T_BENCH),
    _m("projection-without-validation", "bench", "the projection with validation leaves the validation out",
       BENCH, '"projected_50_epoch_minutes_with_validation": (projected + validation) / 60',
       '"projected_50_epoch_minutes_with_validation": projected / 60', T_BENCH),
    _m("validation-warmup-settled", "bench", "--arch: the warm-up epochs' validation timed at the settled state",
       BENCH, "search_seconds(valid if self.initial_valid is None else self.initial_valid, valid)",
       "search_seconds(valid, valid)",
       f"{T_FASTPATHS}::test_bench_times_a_search_settled_at_a_given_genotype"),
    _m("validation-with-autograd", "bench", "an evaluation pass (the bench's timed validation) with autograd on",
       RUNTIME, "        with torch.no_grad():\n            yield",
       "        with torch.enable_grad():\n            yield", T_BENCH_VALID),
    _m("validation-leaves-eval-mode", "bench", "an evaluation pass leaves eval mode on (the bench's steps after it)",
       RUNTIME, "    finally:\n        model.train()\n\n\ndef loss_and_correct",
       "    finally:\n        pass\n\n\ndef loss_and_correct", T_BENCH_VALID),
    _m("check-against-own-layout", "bench", "--check compares a configuration with eager in its own layout",
       BENCH, "reference = SearchNetwork(dataclasses.replace(model.spec, **eager_layout))",
       "reference = SearchNetwork(model.spec)", T_FASTPATHS),
    _m("check-against-own-precision", "bench", "--check's eager reference runs at the configuration's precision",
       BENCH, 'opt.config.replace(precision="fp32", cuda_graphs=False, **eager_layout)',
       'opt.config.replace(cuda_graphs=False, **eager_layout)', T_FASTPATHS),
    _m("check-blocks-input-first", "bench", "--check's cosines per block from the input forward",
       BENCH, "    return rows[::-1]\n", "    return rows\n", T_FASTPATHS),
    # -- the fast paths compute what the plain eager path does
    _m("channels-last-mix-transposed", "fast path", "an Engine-cell's mix in channels_last swaps H and W",
       CELLS, ".permute(0, 1, 4, 2, 3)", ".permute(0, 1, 4, 3, 2)", T_SUPERNET),
    _m("transit-group-first-op", "fast path", "a Transit-cell's per-source partial sum keeps its first op",
       CELLS, "partial[g] = functools.reduce(torch.add, (features[slot, k] for k in ks))",
       "partial[g] = features[slot, ks[0]]", T_SUPERNET),
    _m("pool-detour-off", "fast path", "avg_pool_3x3 never goes round a device's broken channels_last kernel",
       "entrannas/ops.py", POOL_DETOUR, POOL_DETOUR.replace("pool_grad_is_wrong(x.device)", "False"),
       f"{T_FASTPATHS}::test_avg_pool_probes_for_the_broken_kernel_and_pools_around_it",
       f"{T_FASTPATHS}::test_a_channels_last_search_has_the_right_gradients_despite_a_wrong_pool_kernel"),
    _m("pool-detour-trusts-is-contiguous", "fast path",
       "avg_pool_3x3 leaves a one-channel channels_last input (contiguous too) to the broken kernel",
       "entrannas/ops.py", POOL_DETOUR,
       POOL_DETOUR.replace("x.stride() != _nchw_strides(x.shape)", "not x.is_contiguous()"),
       f"{T_FASTPATHS}::test_avg_pool_probes_for_the_broken_kernel_and_pools_around_it"),
    _m("graph-ignores-frozen-weights", "fast path",
       "a recorded pass reused whether or not the weights require gradients",
       "entrannas/cuda_graphs.py", "tuple(p.requires_grad for p in self._params),", "", *T_CAPTURE),
    _m("graph-for-any-structure", "fast path", "the first recorded structure's graphs run for every structure",
       "entrannas/cuda_graphs.py", "passes = self._graphs.get(derived.key)",
       "passes = next(iter(self._graphs.values()), None)", *T_CAPTURE),
)


#: what can become of a mutant: "error" is a pytest run that could not test it (see ``audit``)
RESULTS = ("killed", "survived", "timeout", "error")


def check_edits(mutants) -> list[str]:
    """Mutants whose text is not in their file exactly once (the code has changed since)."""
    problems = []
    for m in mutants:
        for path, old, _ in m.edits:
            count = (ROOT / path).read_text().count(old) if (ROOT / path).is_file() else 0
            if count != 1:
                problems.append(f"{m.id}: {path} holds its text {count} times, not once: {old!r}")
    return problems


def tracked_copy(dest: Path) -> None:
    """The working tree's files that git tracks or would (not the ignored ones) under ``dest``."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(tree: Path, tests, timeout: float, slow: bool = False, threads: Optional[int] = None) -> dict:
    """pytest on ``tests`` in ``tree``, its packages imported from there, stopping at the first failure;
    the slow tests only with ``slow``; torch on ``threads`` CPU threads if given."""
    path = os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env = {**os.environ, "PYTHONPATH": path,
           **({"OMP_NUM_THREADS": str(threads), "ENTRANNAS_TEST_THREADS": str(threads)} if threads else {})}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rfE", "-p", "no:cacheprovider",
           *([] if slow else ["-m", "not slow"]), *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"rc": None, "failed": None, "seconds": round(time.perf_counter() - start, 1), "tail": ""}
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, flags=re.M)
    return {"rc": proc.returncode, "failed": failed[0] if failed else None,
            "seconds": round(time.perf_counter() - start, 1), "tail": proc.stdout[-1500:]}


def imports_from(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run([sys.executable, "-c", "import entrannas; print(entrannas.__file__)"], cwd=tree, env=env,
                          check=True, capture_output=True, text=True).stdout.strip()


def audit(mutant: Mutant, timeout: float, threads: Optional[int] = None) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.id}-") as tmp:
        tree = Path(tmp)
        tracked_copy(tree)
        for path, old, new in mutant.edits:
            target = tree / path
            target.write_text(target.read_text().replace(old, new, 1))
        out = run_tests(tree, mutant.tests, timeout, mutant.slow, threads)
    # pytest: 0 = all passed, 1 = a test failed, 2 = interrupted (an error while collecting: the mutant
    # broke an import); 3-5 (internal error, bad arguments, no tests) mean the audit named tests wrongly
    result = {None: "timeout", 0: "survived", 1: "killed", 2: "killed"}.get(out["rc"], "error")
    killed_by = out["failed"] if out["rc"] != 2 or not out["failed"] else f"{out['failed']} (collecting)"
    return {"id": mutant.id, "spec": mutant.spec, "what": mutant.what, "tests": list(mutant.tests),
            "result": result, "killed_by": killed_by, "pytest_rc": out["rc"], "seconds": out["seconds"],
            **({"tail": out["tail"]} if result == "survived" or out["rc"] not in (0, 1) else {})}


def audit_all(mutants, timeout: float, jobs: int = 1) -> list[dict]:
    """Every mutant's row, in the order given. With ``jobs`` > 1 that many mutants are tested at once,
    each pytest on its share of the CPU cores; the slow ones (Ray sweeps, each starting its own Ray)
    still run one at a time, after the others."""
    def done(row: dict) -> dict:
        print(f"{row['id']}: {row['result']} ({row['killed_by'] or '-'}, {row['seconds']} s)", file=sys.stderr)
        return row

    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    fast = [m for m in mutants if not m.slow]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:   # each audit is a subprocess
        futures = [pool.submit(audit, m, timeout, threads) for m in fast]
        for future in concurrent.futures.as_completed(futures):
            done(future.result())
    rows = {m.id: f.result() for m, f in zip(fast, futures)}
    rows.update({m.id: done(audit(m, timeout)) for m in mutants if m.slow})
    return [rows[m.id] for m in mutants]


def _where(spec: str) -> str:
    """A mutant's ``spec`` as the rule's place: a topic of the method (and equation), or a part of the project."""
    return f"method {spec}" if spec[0].isdigit() else spec


def table(rows: list[dict]) -> str:
    lines = [f"{'mutant':<30} {'rule':<15} {'result':<9} {'s':>6}  first failing test"]
    for r in rows:
        lines.append(f"{r['id']:<30} {_where(r['spec']):<15} {r['result']:<9} {r['seconds']:>6.1f}  "
                     f"{r['killed_by'] or '-'}")
    counts = {k: sum(r["result"] == k for r in rows) for k in RESULTS}
    lines.append(", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="ID", help="these mutants only")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the test files")
    p.add_argument("--fast", action="store_true", help="leave out the mutants whose tests are slow (Ray sweeps)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="test N mutants at once, each on its share of the CPU cores (default 1; Ray's one at a time)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: must be an integer >= 1")

    mutants = list(MUTANTS)
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in MUTANTS})
        if unknown:
            p.error(f"--only: no mutant {', '.join(unknown)}; --list shows them")
        mutants = [m for m in MUTANTS if m.id in args.only]
    if args.fast:
        mutants = [m for m in mutants if not m.slow]
    if args.list:
        for m in mutants:
            print(f"{m.id:<30} {_where(m.spec):<15} {m.what}")
        return 0
    problems = check_edits(mutants)
    if problems:
        print("stale mutants (update them to the code):\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2

    doc = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}
    if not args.no_baseline:
        doc["baseline"] = []
        with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
            tracked_copy(Path(tmp))
            imported = imports_from(Path(tmp))
            if not imported.startswith(str(Path(tmp).resolve())) and not imported.startswith(tmp):
                print(f"the copy's tests would import entrannas from {imported}, not the copy", file=sys.stderr)
                return 2
            for slow in (False, True):
                tests = sorted({t for m in mutants if m.slow == slow for t in m.tests})
                if not tests:
                    continue
                base = run_tests(Path(tmp), tests, args.timeout, slow)
                doc["baseline"].append({"tests": tests, "slow": slow, "pytest_rc": base["rc"],
                                        "seconds": base["seconds"]})
                print(f"baseline: {' '.join(tests)}: rc {base['rc']}, {base['seconds']} s", file=sys.stderr)
                if base["rc"] != 0:
                    print(base["tail"], file=sys.stderr)
                    print("the unmutated tree fails these tests: fix that first", file=sys.stderr)
                    return 2
    start = time.perf_counter()
    rows = audit_all(mutants, args.timeout, args.jobs)
    doc["jobs"], doc["seconds"] = args.jobs, round(time.perf_counter() - start, 1)
    doc["mutants"] = rows
    text = json.dumps(doc, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(table(rows), file=sys.stderr)
    return 1 if any(r["result"] in ("survived", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
