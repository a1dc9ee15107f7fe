"""Tidy DataFrames -> matplotlib Figures (seaborn). Pure: nothing is shown or written here.

Figures are built on ``matplotlib.figure.Figure`` directly, so no global pyplot state or GUI
backend is involved; ``Figure.savefig`` writes them.
"""

from __future__ import annotations

import json
import math
from typing import Optional, Sequence

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .tables import MISSING, group_key, is_number, levels, setting_column

ERROR_LABELS = {"eval_test_error": "test error (%)", "valid_error": "super-net validation error (%)"}


def _with_key(df: pd.DataFrame, key: str) -> pd.DataFrame:
    """``df`` with the setting ``key`` as its own column, ``MISSING`` where a row has no value. The
    epochs frame has no column for a setting whose only trials never finished an epoch (a search that
    diverged in its first one)."""
    col = setting_column(df, key)
    out = df.copy()
    if col not in out.columns:
        out[key] = MISSING
        return out
    out[key] = out[col].map(group_key)
    if key != col:
        out = out.drop(columns=[col])
    return out


def _categories(df: pd.DataFrame, key: str) -> tuple[pd.DataFrame, list[str]]:
    """``_with_key``'s frame with ``key`` as text (a category axis or hue), and its values in the
    tables' order (``tables.levels``)."""
    df = _with_key(df, key)
    order = [str(v) for v in levels(df[key])]
    df[key] = df[key].astype(str)
    return df, order


#: dash patterns (on, off, ...) per level, cycled: "" is a solid line
_DASHES = ("", (4, 1.5), (1, 1), (3, 1.25, 1.5, 1.25), (5, 1, 1, 1), (6, 2), (2, 2, 6, 2))


def _line_styles(order: Sequence[str], shown: Sequence[str]) -> dict:
    """lineplot arguments that give each level of ``order`` the same colour and dashes in every panel,
    whichever levels a panel ``shown``: dashes keep apart groups whose curves coincide."""
    colours = dict(zip(order, sns.color_palette(n_colors=len(order))))
    dashes = {v: _DASHES[i % len(_DASHES)] for i, v in enumerate(order)}
    return {"hue_order": shown, "style_order": shown, "palette": {v: colours[v] for v in shown},
            "dashes": {v: dashes[v] for v in shown}}


