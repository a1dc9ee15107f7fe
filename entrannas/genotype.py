"""Flexible genotypes: any number of (op, input) pairs per intermediate node.

States are numbered as in DARTS: 0 and 1 are the cell inputs (the outputs of the two previous
cells), 2, 3, ... the intermediate nodes. All conversions (JSON, DARTS notation) live here.
"""

from __future__ import annotations

import ast
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .ops import OPS

N_INPUTS = 2

Node = tuple[tuple[str, int], ...]


class GenotypeError(ValueError):
    """A genotype that cannot describe a cell."""


def _check_cell(name: str, nodes: tuple[Node, ...], concat: tuple[int, ...]) -> None:
    if not nodes:
        raise GenotypeError(f"{name}: a cell needs at least one intermediate node")
    for j, node in enumerate(nodes):
        state = j + N_INPUTS
        if not node:
            raise GenotypeError(f"{name}: node {state} has no inputs; every node needs at least one")
        for op, inp in node:
            if op not in OPS:
                raise GenotypeError(
                    f"{name}: node {state} uses unknown operation {op!r}; allowed: {', '.join(OPS)}")
            if op == "none":
                raise GenotypeError(f"{name}: node {state} uses 'none', which is not a connection")
            if not isinstance(inp, int) or not 0 <= inp < state:
                raise GenotypeError(
                    f"{name}: node {state} takes input {inp!r}, which is not an earlier node "
                    f"(allowed 0..{state - 1})")
    last = len(nodes) + N_INPUTS - 1
    if not concat:
        raise GenotypeError(f"{name}_concat: empty; list the nodes that form the cell output")
    for c in concat:
        if not isinstance(c, int) or not N_INPUTS <= c <= last:
            raise GenotypeError(
                f"{name}_concat: node {c!r} does not exist (intermediate nodes are {N_INPUTS}..{last})")


def _freeze_nodes(nodes: Any) -> tuple[Node, ...]:
    return tuple(tuple((str(op), int(i)) for op, i in node) for node in nodes)


