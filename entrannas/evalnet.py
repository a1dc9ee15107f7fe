"""Evaluation networks built from any genotype: the DARTS CIFAR and ImageNet networks,
with node sums over any number of (op, input) pairs and any subset of nodes concatenated.

Layer for layer the DARTS evaluation code, so a published genotype has the same parameter count.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .genotype import N_INPUTS, Genotype
from .ops import FactorizedReduce, ReLUConvBN, build_op


def drop_path(x: torch.Tensor, drop_prob: float) -> torch.Tensor:
    """Zero whole samples of a path with probability ``drop_prob``, rescaling the rest."""
    if drop_prob <= 0.0:
        return x
    keep = 1.0 - drop_prob
    mask = torch.empty(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(keep)
    return x / keep * mask


class EvalCell(nn.Module):
    def __init__(self, nodes, concat, C_pp: int, C_p: int, C: int, reduction: bool, reduction_prev: bool):
        super().__init__()
        self.reduction = reduction
        self.preprocess0 = FactorizedReduce(C_pp, C) if reduction_prev else ReLUConvBN(C_pp, C, 1, 1, 0)
        self.preprocess1 = ReLUConvBN(C_p, C, 1, 1, 0)
        self.inputs = [[i for _, i in node] for node in nodes]
        self.ops = nn.ModuleList(
            nn.ModuleList(build_op(op, C, 2 if reduction and i < N_INPUTS else 1, affine=True) for op, i in node)
            for node in nodes)
        self.concat = list(concat)
        self.multiplier = len(self.concat)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor, drop_prob: float, inputs_relu: bool = False) -> torch.Tensor:
        """``inputs_relu``: ``s0`` and ``s1`` have been through the ReLU that begins both preprocessings."""
        if not inputs_relu:   # a cell called on its own
            s0, s1 = F.relu(s0), F.relu(s1)
        states = [self.preprocess0.forward_from_relu(s0), self.preprocess1.forward_from_relu(s1)]
        for inputs, ops in zip(self.inputs, self.ops):
            total = None
            for i, op in zip(inputs, ops):
                h = op(states[i])
                if self.training and drop_prob > 0 and not isinstance(op, nn.Identity):
                    h = drop_path(h, drop_prob)
                total = h if total is None else total + h
            states.append(total)
        return torch.cat([states[i] for i in self.concat], dim=1)


class AuxiliaryHeadCIFAR(nn.Sequential):
    """Auxiliary classifier on the 8x8 features at 2/3 depth (DARTS)."""

    def __init__(self, C: int, num_classes: int):
        super().__init__(
            nn.ReLU(inplace=True), nn.AvgPool2d(5, stride=3, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.BatchNorm2d(768), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(768, num_classes))


class AuxiliaryHeadImageNet(nn.Sequential):
    """Auxiliary classifier on the 14x14 features; no BN after the 2x2 conv, as DARTS trained it."""

    def __init__(self, C: int, num_classes: int):
        super().__init__(
            nn.ReLU(inplace=True), nn.AvgPool2d(5, stride=2, padding=0, count_include_pad=False),
            nn.Conv2d(C, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU(inplace=True),
            nn.Conv2d(128, 768, 2, bias=False), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(768, num_classes))


class _EvalNetwork(nn.Module):
    """Cells, auxiliary head at 2/3 depth, global pooling, classifier; subclasses add the stem."""

    def _build_cells(self, genotype: Genotype, C: int, layers: int, num_classes: int, auxiliary: bool,
                     C_pp: int, C_p: int, reduction_prev: bool, aux_head) -> None:
        self.genotype = genotype
        self._layers, self._auxiliary = layers, auxiliary
        reductions = (layers // 3, 2 * layers // 3)
        self.cells = nn.ModuleList()
        C_curr, C_aux = C, None
        for index in range(layers):
            reduction = index in reductions
            if reduction:
                C_curr *= 2
            nodes, concat = ((genotype.reduce, genotype.reduce_concat) if reduction
                             else (genotype.normal, genotype.normal_concat))
            cell = EvalCell(nodes, concat, C_pp, C_p, C_curr, reduction, reduction_prev)
            self.cells.append(cell)
            reduction_prev = reduction
            C_pp, C_p = C_p, cell.multiplier * C_curr
            if index == 2 * layers // 3:
                C_aux = C_p
        self.auxiliary_head = aux_head(C_aux, num_classes) if auxiliary else None
        self.global_pooling = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(C_p, num_classes)

    def _forward_cells(self, s0, s1):
        # Each state is the input of two cells, whose preprocessings both begin with a ReLU of it: it
        # runs once per state (the same values as DARTS' network, fewer kernels and saved tensors).
        logits_aux = None
        r0 = F.relu(s0)
        r1 = r0 if s1 is s0 else F.relu(s1)
        out = s1
        for index, cell in enumerate(self.cells):
            out = cell(r0, r1, self.drop_path_prob, inputs_relu=True)
            r0, r1 = r1, (F.relu(out) if index < len(self.cells) - 1 else None)
            if index == 2 * self._layers // 3 and self.auxiliary_head is not None and self.training:
                logits_aux = self.auxiliary_head(out)   # its first ReLU is in place: after r1 is taken
        logits = self.classifier(self.global_pooling(out).flatten(1))
        return logits, logits_aux


class NetworkCIFAR(_EvalNetwork):
    """DARTS' CIFAR network: 3x3 conv stem to 3C channels, ``layers`` cells. ``forward`` returns
    ``(logits, aux_logits)``; aux_logits is None outside training or without the head."""

    def __init__(self, genotype: Genotype, C: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 3 * C, 3, padding=1, bias=False), nn.BatchNorm2d(3 * C))
        self._build_cells(genotype, C, layers, num_classes, auxiliary, 3 * C, 3 * C, False, AuxiliaryHeadCIFAR)
        self.drop_path_prob = drop_path_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        s = self.stem(x)
        return self._forward_cells(s, s)


class NetworkImageNet(_EvalNetwork):
    """DARTS' ImageNet network (mobile setting by default): three stride-2 convs, 224 -> 28."""

    def __init__(self, genotype: Genotype, C: int = 48, layers: int = 14, num_classes: int = 1000,
                 auxiliary: bool = False, drop_path_prob: float = 0.0, in_channels: int = 3):
        super().__init__()
        self.stem0 = nn.Sequential(
            nn.Conv2d(in_channels, C // 2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C // 2),
            nn.ReLU(inplace=True), nn.Conv2d(C // 2, C, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(C))
        self.stem1 = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(C, C, 3, stride=2, padding=1, bias=False),
                                   nn.BatchNorm2d(C))
        self._build_cells(genotype, C, layers, num_classes, auxiliary, C, C, True, AuxiliaryHeadImageNet)
        self.drop_path_prob = drop_path_prob

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        s0 = self.stem0(x)
        return self._forward_cells(s0, self.stem1(s0))


def count_parameters(model: nn.Module) -> int:
    """Parameters as papers report them: the auxiliary head excluded."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("auxiliary_head"))


def count_multiply_adds(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-adds of one inference forward pass at ``input_shape`` (C, H, W), from PyTorch's
    own FLOP counter (FLOPs / 2), the auxiliary head excluded (it does not run in eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
