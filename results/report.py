"""``entrannas-tune report``: tables, plots and an index page for one or more experiments."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from . import plots
from .collect import load, sweep_tuning, swept_settings
from .tables import (best_trials, binned, display_table, mixed_unset, setting_column, summarize, to_latex,
                     to_markdown)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_") or "x"


def trials_csv(trials: pd.DataFrame) -> pd.DataFrame:
    """Settings without their ``setting:`` prefix (dropping duplicates of seed/mode)."""
    renamed = {}
    for c in trials.columns:
        if c.startswith("setting:"):
            name = c.split(":", 1)[1]
            renamed[c] = None if name in trials.columns else name
    out = trials.drop(columns=[c for c, n in renamed.items() if n is None])
    return out.rename(columns={c: n for c, n in renamed.items() if n})


def write_report(paths: Sequence[os.PathLike], out: Optional[os.PathLike] = None,
                 group_by: Optional[Sequence[str]] = None) -> Path:
    """Write trials.csv, tables/, plots/ and index.md; returns the index path."""
    paths = [Path(p).expanduser().resolve() for p in paths]
    trials, epochs = load(paths)
    out = Path(out) if out else paths[0] / "report"
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    trials_csv(trials).to_csv(out / "trials.csv", index=False)

    multi = trials["experiment"].nunique() > 1 if not trials.empty else False
    tuning = sweep_tuning(paths)
    # settings drawn from a range: binned tables and scatter plots, not a row per value
    ranged = {k: d for k, d in tuning["sample"].items() if d != "choice" and setting_column(trials, k) in trials}
    if group_by:
        groupings = [list(group_by)]
    else:
        keys = [k for k in swept_settings(trials) if k not in ("seed", *ranged)] if not trials.empty else []
        groupings = [[k] for k in keys]
        if len(keys) > 1:
            groupings.append(keys)
        if multi:
            groupings = [["experiment", *g] for g in groupings] or [["experiment"]]
        if not groupings and not ranged:
            groupings = [["mode"]] if not trials.empty else []

    sections = [f"# Report: {', '.join(p.name for p in paths)}\n"]
    if not trials.empty:
        counts = trials["status"].value_counts().to_dict()
        sections.append(f"{len(trials)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                        + ". Each row gives mean ± sd over its trials: the seeds of a configuration, and the values of "
                        "any swept setting its table does not show. `n` counts the trials that have a value.\n")
        failed = trials[trials["status"].isin(["failed", "diverged"])]
        if len(failed):
            sections.append("Failed or diverged trials:\n\n" + "\n".join(
                f"- `{r.trial_id}` ({r.status}): {r.error}" for r in failed.itertuples()) + "\n")
        if tuning["sample"]:
            sections.append(_best_section(trials, tuning, out))
        for key, dist in ranged.items():
            sections.append(_binned_section(trials, key, dist, out))

    for by in groupings:
        name = _safe("_".join(by))
        left_out, mixed = mixed_unset(trials, by)
        note = (f"\n{int(left_out.sum())} trials that set no {' or '.join(by)} are not in this table: they "
                f"differ in {', '.join(mixed)}, so a '-' row would mix them.\n" if mixed else "")
        if left_out.all():
            sections.append(f"## By {', '.join(by)}\n{note}")
            continue
        summary = summarize(trials[~left_out], by)
        summary.to_csv(out / "tables" / f"{name}.csv", index=False)
        sections.append(f"## By {', '.join(by)}\n\n{_write_table(display_table(summary, by), out, name)}{note}")

    figures = []
    if not trials.empty:
        plot_keys = list(dict.fromkeys(k for g in groupings for k in g if k != "experiment")) if group_by is None \
            else [k for k in group_by if k not in ranged]
        if multi and not plot_keys:
            plot_keys = ["experiment"]
        for key in plot_keys:
            figures += _figures_for(trials, epochs, key)
    for key, dist in ranged.items():
        figures.append((f"{_safe(key)}_sampled", f"trials against sampled {key}",
                        plots.sampled_setting(trials, key, log="log" in dist)))
    for name, title, fig in figures:
        fig.savefig(out / "plots" / f"{name}.png", dpi=110)
        sections.append(f"### {title}\n\n![{title}](plots/{name}.png)\n")
    index = out / "index.md"
    index.write_text("\n".join(sections))
    return index


def _write_table(table: pd.DataFrame, out: Path, name: str) -> str:
    (out / "tables" / f"{name}.md").write_text(to_markdown(table))
    (out / "tables" / f"{name}.tex").write_text(to_latex(table))
    return to_markdown(table)


def _best_section(trials: pd.DataFrame, tuning: dict, out: Path) -> str:
    """The best trials by the sweep's own metric, with every setting they were given."""
    settings = [c.split(":", 1)[1] for c in trials.columns if c.startswith("setting:")]
    best = best_trials(trials, tuning["metric"], tuning["mode"], settings)
    if best.empty:
        return f"## Best trials\n\nNo trial reported {tuning['metric']} yet.\n"
    best.to_csv(out / "tables" / "best.csv", index=False)
    best = best.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)
    caution = ("The sweep chose by the test set's error: these errors are biased low and are no estimate of "
               "the error on new data.\n\n" if tuning["metric"] == "eval_test_error" else "")
    return (f"## Best trials by {tuning['metric']} ({tuning['mode']}imised by the sweep)\n\n{caution}"
            + _write_table(best, out, "best"))


