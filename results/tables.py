"""Trial DataFrame -> ablation tables: mean, standard deviation and count per group of trials
(the seeds of a configuration, and in a table by fewer settings than were swept, the values of
the others).

Failed, diverged and unfinished trials stay in the counts (``n_trials``, ``n_failed``,
``n_running``); their missing errors are not averaged in, and ``n`` says how many were.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import pandas as pd

from entrannas.config import did_you_mean

#: value columns summarised, with the label and scale used in Markdown/LaTeX
VALUES: dict[str, tuple[str, float]] = {
    "valid_error": ("super-net valid error (%)", 100.0),
    "valid_error_rise": ("last minus best epoch (points)", 100.0),
    "derived_valid_error": ("derived-net valid error (%)", 100.0),
    "genotype_stability": ("last-epoch stability", 1.0),
    "eval_test_error": ("test error (%)", 100.0),
    "kept_total": ("kept connections", 1.0),
    "params_m": ("params, evaluated net (M)", 1.0),
    "multiply_adds_m": ("multiply-adds, evaluated net (M)", 1.0),
    "standard_params_m": ("params, standard net (M)", 1.0),
    "standard_multiply_adds_m": ("multiply-adds, standard net (M)", 1.0),
    "search_seconds": ("search time (s)", 1.0),
    "gpu_hours": ("GPU-hours", 1.0),
    "workers": ("data-parallel workers", 1.0),
    "images_per_second": ("search throughput (images/s)", 1.0),
    "peak_memory_mb": ("peak memory (MB)", 1.0),
}
MISSING = "-"


def summarize(trials: pd.DataFrame, by: Sequence[str], values: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per group of ``by`` (setting names, 'mode', 'experiment', ...): for each value
    column its ``_mean``, ``_std`` (sample, ddof=1) and ``_n``, plus trial counts per status.
    Rows in the order of ``levels``, by the first key, then the second..."""
    if not by:
        raise ValueError("summarize needs at least one column to group by")
    columns = {key: _column(trials, key) for key in by}
    frame = trials.assign(**{f"__{k}": trials[c].map(group_key) for k, c in columns.items()})
    values = [v for v in (values or VALUES) if v in trials.columns and trials[v].notna().any()]
    rows = []
    for keys, group in frame.groupby([f"__{k}" for k in by], sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        row = dict(zip(by, keys))
        row["n_trials"] = len(group)
        row["n_failed"] = int(group["status"].isin(["failed", "diverged"]).sum())
        row["n_running"] = int((group["status"] == "running").sum())
        row["n_stopped"] = int((group["status"] == "stopped").sum())
        for v in values:
            series = pd.to_numeric(group[v], errors="coerce").dropna()
            row[f"{v}_mean"] = series.mean() if len(series) else math.nan
            row[f"{v}_std"] = series.std(ddof=1) if len(series) > 1 else math.nan
            row[f"{v}_n"] = len(series)
        rows.append(row)
    rank = {k: {v: i for i, v in enumerate(levels(frame[f"__{k}"]))} for k in by}
    rows.sort(key=lambda row: tuple(rank[k][row[k]] for k in by))
    return pd.DataFrame(rows)


def mixed_unset(trials: pd.DataFrame, by: Sequence[str]) -> tuple[pd.Series, list[str]]:
    """The trials a table by ``by`` leaves out, as a mask, and the settings that made it.

    A trial that does not set a setting of ``by`` (a darts trial has no ``lambda_``) falls in a '-'
    row. Where that row pools trials that differ in a swept setting which every other row holds
    fixed (darts and entrannas under ``lambda_`` '-', while each lambda_ row is dst alone), it is no
    configuration of the study, only a mix of several, and its mean and spread would mean nothing:
    those trials are left out. A '-' row of one configuration (the darts trials alone) stays, and so
    does one that varies only in what the other rows vary in too (a marginal like theirs)."""
    keys = pd.DataFrame({k: trials[_column(trials, k)].map(group_key) for k in by}, index=trials.index)
    unset = (keys == MISSING).any(axis=1)
    others = pd.DataFrame({c.removeprefix("setting:"): trials[c].map(group_key).astype(str) for c in trials.columns
                           if (c.startswith("setting:") or c == "mode")
                           and c.removeprefix("setting:") not in (*by, "seed")}, index=trials.index)

    def varying(rows: pd.DataFrame) -> set[str]:
        """The settings of ``others`` that take more than one value within a row of the table."""
        per_row = others.loc[rows.index].groupby([rows[k] for k in by], sort=False).nunique()
        return set(per_row.columns[(per_row > 1).any()])

    left_out = pd.Series(False, index=trials.index)
    mixed: set[str] = set()
    pooled_anyway = varying(keys[~unset])
    for _, group in keys[unset].groupby(list(by), sort=False):
        differ = varying(group) - pooled_anyway
        if differ:
            left_out[group.index] = True
            mixed |= differ
    return left_out, sorted(mixed)


def setting_column(df: pd.DataFrame, key: str) -> str:
    """The column of setting ``key``: ``setting:KEY`` where the frame has it (a swept setting), else
    ``key`` itself (a column such as ``mode``, or one the frame lacks)."""
    return f"setting:{key}" if f"setting:{key}" in df.columns else key


def _column(trials: pd.DataFrame, key: str) -> str:
    """``setting_column``, which must exist: a table cannot group by what no trial has."""
    column = setting_column(trials, key)
    if column in trials.columns:
        return column
    settings = sorted(c.split(":", 1)[1] for c in trials.columns if c.startswith("setting:"))
    raise KeyError(f"--group-by {key!r}: not a column; {did_you_mean(key, settings)}"
                   f"swept settings are {', '.join(settings) or 'none'}")


def is_number(value) -> bool:
    """A setting value that orders by size: any real number (numpy's too), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool)


def levels(values) -> list:
    """The distinct group keys of a setting (``group_key``'s values) in the order every table and
    figure shows them: numbers by value, then text in alphabetical order, then '-' (not set)."""
    distinct = set(values)
    numbers = sorted(v for v in distinct if is_number(v))
    text = sorted((v for v in distinct if not is_number(v) and v != MISSING), key=str)
    return numbers + text + ([MISSING] if MISSING in distinct else [])


def group_key(value):
    """Group keys: missing values (a setting absent from some grid blocks) become '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return value


def _cell(row: pd.Series, value: str, scale: float) -> str:
    mean, std, n = row.get(f"{value}_mean"), row.get(f"{value}_std"), row.get(f"{value}_n", 0)
    if not n or pd.isna(mean):
        return MISSING
    digits = 2 if scale != 1.0 or abs(mean) < 100 else 0
    text = f"{mean * scale:.{digits}f}"
    if not pd.isna(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def display_table(summary: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """The summary as text cells: 'mean ± std' per value, and the trial counts."""
    out = summary[list(by)].astype(str).copy()
    for value, (label, scale) in VALUES.items():
        if f"{value}_mean" in summary.columns:
            out[label] = [_cell(row, value, scale) for _, row in summary.iterrows()]
    out["n (done / trials)"] = [f"{int(r[f'{_first_value(summary)}_n'])} / {int(r['n_trials'])}"
                                if _first_value(summary) else f"- / {int(r['n_trials'])}"
                                for _, r in summary.iterrows()]
    out["failed"] = summary["n_failed"].astype(int).astype(str)
    if summary["n_stopped"].sum():
        out["stopped early"] = summary["n_stopped"].astype(int).astype(str)
    return out


def binned(trials: pd.DataFrame, key: str, max_bins: int = 4) -> Optional[pd.DataFrame]:
    """A summary of the trials by ranges of a sampled numeric setting: quantile bins (at least two
    trials each, at most ``max_bins``), labelled by the values they hold, in order. None when
    fewer than two trials set it."""
    column = _column(trials, key)
    values = pd.to_numeric(trials[column], errors="coerce")
    has = values.notna()
    if has.sum() < 2:
        return None
    bins = min(max_bins, int(has.sum()) // 2)
    index = pd.qcut(values[has].rank(method="first"), bins, labels=False)
    frame = trials[has].assign(**{f"__bin_{key}": index})
    summary = summarize(frame, [f"__bin_{key}"])
    spans = values[has].groupby(index).agg(["min", "max"])
    summary.insert(0, key, [f"{spans.loc[b, 'min']:.3g} to {spans.loc[b, 'max']:.3g}" for b in summary[f"__bin_{key}"]])
    return summary.drop(columns=[f"__bin_{key}"])


def best_trials(trials: pd.DataFrame, metric: str, mode: str, settings: Sequence[str], k: int = 5) -> pd.DataFrame:
    """The ``k`` best trials by the sweep's metric (``mode`` min or max), with their settings."""
    if metric not in trials.columns:
        return pd.DataFrame()
    ranked = trials[pd.to_numeric(trials[metric], errors="coerce").notna()]
    ranked = ranked.sort_values(metric, ascending=mode == "min").head(k)
    columns = {"trial_id": "trial", "status": "status", **{setting_column(trials, s): s for s in settings},
               metric: metric, "kept_total": "kept connections", "search_seconds": "search time (s)"}
    return ranked[[c for c in columns if c in ranked.columns]].rename(columns=columns).reset_index(drop=True)


def _first_value(summary: pd.DataFrame) -> Optional[str]:
    for value in ("eval_test_error", "valid_error"):
        if f"{value}_n" in summary.columns:
            return value
    return None


def to_markdown(table: pd.DataFrame) -> str:
    cols = [str(c) for c in table.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (\\toprule, \\midrule, \\bottomrule)."""
    def esc(text) -> str:
        text = str(text)
        for a, b in (("\\", "\\textbackslash{}"), ("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"),
                     ("±", "$\\pm$")):
            text = text.replace(a, b)
        return text

    cols = list(table.columns)
    lines = ["\\begin{tabular}{" + "l" * len(cols) + "}", "\\toprule",
             " & ".join(esc(c) for c in cols) + " \\\\", "\\midrule"]
    lines += [" & ".join(esc(v) for v in row) + " \\\\" for _, row in table.iterrows()]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"
