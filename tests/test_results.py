"""Report tables and plots: on hand-made frames (exact numbers) and on a real small sweep."""

import json
import math
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from entrannas.cli import main
from entrannas.zoo import ZOO
from results import plots, report
from results.collect import NotAnExperiment, genotype_summary, load
from results.report import write_report
from results.tables import VALUES, display_table, levels, mixed_unset, summarize, to_latex, to_markdown


def frame(rows):
    base = {"experiment": "e", "status": "done", "search_seconds": 10.0, "genotype": None, "error": None}
    return pd.DataFrame([{**base, **r} for r in rows])


def test_summary_means_stds_counts_and_failed_trials():
    df = frame([
        {"setting:lambda_": 0.1, "seed": 0, "valid_error": 0.10},
        {"setting:lambda_": 0.1, "seed": 1, "valid_error": 0.20},
        {"setting:lambda_": 0.1, "seed": 2, "valid_error": 0.60},
        {"setting:lambda_": 0.5, "seed": 0, "valid_error": 0.30},
        {"setting:lambda_": 0.5, "seed": 1, "valid_error": None, "status": "failed", "error": "boom"},
        {"setting:lambda_": 0.9, "seed": 0, "valid_error": None, "status": "diverged", "error": "loss is nan"},
        {"setting:lambda_": 0.9, "seed": 1, "valid_error": 0.4, "status": "running"},
    ])
    s = summarize(df, ["lambda_"]).set_index("lambda_")
    assert (s.loc[0.9, "n_trials"], s.loc[0.9, "n_failed"], s.loc[0.9, "n_running"]) == (2, 1, 1), \
        "a diverged trial counts as failed"
    assert s.loc[0.1, "valid_error_mean"] == pytest.approx(0.3)
    assert s.loc[0.1, "valid_error_std"] == pytest.approx(np.std([0.1, 0.2, 0.6], ddof=1))
    assert s.loc[0.1, "valid_error_n"] == 3 and s.loc[0.1, "n_failed"] == 0
    assert s.loc[0.5, "valid_error_n"] == 1 and s.loc[0.5, "n_trials"] == 2 and s.loc[0.5, "n_failed"] == 1
    assert math.isnan(s.loc[0.5, "valid_error_std"]), "no spread from one value"
    table = display_table(summarize(df, ["lambda_"]), ["lambda_"])
    assert table.loc[0, "super-net valid error (%)"] == "30.00 ± 26.46"
    assert table.loc[1, "n (done / trials)"] == "1 / 2" and table.loc[1, "failed"] == "1"


def test_grouping_by_two_keys_and_missing_values():
    df = frame([
        {"setting:mode": "dst", "setting:lambda_": 0.1, "seed": 0, "valid_error": 0.1},
        {"setting:mode": "dst", "setting:lambda_": 0.1, "seed": 1, "valid_error": 0.3},
        {"setting:mode": "dst", "setting:lambda_": 0.5, "seed": 0, "valid_error": 0.5},
        {"setting:mode": "darts", "seed": 0, "valid_error": 0.7},
    ])
    s = summarize(df, ["mode", "lambda_"])
    assert len(s) == 3
    darts = s[s["mode"] == "darts"].iloc[0]
    assert darts["lambda_"] == "-" and darts["valid_error_mean"] == pytest.approx(0.7)
    dst = s[(s["mode"] == "dst") & (s["lambda_"] == 0.1)].iloc[0]
    assert dst["valid_error_mean"] == pytest.approx(0.2) and dst["n_trials"] == 2
    with pytest.raises(KeyError, match="swept settings are lambda_, mode"):
        summarize(df, ["colour"])
    with pytest.raises(KeyError, match="did you mean 'lambda_'. swept settings are lambda_, mode"):
        summarize(df, ["lamda"])