def _epoch_axis(ax) -> None:
    ax.set_xlabel("search epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def error_column(trials: pd.DataFrame) -> str:
    """The test error when an evaluation ran, else the super-net's validation error."""
    if "eval_test_error" in trials.columns and trials["eval_test_error"].notna().any():
        return "eval_test_error"
    return "valid_error"


def is_numeric(series: pd.Series) -> bool:
    """Whether every present value of a setting is a number (missing ones aside)."""
    values = [v for v in series if v != MISSING]
    return bool(values) and all(map(is_number, values))


def _percent(df: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(df[column], errors="coerce") * 100


def metric_vs_setting(trials: pd.DataFrame, key: str, value: str, label: str, scale: float = 1.0,
                      title: Optional[str] = None) -> Figure:
    """``value`` against a numeric setting: mean line with a standard-deviation band, every trial a dot."""
    df = _with_key(trials, key)
    df = df[df[key] != MISSING].copy()
    df[key] = pd.to_numeric(df[key])
    df["__y"] = pd.to_numeric(df[value], errors="coerce") * scale
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.add_subplot()
    hue = "experiment" if df["experiment"].nunique() > 1 else None
    sns.lineplot(data=df, x=key, y="__y", hue=hue, errorbar="sd", marker="o", ax=ax)
    sns.scatterplot(data=df, x=key, y="__y", hue=hue, alpha=0.4, legend=False, ax=ax)
    ax.set_xlabel(key)
    ax.set_ylabel(label)
    ax.set_title(title or f"{label} vs {key}\n(mean ± sd over trials)")
    return fig


def _time_unit(longest: float) -> tuple[str, float]:
    """The unit (and its seconds) in which the longest of some durations reads from 2 to 120 (under
    2 s: seconds): a digits search takes seconds, a CIFAR-10 one minutes or hours."""
    for unit, per in (("h", 3600.0), ("min", 60.0)):
        if longest >= 2 * per:
            return unit, per
    return "s", 1.0


def error_and_cost(trials: pd.DataFrame, key: str) -> Figure:
    """Error and search time per value of a (categorical) setting, mean ± sd over its trials."""
    df, order = _categories(trials, key)
    err = error_column(df)
    df["__err"] = _percent(df, err)
    seconds = pd.to_numeric(df["search_seconds"], errors="coerce")
    unit, per = _time_unit(seconds.max())
    df["__cost"] = seconds / per
    hue = "experiment" if df["experiment"].nunique() > 1 else None
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_err, ax_cost = fig.subplots(1, 2)
    sns.barplot(data=df, x=key, y="__err", hue=hue, order=order, errorbar="sd", ax=ax_err)
    dots = {"color": "black"} if hue is None else {"palette": "dark:black", "dodge": True}
    sns.stripplot(data=df, x=key, y="__err", hue=hue, order=order, size=4, legend=False, ax=ax_err, **dots)
    ax_err.set_xlabel(key)
    ax_err.set_ylabel(ERROR_LABELS[err])
    ax_err.set_title(f"{ERROR_LABELS[err].split(' (')[0]} per {key}")
    sns.barplot(data=df, x=key, y="__cost", hue=hue, order=order, errorbar="sd", ax=ax_cost)
    ax_cost.set_xlabel(key)
    ax_cost.set_ylabel(f"search time ({unit})")
    ax_cost.set_title(f"search cost per {key}")
    fig.suptitle(f"{key}: mean ± sd over trials")
    return fig


def learning_curves(epochs: pd.DataFrame, key: str) -> Figure:
    """Super-net validation error per epoch, one line per value of ``key`` (band: sd over its trials)."""
    df, order = _categories(epochs, key)
    df["__err"] = _percent(df, "valid_error")
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    sns.lineplot(data=df, x="epoch", y="__err", hue=key, style=key, errorbar="sd", ax=ax,
                 **_line_styles(order, order))
    _epoch_axis(ax)
    ax.set_ylabel("super-net validation error (%)")
    ax.set_title(f"validation error during search, per {key}")
    return fig


def _epoch_panels(df: pd.DataFrame, order: list, key: str, panels: list[tuple[str, str]]) -> Figure:
    """One panel per ``(column, label)``: the column per epoch, a line per value of ``key`` (band: sd
    over its trials), each panel showing the values that have the column."""
    fig = Figure(figsize=(4.5 * len(panels), 4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (column, label) in zip(axes, panels):
        data = df.dropna(subset=[column])
        shown = [v for v in order if v in set(data[key])]
        sns.lineplot(data=data, x="epoch", y=column, hue=key, style=key, errorbar="sd", ax=ax,
                     **_line_styles(order, shown))
        _epoch_axis(ax)
        ax.set_ylabel(label)
        ax.set_title(label)
    return fig


def trajectories(epochs: pd.DataFrame, key: str) -> Figure:
    """Temperature and mean DST thresholds t = sigmoid(beta) per epoch, per value of ``key``."""
    df, order = _categories(epochs, key)
    panels = [("tau", "temperature tau")]
    panels += [(c, f"mean threshold, {c.split('_')[1]} cell") for c in ("threshold_normal", "threshold_reduce")
               if c in df.columns and df[c].notna().any()]
    fig = _epoch_panels(df, order, key, panels)   # thresholds: DST trials only
    fig.suptitle(f"tau and thresholds per {key}")
    return fig


def settling(epochs: pd.DataFrame, key: str) -> Figure:
    """Whether searches settle, per epoch and value of ``key``: the share of the genotype's
    choices unchanged since the previous epoch, and the derived architecture's validation error
    minus the super-net's (both with the super-net's weights)."""
    df, order = _categories(epochs, key)
    df["__gap"] = _percent(df, "derived_valid_error") - _percent(df, "valid_error")
    panels = [("genotype_stability", "genotype stability (share unchanged)"),
              ("__gap", "derived minus super-net valid error (points)")]
    fig = _epoch_panels(df, order, key, panels)
    fig.suptitle(f"does the search settle? per {key}")
    return fig


def op_heatmap(trials: pd.DataFrame, key: str) -> Figure:
    """Mean count of each operation in the final genotypes (normal + reduction cell) per group."""
    df, order = _categories(trials, key)
    ops = [c for c in df.columns if c.startswith("op:")]
    table = df.groupby(key)[ops].mean().reindex(order)
    table.columns = [c[3:] for c in ops]
    fig = Figure(figsize=(1.1 * len(ops) + 2.5, 0.5 * len(table) + 2.2), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(table, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": "mean count per genotype"}, ax=ax)
    ax.set_xlabel("operation")
    ax.set_ylabel(key)
    ax.set_title(f"operation frequency in the final genotypes, per {key}")
    return fig


def _on_arc(source, target, rad: float, t: float) -> tuple[float, float]:
    """The point at ``t`` of matplotlib's ``arc3`` curve: a quadratic Bezier whose control point
    is the chord's midpoint moved by ``rad * (dy, -dx)`` (so rad > 0 bends a rightward arrow down)."""
    (x0, y0), (x2, y2) = source, target
    cx, cy = (x0 + x2) / 2 + rad * (y2 - y0), (y0 + y2) / 2 - rad * (x2 - x0)
    a, b, c = (1 - t) ** 2, 2 * t * (1 - t), t ** 2
    return a * x0 + b * cx + c * x2, a * y0 + b * cy + c * y2


#: label size in a cell diagram's data units, per character and per line of 6 pt text, and a node's
#: radius, with a margin, at cell_diagrams' scale (a 12-character label drawn there: 1.04 by 0.21)
_CHAR_W, _LINE_H, _NODE_R = 0.085, 0.17, 0.3


def _label_size(ops: Sequence[str]) -> tuple[float, float]:
    return _CHAR_W * max(map(len, ops)) + 0.1, _LINE_H * len(ops) + 0.1


def _apart(p, q, half_w: float, half_h: float) -> float:
    """How far apart two boxes centred at p and q are, in units of touching (< 1: they overlap)."""
    return max(abs(p[0] - q[0]) / half_w, abs(p[1] - q[1]) / half_h)


def _place(source, target, size, nodes, labels) -> tuple[float, tuple[float, float]]:
    """The arc3 ``rad`` and the label's centre (a point of the arc) of the candidates that keep the
    arrow clear of the nodes it does not join and its label clear of nodes and earlier labels;
    straighter arrows and labels nearer the middle on a tie. ``labels``: (centre, size) placed so far."""
    w, h = size
    rads = (0.15, -0.15, 0.3, -0.3, 0.45, -0.45)
    # how close each arrow passes to the nodes it does not join (it depends on the bend alone)
    near_node = {rad: min((math.dist(_on_arc(source, target, rad, k / 10), q) for k in range(2, 9) for q in nodes),
                          default=9.0) for rad in rads}

    def score(candidate):
        rad, t = candidate
        centre = _on_arc(source, target, rad, t)
        label_node = min((_apart(centre, q, w / 2 + _NODE_R, h / 2 + _NODE_R) for q in nodes), default=9.0)
        label_label = min((_apart(centre, q, (w + qw) / 2, (h + qh) / 2) for q, (qw, qh) in labels), default=9.0)
        return (min(near_node[rad], 0.9) + min(label_node, 1.2) + min(label_label, 1.2)
                - 0.2 * abs(rad) - 0.2 * abs(t - 0.5))

    rad, t = max(((r, t) for r in rads for t in (0.5, 0.4, 0.6, 0.3, 0.7)), key=score)
    return rad, _on_arc(source, target, rad, t)


def draw_cell(ax, nodes: Sequence, concat: Sequence[int], title: str) -> None:
    """A cell as a graph: inputs c_{k-2}, c_{k-1}, intermediate nodes, output c_k. One arrow per
    input a node keeps, labelled with its ops (DST may keep several ops on one edge, and a node any
    number of inputs). Each arrow bends, and its label sits along it, where they stay clearest of
    the nodes and of the labels drawn before."""
    n = len(nodes)
    pos = {0: (0.0, 1.6), 1: (0.0, -1.6)}
    for j in range(n):
        pos[j + 2] = (2.2 + 1.9 * j, 0.8 if j % 2 else -0.8)
    out = (2.2 + 1.9 * n, 0.0)
    names = {0: "c_{k-2}", 1: "c_{k-1}", **{j + 2: str(j) for j in range(n)}}
    for state, (x, y) in pos.items():
        color = "#a6cee3" if state < 2 else "#fdbf6f"
        ax.annotate(f"${names[state]}$" if state < 2 else names[state], (x, y), ha="center", va="center",
                    fontsize=9, bbox={"boxstyle": "circle", "fc": color, "ec": "black"}, zorder=3)
    ax.annotate("$c_k$", out, ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "circle", "fc": "#b2df8a", "ec": "black"}, zorder=3)
    labels: list[tuple[tuple[float, float], tuple[float, float]]] = []
    for j, node in enumerate(nodes):
        target = pos[j + 2]
        ops_from: dict[int, list[str]] = {}
        for op, i in node:
            ops_from.setdefault(i, []).append(op)
        for i, ops in ops_from.items():
            source = pos[i]
            others = [p for state, p in pos.items() if state not in (i, j + 2)] + [out]
            size = _label_size(ops)
            rad, centre = _place(source, target, size, others, labels)
            ax.annotate("", target, source, zorder=1,
                        arrowprops={"arrowstyle": "->", "color": "0.3", "shrinkA": 11, "shrinkB": 11,
                                    "connectionstyle": f"arc3,rad={rad}"})
            labels.append((centre, size))
            ax.text(*centre, "\n".join(ops), fontsize=6, ha="center", va="center", zorder=2, linespacing=1.1,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    for state in concat:
        ax.annotate("", out, pos[state], zorder=1,
                    arrowprops={"arrowstyle": "->", "color": "0.6", "linestyle": "--", "shrinkA": 11, "shrinkB": 11})
    ax.set_xlim(-0.5, out[0] + 0.5)
    ax.set_ylim(-2.6, 2.6)
    ax.set_aspect("equal")    # arcs bend in display space: equal scales put the labels on them
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)


def cell_diagrams(rows: Sequence[tuple[str, dict]]) -> Figure:
    """Normal and reduction cell of each (label, genotype dict), one row per genotype."""
    fig = Figure(figsize=(13, 3.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 2, squeeze=False)
    for (label, genotype), (ax_n, ax_r) in zip(rows, axes):
        draw_cell(ax_n, genotype["normal"], genotype["normal_concat"], f"{label}: normal cell")
        draw_cell(ax_r, genotype["reduce"], genotype["reduce_concat"], f"{label}: reduction cell")
    return fig


def best_cells(trials: pd.DataFrame, key: str) -> Optional[Figure]:
    """Cell diagrams of the best finished trial (lowest error) of each group of ``key``."""
    err = error_column(trials)
    df, order = _categories(trials[trials["genotype"].notna() & trials[err].notna()], key)
    if df.empty:
        return None
    best = df.loc[pd.to_numeric(df[err]).groupby(df[key]).idxmin().reindex(order)]   # one row per group
    return cell_diagrams([(f"{key}={value} (error {100 * error:.2f}%)", json.loads(genotype))
                          for value, error, genotype in zip(order, best[err], best["genotype"])])


def sampled_setting(trials: pd.DataFrame, key: str, log: bool) -> Figure:
    """Error, kept connections and search time against a sampled numeric setting: every trial a dot
    (coloured by status: a trial stopped early has a shorter search), and a least-squares trend
    (in log(value) where the setting was drawn log-uniformly, on a log axis)."""
    df = trials.assign(__x=pd.to_numeric(trials[setting_column(trials, key)], errors="coerce")).dropna(subset=["__x"])
    err = error_column(df)
    panels = [(err, ERROR_LABELS[err], 100.0), ("kept_total", "kept connections", 1.0),
              ("search_seconds", "search time (s)", 1.0)]
    panels = [p for p in panels if p[0] in df.columns and df[p[0]].notna().any()]
    fig = Figure(figsize=(4.2 * len(panels), 3.8), layout="constrained")
    for i, (column, label, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        d = df.assign(__y=pd.to_numeric(df[column], errors="coerce") * scale).dropna(subset=["__y"])
        sns.scatterplot(data=d, x="__x", y="__y", hue="status", ax=ax, legend=i == 0)
        if len(d) > 2 and d["__x"].nunique() > 1:
            sns.regplot(data=d, x="__x", y="__y", logx=log, scatter=False, ci=None, color="0.3", ax=ax,
                        line_kws={"linewidth": 1, "linestyle": "--"})
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(key + (" (log scale)" if log else ""))
        ax.set_ylabel(label)
    fig.suptitle(f"against sampled {key}: every trial, and a least-squares trend")
    return fig