def _binned_section(trials: pd.DataFrame, key: str, dist: str, out: Path) -> str:
    """A table of the trials by ranges of a setting drawn from a distribution."""
    summary = binned(trials, key)
    if summary is None:
        return f"## By {key} ({dist}, binned)\n\nFewer than two trials set {key}.\n"
    name = f"{_safe(key)}_binned"
    summary.to_csv(out / "tables" / f"{name}.csv", index=False)
    return (f"## By {key} ({dist}, binned)\n\nTrials in ranges of {key} holding about equally many draws; "
            "mean ± sd over the trials of a range. A trial stopped early reports its last epoch's errors.\n\n"
            + _write_table(display_table(summary, [key]), out, name))


def _figures_for(trials: pd.DataFrame, epochs: pd.DataFrame, key: str) -> list:
    """The figures of one setting, without the trials its table leaves out (``mixed_unset``)."""
    figs = []
    left_out = mixed_unset(trials, [key])[0]
    if left_out.all():
        return figs
    if left_out.any():
        trial = ["experiment", "trial_id"]
        gone = pd.MultiIndex.from_frame(trials.loc[left_out, trial])
        trials = trials[~left_out]
        if not epochs.empty:
            epochs = epochs[~pd.MultiIndex.from_frame(epochs[trial]).isin(gone)]
    column = setting_column(trials, key)
    values = trials[column] if column in trials.columns else pd.Series(dtype=object)
    safe = _safe(key)
    if key == "lambda_" or (plots.is_numeric(values.dropna()) and values.nunique() > 2 and key != "seed"):
        err = plots.error_column(trials)
        figs.append((f"{safe}_error", f"error vs {key}",
                     plots.metric_vs_setting(trials, key, err, plots.ERROR_LABELS[err], 100.0)))
        if "kept_total" in trials.columns:
            figs.append((f"{safe}_kept", f"kept connections vs {key}",
                         plots.metric_vs_setting(trials, key, "kept_total",
                                                 "kept connections (normal + reduction cell)")))
    figs.append((f"{safe}_error_cost", f"error and search cost per {key}", plots.error_and_cost(trials, key)))
    if not epochs.empty:
        figs.append((f"{safe}_curves", f"validation error per epoch, per {key}", plots.learning_curves(epochs, key)))
        figs.append((f"{safe}_trajectories", f"tau and thresholds per {key}", plots.trajectories(epochs, key)))
        if "genotype_stability" in epochs.columns and epochs["genotype_stability"].notna().any():
            figs.append((f"{safe}_settling", f"genotype stability and derived-net gap per {key}",
                         plots.settling(epochs, key)))
    if any(c.startswith("op:") for c in trials.columns):
        figs.append((f"{safe}_ops", f"operation frequency per {key}", plots.op_heatmap(trials, key)))
    cells = plots.best_cells(trials, key)
    if cells is not None:
        figs.append((f"{safe}_cells", f"best cell of each {key}", cells))
    return figs