def test_a_table_by_a_setting_leaves_out_a_row_that_would_mix_configurations(tmp_path, monkeypatch):
    """lambda_ is swept for dst only. Under lambda_, darts and entrannas trials share the '-' row, a
    mix of two modes whose mean means nothing: the table and figures by lambda_ leave them out and
    say so. A '-' row of one configuration stays, and the table by mode and lambda_ keeps them all."""
    rows = [{"setting:mode": "dst", "setting:lambda_": lam, "seed": s, "valid_error": 0.1 + lam}
            for lam in (0.0, 0.5) for s in (0, 1)]
    rows += [{"setting:mode": mode, "seed": s, "valid_error": err}
             for mode, err in (("darts", 0.1), ("entrannas", 0.9)) for s in (0, 1)]
    df = frame(rows)
    df["trial_id"] = [f"t{i}" for i in range(len(df))]
    left_out, mixed = mixed_unset(df, ["lambda_"])
    assert list(left_out) == [False] * 4 + [True] * 4 and mixed == ["mode"]
    assert not mixed_unset(df, ["mode", "lambda_"])[0].any()
    darts_only = df[df["setting:mode"] != "entrannas"]
    assert not mixed_unset(darts_only, ["lambda_"])[0].any(), "darts alone under '-' is one configuration"
    both_modes = frame([{"setting:mode": m, "setting:lambda_": lam, "seed": 0, "valid_error": 0.5}
                        for m in ("dst", "entrannas") for lam in (0.0, 0.5)] + rows[4:])
    assert not mixed_unset(both_modes, ["lambda_"])[0].any(), \
        "where each lambda_ row pools both modes too, the '-' row is a marginal like the others"

    monkeypatch.setattr("results.report.load", lambda paths: (df, pd.DataFrame()))
    (tmp_path / "e").mkdir()
    text = write_report([tmp_path / "e"]).read_text()
    out = tmp_path / "e" / "report"
    assert list(pd.read_csv(out / "tables" / "lambda.csv")["lambda_"]) == [0.0, 0.5]
    assert "4 trials that set no lambda_ are not in this table: they differ in mode" in text
    both = pd.read_csv(out / "tables" / "mode_lambda.csv", keep_default_na=False)
    assert sorted(zip(both["mode"], both["lambda_"].astype(str))) == [
        ("darts", "-"), ("dst", "0.0"), ("dst", "0.5"), ("entrannas", "-")]
    assert set(pd.read_csv(out / "tables" / "mode.csv")["n_trials"]) == {2, 4}
    cost = plots.error_and_cost(df[~left_out], "lambda_")
    assert [t.get_text() for t in cost.axes[0].get_xticklabels()] == ["0.0", "0.5"]
    saved = report._figures_for(df, pd.DataFrame(), "lambda_")
    ticks = [t.get_text() for name, _, fig in saved if name == "lambda_error_cost"
             for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["0.0", "0.5"], "the figures leave out what the table does"
    curves = {}
    for name in ("learning_curves", "trajectories"):
        monkeypatch.setattr(plots, name, lambda epochs, key, name=name: curves.setdefault(name, epochs))
    # t4 of another experiment is another trial: it stays
    epochs = pd.DataFrame({"experiment": ["e"] * 8 + ["other"], "trial_id": [*df["trial_id"], "t4"], "epoch": 0})
    report._figures_for(df.assign(experiment="e"), epochs, "lambda_")
    kept = [("e", "t0"), ("e", "t1"), ("e", "t2"), ("e", "t3"), ("other", "t4")]
    assert {name: list(zip(f["experiment"], f["trial_id"])) for name, f in curves.items()} == \
        {"learning_curves": kept, "trajectories": kept}, "the per-epoch figures leave out the same trials"

    # --group-by a setting no trial gives a value: every trial is left out, and the page says so
    unset = df.assign(**{"setting:lambda_": None})
    monkeypatch.setattr("results.report.load", lambda paths: (unset, pd.DataFrame()))
    text = write_report([tmp_path / "e"], out=tmp_path / "unset", group_by=["lambda_"]).read_text()
    assert "8 trials that set no lambda_ are not in this table: they differ in mode" in text
    assert not (tmp_path / "unset" / "tables" / "lambda.csv").exists()
    assert not list((tmp_path / "unset" / "plots").glob("*.png"))


def test_markdown_and_booktabs_latex():
    df = frame([{"setting:mode": "dst", "seed": 0, "valid_error": 0.25}])
    table = display_table(summarize(df, ["mode"]), ["mode"])
    md = to_markdown(table)
    assert md.splitlines()[0].startswith("| mode | super-net valid error (%)") and "| dst | 25.00 |" in md
    tex = to_latex(table)
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "(\\%)" in tex


def test_figures_carry_their_axis_labels():
    df = frame([{"setting:lambda_": lam, "seed": s, "valid_error": 0.1 + lam, "kept_total": 20 - 10 * lam,
                 "op:sep_conv_3x3": 3, "op:skip_connect": 1}
                for lam in (0.0, 0.1, 0.5) for s in (0, 1)])
    fig = plots.metric_vs_setting(df, "lambda_", "valid_error", "super-net validation error (%)", 100)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "lambda_" and ax.get_ylabel() == "super-net validation error (%)"
    assert "mean ± sd" in ax.get_title()
    fig = plots.error_and_cost(df, "lambda_")
    assert [a.get_ylabel() for a in fig.axes[:2]] == ["super-net validation error (%)", "search time (s)"]
    assert plots.error_and_cost(df.assign(search_seconds=600.0), "lambda_").axes[1].get_ylabel() == "search time (min)"
    hours = plots.error_and_cost(df.assign(search_seconds=5 * 3600.0), "lambda_").axes[1]
    assert hours.get_ylabel() == "search time (h)" and max(p.get_height() for p in hours.patches) == pytest.approx(5)
    fig = plots.op_heatmap(df, "lambda_")
    assert fig.axes[0].get_xlabel() == "operation" and fig.axes[0].get_ylabel() == "lambda_"
    epochs = pd.DataFrame([{"experiment": "e", "setting:lambda_": 0.1, "seed": 0, "epoch": e, "tau": 1 - e / 10,
                            "valid_error": 0.5, "threshold_normal": 0.5 + e / 100} for e in range(3)])
    fig = plots.trajectories(epochs, "lambda_")
    assert [a.get_ylabel() for a in fig.axes[:2]] == ["temperature tau", "mean threshold, normal cell"]
    assert plots.learning_curves(epochs, "lambda_").axes[0].get_xlabel() == "search epoch"


def test_every_table_and_figure_orders_a_setting_alike_numbers_numerically_and_unset_last():
    """As text, 10 would sort before 2, and '-' before any name. Tables and figures share one order:
    numbers by value, then text, then '-'."""
    assert levels([10, 2, "-", 0.5, np.int64(3)]) == [0.5, 2, 3, 10, "-"]
    assert levels(["entrannas", "-", "darts", "dst"]) == ["darts", "dst", "entrannas", "-"]
    values = (10, 2, None)
    trials = frame([{"setting:layers": v, "seed": s, "valid_error": 0.2, "op:skip_connect": 1,
                     "genotype": json.dumps(ZOO["DARTS_V2"].to_dict())} for v in values for s in (0, 1)])
    want = ["2.0", "10.0", "-"]    # a setting column with a gap is a float column
    assert [str(v) for v in summarize(trials, ["layers"])["layers"]] == want
    text = frame([{"setting:placement": v, "seed": 0, "valid_error": 0.2} for v in ("first", None, "all")])
    assert list(summarize(text, ["placement"])["placement"]) == ["all", "first", "-"], "'-' last, as in the figures"
    fig = plots.error_and_cost(trials, "layers")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == want
    assert [t.get_text() for t in plots.op_heatmap(trials, "layers").axes[0].get_yticklabels()] == want
    assert [ax.get_title().split(" ")[0] for ax in plots.best_cells(trials, "layers").axes[::2]] == \
        [f"layers={v}" for v in want]
    epochs = pd.DataFrame([{"experiment": "e", "setting:layers": v, "seed": 0, "epoch": e, "tau": 1.0,
                            "valid_error": 0.5} for v in values for e in range(3)])
    for figure in (plots.learning_curves, plots.trajectories):
        ax = figure(epochs, "layers").axes[0]
        assert ax.get_legend_handles_labels()[1] == want
        assert all(float(t).is_integer() for t in ax.get_xticks()), "epochs are whole numbers"
    dashes = [line.get_linestyle() for line in plots.trajectories(epochs, "layers").axes[0].get_lines()[:3]]
    assert len(set(dashes)) > 1, "curves that coincide (tau of two modes) stay apart by their dashes"
    epochs["threshold_normal"] = [0.5 if v == 10 else None for v in epochs["setting:layers"]]
    tau, threshold = plots.trajectories(epochs, "layers").axes[:2]
    styles = [{label: (h.get_color(), h.get_linestyle()) for h, label in zip(*ax.get_legend_handles_labels())}
              for ax in (tau, threshold)]
    assert list(styles[1]) == ["10.0"] and styles[1]["10.0"] == styles[0]["10.0"], "one look per group in every panel"


def test_curves_for_a_setting_whose_only_trials_finished_no_epoch():
    """A sweep's only trial at lr=1e30 diverges in its first epoch: the trials frame has its lr, the
    epochs frame no lr column at all. The curves then put every epoch under the missing value."""
    epochs = pd.DataFrame([{"experiment": "e", "seed": s, "epoch": e, "tau": 1.0, "valid_error": 0.5}
                           for s in (0, 1) for e in range(2)])
    for figure in (plots.learning_curves, plots.trajectories):
        labels = figure(epochs, "lr").axes[0].get_legend_handles_labels()[1]
        assert labels == ["-"]


def test_cell_diagram_draws_a_node_with_three_inputs_and_an_edge_with_two_ops():
    genotype = {"normal": [[["sep_conv_3x3", 0]], [["skip_connect", 0], ["max_pool_3x3", 1], ["dil_conv_3x3", 2]]],
                "normal_concat": [2, 3], "reduce": [[["max_pool_3x3", 0], ["sep_conv_5x5", 0]]], "reduce_concat": [2]}
    fig = plots.cell_diagrams([("test", genotype)])
    normal, reduce = fig.axes
    from matplotlib.text import Annotation

    def labels(ax):
        return sorted(t.get_text() for t in ax.texts if not isinstance(t, Annotation))

    def arrows(ax):
        return [t for t in ax.texts if isinstance(t, Annotation) and t.get_text() == ""]

    assert labels(normal) == ["dil_conv_3x3", "max_pool_3x3", "sep_conv_3x3", "skip_connect"]
    assert len(arrows(normal)) == 4 + 2, "four op edges and two concat edges"
    nodes = [t.get_text() for t in normal.texts if isinstance(t, Annotation) and t.get_text()]
    assert nodes == ["$c_{k-2}$", "$c_{k-1}$", "0", "1", "$c_k$"]
    assert normal.get_title() == "test: normal cell"
    assert labels(reduce) == ["max_pool_3x3\nsep_conv_5x5"], "two ops on one edge: one arrow, both named"
    assert len(arrows(reduce)) == 1 + 1


def test_cell_diagram_labels_overlap_neither_each_other_nor_the_nodes():
    """Searched cells (DARTS-space zoo), a DST cell with several ops on some edges, and the dense
    cell of a DST search that has pruned nothing: every label box clear of every other and of the
    node circles, as drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation

    dst = json.loads((Path(__file__).parents[1] / "benchmarks" / "genotypes" / "dst-digits.json").read_text())
    dense_cell = [[[op, i] for i in range(j + 2) for op in ("sep_conv_3x3", "max_pool_3x3", "skip_connect")]
                  for j in range(4)]
    dense = {"normal": dense_cell, "normal_concat": [2, 3, 4, 5], "reduce": dense_cell, "reduce_concat": [2, 3, 4, 5]}
    rows = [(name, ZOO[name].to_dict()) for name in ("DARTS_V2", "PC_DARTS", "AmoebaNet")]
    rows += [("dst", dst), ("dense", dense)]
    fig = plots.cell_diagrams(rows)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        texts = [t for t in ax.texts if t.get_text()]
        boxes = [t.get_bbox_patch().get_window_extent(renderer) for t in texts if not isinstance(t, Annotation)]
        circles = [t.get_bbox_patch().get_window_extent(renderer) for t in texts if isinstance(t, Annotation)]
        assert len(boxes) >= 6 and len(circles) >= 7
        clashes = [(i, k) for i, a in enumerate(boxes) for k, b in enumerate(boxes[i + 1:] + circles) if a.overlaps(b)]
        assert not clashes, f"{ax.get_title()}: labels overlapping: {clashes}"


def test_genotype_summary_counts_ops_and_connections():
    s = genotype_summary(ZOO["DARTS_V2"].to_dict())
    assert s["kept_normal"] == [2, 2, 2, 2] and s["kept_total"] == 16
    assert s["op:sep_conv_3x3"] == 5 and s["op:max_pool_3x3"] == 5 and s["op:skip_connect"] == 5


def test_a_search_directory_reads_as_one_trial_and_its_epochs(tmp_path):
    """A search's output directory: running until its last epoch is written; valid error from the last
    epoch's accuracy; the cost of DARTS' 20-cell, 36-channel network for the dataset's classes; per epoch
    the mean threshold and the kept connections of both cells."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("mode: dst\ndataset: cifar100\nepochs: 3\nseed: 4\n")
    (run / "genotype.json").write_text(json.dumps(ZOO["DARTS_V2"].to_dict()))

    def epoch(e, acc):
        return json.dumps({"epoch": e, "valid_acc": acc, "seconds": 2.0, "tau": 1.0,
                           "thresholds": {"normal": [0.1, 0.2, 0.3, 0.4], "reduce": [0.5, 0.5, 0.6, 0.6]},
                           "kept_connections": {"normal": [1, 2, 3, 1], "reduce": [2, 2, 2, 2]}}) + "\n"

    (run / "history.jsonl").write_text(epoch(0, 0.6) + epoch(1, 0.75))
    trials, epochs = load([run])
    trial = trials.iloc[0]
    assert (trial["status"], trial["mode"], trial["seed"], trial["epochs_done"]) == ("running", "dst", 4, 2)
    assert trial["valid_error"] == pytest.approx(0.25) and trial["search_seconds"] == 4.0
    # DARTS_V2 on CIFAR-10 has 3,349,342 parameters; 90 more classes add 576 x 90 weights and 90 biases
    assert trial["standard_params_m"] == pytest.approx((3_349_342 + 576 * 90 + 90) / 1e6, abs=1e-9)
    # no evaluation trained a network: no cost of one, and no standard cost under its name
    assert pd.isna(trial["params_m"]) and pd.isna(trial["multiply_adds_m"])
    # how far the last epoch's error is above the best epoch's (0.25 against 0.25: none)
    assert trial["valid_error_rise"] == pytest.approx(0.0)
    (run / "history.jsonl").write_text(epoch(0, 0.9) + epoch(1, 0.75))
    assert load([run], with_cost=False)[0]["valid_error_rise"][0] == pytest.approx(0.15)
    (run / "history.jsonl").write_text(epoch(0, 0.6) + epoch(1, 0.75))
    assert list(epochs["threshold_normal"]) == pytest.approx([0.25, 0.25])
    assert list(epochs["threshold_reduce"]) == pytest.approx([0.55, 0.55])
    assert list(epochs["kept_total"]) == [15, 15]
    (run / "history.jsonl").write_text(epoch(0, 0.6) + epoch(1, 0.75) + epoch(2, 0.8))
    assert load([run], with_cost=False)[0]["status"][0] == "done"


def test_the_report_lists_each_failed_and_diverged_trial_with_its_error(tmp_path, monkeypatch):
    df = frame([{"trial_id": "t0", "seed": 0, "valid_error": 0.2},
                {"trial_id": "t1", "seed": 1, "status": "failed", "valid_error": None, "error": "CUDA out of memory"},
                {"trial_id": "t2", "seed": 2, "status": "diverged", "valid_error": None,
                 "error": "epoch 3: training loss is nan"}]).assign(mode="dst")
    monkeypatch.setattr("results.report.load", lambda paths: (df, pd.DataFrame()))
    (tmp_path / "e").mkdir()
    text = write_report([tmp_path / "e"]).read_text()
    assert "3 trials: 1 diverged, 1 done, 1 failed." in text
    assert ("Failed or diverged trials:\n\n- `t1` (failed): CUDA out of memory\n"
            "- `t2` (diverged): epoch 3: training loss is nan\n") in text


def test_gpu_hours_count_the_gpus_a_trial_asked_for_and_stay_empty_on_the_cpu(tmp_path):
    """GPU-hours = search seconds x search GPUs + evaluation seconds x evaluation GPUs, over 3600;
    a sweep that asked for no GPU has none, so its tables carry no GPU-hours column of zeros."""
    def experiment(name, resources, evaluate):
        path = tmp_path / name
        trial = path / "t0"
        trial.mkdir(parents=True)
        (path / "sweep.yaml").write_text(json.dumps({"name": name, "resources": resources, "evaluate": evaluate}))
        (trial / "params.json").write_text(json.dumps({"trial": {"point": {"seed": 0}}}))
        (trial / "result.json").write_text(json.dumps(
            {"stage": "evaluate", "done": True, "search_seconds_total": 720.0, "eval_seconds_total": 1800.0}))
        return path

    gpu = experiment("gpu", {"cpu": 2, "gpu": 0.5}, {"resources": {"gpu": 2}})
    cpu = experiment("cpu", {"cpu": 2}, {})
    trials, _ = load([gpu, cpu], with_cost=False)
    hours = dict(zip(trials["experiment"], trials["gpu_hours"]))
    assert hours["gpu"] == pytest.approx((720 * 0.5 + 1800 * 2) / 3600) and math.isnan(hours["cpu"])
    inherit = experiment("inherit", {"gpu": 0.25}, {})
    assert load([inherit], with_cost=False)[0]["gpu_hours"][0] == pytest.approx((720 + 1800) * 0.25 / 3600)
    assert "gpu_hours_mean" not in summarize(load([cpu], with_cost=False)[0], ["experiment"]).columns
    # data-parallel: every worker's GPUs count, and the trial's row says how many workers ran it
    parallel = experiment("parallel", {"cpu": 2, "gpu": 1, "workers": 4}, {})
    row = load([parallel], with_cost=False)[0].iloc[0]
    assert row["gpu_hours"] == pytest.approx((720 + 1800) * 4 / 3600)


def test_not_an_experiment_exits_2(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    assert main(["report", str(tmp_path / "junk")]) == 2
    assert "not an experiment directory" in capsys.readouterr().err
    with pytest.raises(NotAnExperiment):
        load([tmp_path / "missing"])


def png_ok(path):
    data = path.read_bytes()
    width, height = struct.unpack(">II", data[16:24])
    return data[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100


@pytest.mark.slow
def test_report_from_a_real_sweep_with_failed_and_diverged_trials(tmp_path):
    import ray

    from orchestrator.spec import spec_from_dict
    from orchestrator.sweep import run_sweep
    from orchestrator.trial import search_trial

    def trial(config):
        if config["point"].get("seed") == 9:
            raise RuntimeError("seed 9 is cursed")
        search_trial(config)

    import ray.cloudpickle
    import sys
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = spec_from_dict({
        "name": "r", "base": {"dataset": "digits", "layers": 3, "init_channels": 4, "subset_fraction": 0.1,
                              "epochs": 2, "arch_warmup_epochs": 0},
        "sweep": [{"mode": ["entrannas", "dst"], "seed": [0, 1]}, {"mode": "dst", "seed": 9},
                  {"mode": "dst", "seed": 2, "lr": 1e30}],
        "resources": {"cpu": 1}, "max_concurrent": 2, "max_failures": 0})
    try:
        run_sweep(spec, tmp_path, out=lambda line: None, trial_fn=trial)
    finally:
        ray.shutdown()
    experiment = tmp_path / "r"
    index = write_report([experiment])
    out = experiment / "report"
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 6
    by_seed_lr = {(r.seed, str(r.lr)): r.status for r in trials.itertuples()}
    assert by_seed_lr[(9, "nan")] == "failed" and by_seed_lr[(2, "1e+30")] == "diverged"
    assert sorted(trials["status"]) == ["diverged", "done", "done", "done", "done", "failed"]
    assert "seed 9 is cursed" in trials.loc[trials["status"] == "failed", "error"].iloc[0]
    assert trials["standard_params_m"].dropna().gt(0).all() and trials["standard_multiply_adds_m"].dropna().gt(0).all()
    assert json.loads(trials.loc[trials["status"] == "done", "genotype"].iloc[0])["normal"]
    mode_table = pd.read_csv(out / "tables" / "mode.csv")
    assert mode_table.set_index("mode").loc["dst", "n_trials"] == 4
    assert mode_table.set_index("mode").loc["dst", "n_failed"] == 2
    for ext in ("md", "tex"):
        assert (out / "tables" / f"mode.{ext}").read_text().strip()
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {"mode_error_cost.png", "mode_curves.png", "mode_cells.png", "mode_ops.png"}
    assert all(png_ok(p) for p in pngs)
    assert not any(p.name.startswith("lambda") for p in pngs), "lambda_ was not swept"
    text = index.read_text()
    assert "## By mode" in text and "plots/mode_cells.png" in text and "seed 9 is cursed" in text

    # two experiments side by side, and single search directories
    search_dir = tmp_path / "single"
    assert main(["search", "--set", "mode=dst", "--set", "epochs=1", "--set", "layers=3", "--set",
                 "init_channels=4", "--set", "subset_fraction=0.1", "--out", str(search_dir)]) == 0
    assert main(["report", str(experiment), str(search_dir), "--out", str(tmp_path / "both")]) == 0
    both = pd.read_csv(tmp_path / "both" / "trials.csv")
    assert set(both["experiment"]) == {"r", "single"} and len(both) == 7
    assert (tmp_path / "both" / "tables" / "experiment_mode.csv").is_file()
    assert main(["report", str(experiment), "--group-by", "mode", "seed", "--out", str(tmp_path / "g")]) == 0
    assert len(pd.read_csv(tmp_path / "g" / "tables" / "mode_seed.csv")) == 6   # entrannas 0, 1; dst 0, 1, 2, 9


def test_the_sweep_summary_and_the_report_share_one_status_rule():
    from types import SimpleNamespace

    from orchestrator.sweep import summarize

    results = [SimpleNamespace(metrics={"done": True, "valid_error": 0.25}, error=None,
                               config={"trial": {"point": {"lambda_": 0.1}}}),
               SimpleNamespace(metrics={"diverged": True, "done": True}, error=None, config={}),
               SimpleNamespace(metrics={"epoch": 1}, error=RuntimeError("boom"), config={}),
               SimpleNamespace(metrics={"epoch": 1}, error=None, config={})]
    lines = []
    summarize(results, out=lines.append)
    assert [line.split()[0] for line in lines] == ["done", "diverged", "failed", "running"]
    assert "error 0.2500" in lines[0] and "lambda_=0.1" in lines[0]


def test_a_trials_cost_is_the_network_its_evaluation_trained_and_the_standard_one_is_labelled(tmp_path):
    """params_m / multiply_adds_m: what the evaluation trained (its own size and dataset), reported
    by the trial; the DARTS standard network's cost goes in standard_* columns of its own."""
    path = tmp_path / "e"
    trial = path / "t0"
    trial.mkdir(parents=True)
    (path / "sweep.yaml").write_text(json.dumps({"name": "e", "base": {"dataset": "digits"}}))
    (trial / "params.json").write_text(json.dumps({"trial": {"point": {"seed": 0}}}))
    (trial / "result.json").write_text(json.dumps(
        {"stage": "evaluate", "done": True, "eval_test_error": 0.1, "eval_params_m": 0.19,
         "eval_multiply_adds_m": 4.5, "genotype": json.dumps(ZOO["DARTS_V2"].to_dict())}))
    row = load([path])[0].iloc[0]
    assert (row["params_m"], row["multiply_adds_m"]) == (0.19, 4.5)
    assert row["standard_params_m"] == pytest.approx(3.349342)
    assert "params, evaluated net (M)" in VALUES["params_m"][0] and "standard" in VALUES["standard_params_m"][0]


def test_a_random_mode_run_reads_as_a_trial_with_a_genotype_and_no_measurements(tmp_path):
    """mode: random trains nothing: its row has the genotype and kept connections, and no valid error,
    stability or peak memory (not a zero that reads as a measurement)."""
    run = tmp_path / "random"
    assert main(["search", "--set", "mode=random", "--set", "seed=2", "--out", str(run)]) == 0
    row = load([run], with_cost=False)[0].iloc[0]
    assert (row["mode"], row["status"], row["kept_total"]) == ("random", "done", 16)
    assert pd.isna(row["valid_error"]) and pd.isna(row["peak_memory_mb"]) and pd.isna(row["genotype_stability"])