@dataclass(frozen=True)
class Genotype:
    """Normal and reduction cell: per node a tuple of (op name, input state) pairs."""

    normal: tuple[Node, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Node, ...]
    reduce_concat: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_cell("normal", self.normal, self.normal_concat)
        _check_cell("reduce", self.reduce, self.reduce_concat)

    @classmethod
    def build(cls, normal: Sequence, normal_concat: Sequence[int], reduce: Sequence,
              reduce_concat: Sequence[int]) -> "Genotype":
        """Build from nested lists (JSON shape), validating every entry."""
        try:
            return cls(_freeze_nodes(normal), tuple(int(c) for c in normal_concat),
                       _freeze_nodes(reduce), tuple(int(c) for c in reduce_concat))
        except (TypeError, ValueError) as e:
            if isinstance(e, GenotypeError):
                raise
            raise GenotypeError(f"malformed genotype: {e}") from None

    def choices(self) -> set[tuple[str, int, str, int]]:
        """Every ``(cell, node, op, input)`` the genotype chooses."""
        return {(cell, j + N_INPUTS, op, i) for cell in ("normal", "reduce")
                for j, node in enumerate(getattr(self, cell)) for op, i in node}

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "normal": [[list(pair) for pair in node] for node in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": [[list(pair) for pair in node] for node in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Genotype":
        missing = {"normal", "normal_concat", "reduce", "reduce_concat"} - set(d)
        if missing:
            raise GenotypeError(f"genotype lacks {', '.join(sorted(missing))}")
        return cls.build(d["normal"], d["normal_concat"], d["reduce"], d["reduce_concat"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "Genotype":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype JSON does not parse: {e}") from None

    # -- DARTS notation -----------------------------------------------------------------------
    @classmethod
    def from_darts(cls, text: str) -> "Genotype":
        """Read ``Genotype(normal=[(op, i), ...], normal_concat=[...], reduce=..., reduce_concat=...)``.

        Each node takes the next two pairs, so the node count follows from the list length.
        ``range(a, b)`` is accepted for the concat lists, as in the DARTS source.
        """
        text = text.strip()
        if not re.match(r"(?:\w+\s*=\s*)?(?:\w+\.)*Genotype\s*\(", text):
            raise GenotypeError(f"not DARTS genotype notation (expected 'Genotype(normal=[...], ...)'): "
                                f"{text[:60]!r}")
        try:
            call = ast.parse(text.split("=", 1)[1].strip() if re.match(r"\w+\s*=", text) else text,
                             mode="eval").body
            if not isinstance(call, ast.Call):
                raise GenotypeError("DARTS genotype does not parse: expected one Genotype(...) call")
            kwargs = {kw.arg: kw.value for kw in call.keywords}
            fields = {}
            for key in ("normal", "normal_concat", "reduce", "reduce_concat"):
                if key not in kwargs:
                    raise GenotypeError(f"DARTS genotype lacks {key}=")
                node = kwargs[key]
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "range"):
                    fields[key] = list(range(*[ast.literal_eval(a) for a in node.args]))
                else:
                    fields[key] = ast.literal_eval(node)
        except (SyntaxError, ValueError, TypeError) as e:
            raise GenotypeError(f"DARTS genotype does not parse: {e}") from None

        def pairs_to_nodes(name: str, pairs: list) -> list:
            if len(pairs) % 2:
                raise GenotypeError(f"DARTS genotype: {name} has {len(pairs)} pairs; DARTS notation "
                                    "gives two per node")
            return [pairs[i:i + 2] for i in range(0, len(pairs), 2)]

        return cls.build(pairs_to_nodes("normal", fields["normal"]), fields["normal_concat"],
                         pairs_to_nodes("reduce", fields["reduce"]), fields["reduce_concat"])

    def to_darts(self) -> str:
        """DARTS notation; only for genotypes with exactly two inputs per node."""
        for node in self.normal + self.reduce:
            if len(node) != 2:
                raise GenotypeError("DARTS notation needs exactly two inputs per node")
        flat = lambda nodes: [pair for node in nodes for pair in node]  # noqa: E731
        return (f"Genotype(normal={flat(self.normal)}, normal_concat={list(self.normal_concat)}, "
                f"reduce={flat(self.reduce)}, reduce_concat={list(self.reduce_concat)})")

    # -- summaries ----------------------------------------------------------------------------
    def inputs_per_node(self, cell: str) -> list[int]:
        return [len(node) for node in getattr(self, cell)]


def genotype_from_masks(mask_normal, mask_reduce, primitives: Sequence[str], n_nodes: int) -> Genotype:
    """Genotype of the derived sets: ``mask[e, k]`` true where op k on edge e is kept.

    Edges are in DARTS order (node 0's from states 0, 1; node 1's from 0, 1, 2; ...).
    """

    def cell(mask) -> list:
        nodes, e = [], 0
        for j in range(n_nodes):
            node = []
            for i in range(N_INPUTS + j):
                node += [(primitives[k], i) for k in range(len(primitives)) if bool(mask[e][k])]
                e += 1
            nodes.append(node)
        return nodes

    concat = list(range(N_INPUTS, N_INPUTS + n_nodes))
    return Genotype.build(cell(mask_normal), concat, cell(mask_reduce), concat)


def genotype_masks(genotype: Genotype, primitives: Sequence[str], n_nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``genotype_from_masks``: bool masks ``[E, K]`` (normal, reduction) that mark
    the genotype's (edge, op) pairs. Raises ``GenotypeError`` where the genotype does not fit a
    super-net cell of ``n_nodes`` nodes over ``primitives``: another node count, an op that is no
    candidate, a pair listed twice, or a cell output that is not every intermediate node (a
    super-net cell concatenates them all)."""
    from .derive import edge_layout   # here: derive imports this module

    edge_of = {pair: e for e, pair in enumerate(edge_layout(n_nodes, N_INPUTS))}
    candidates = list(primitives)   # an op listed twice marks its first column, as list.index finds it

    def cell_mask(name: str) -> torch.Tensor:
        nodes, concat = getattr(genotype, name), getattr(genotype, f"{name}_concat")
        if len(nodes) != n_nodes:
            raise GenotypeError(f"{name}: the genotype has {len(nodes)} intermediate nodes; the super-net's "
                                f"cells have {n_nodes}")
        if tuple(concat) != tuple(range(N_INPUTS, N_INPUTS + n_nodes)):
            raise GenotypeError(f"{name}_concat: {list(concat)}; a super-net cell outputs every intermediate "
                                f"node ({list(range(N_INPUTS, N_INPUTS + n_nodes))})")
        mask = torch.zeros(len(edge_of), len(primitives), dtype=torch.bool)
        for j, node in enumerate(nodes):
            for op, i in node:
                if op not in candidates:
                    raise GenotypeError(f"{name}: node {j + N_INPUTS} uses {op!r}, which is not a candidate "
                                        f"here; candidates: {', '.join(primitives)}")
                e, k = edge_of[(i, j)], candidates.index(op)
                if mask[e, k]:
                    raise GenotypeError(f"{name}: node {j + N_INPUTS} lists ({op!r}, {i}) twice")
                mask[e, k] = True
        return mask

    return cell_mask("normal"), cell_mask("reduce")


def random_genotype(primitives: Sequence[str], n_nodes: int, seed: int) -> Genotype:
    """A genotype drawn uniformly from the DARTS space by ``seed`` (Li & Talwalkar's random-search
    baseline): per node two different earlier states, on each an op other than ``none``."""
    rng = random.Random(seed)
    ops = [p for p in primitives if p != "none"]
    concat = list(range(N_INPUTS, N_INPUTS + n_nodes))
    cells = [[[(rng.choice(ops), i) for i in sorted(rng.sample(range(N_INPUTS + j), 2))] for j in range(n_nodes)]
             for _ in ("normal", "reduce")]
    return Genotype.build(cells[0], concat, cells[1], concat)
