"""``entrannas-tune``: the command line. Parsing, output directories and progress live here only."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

EXIT_FAILED = 1   # the work failed: a trial after its retries, a disk that cannot be written, ...
EXIT_USAGE = 2    # bad input: a setting, a spec, a path; nothing was started

EPILOG = ("exit status: 0 done; 1 failed (a search or evaluation diverged, a sweep trial failed after "
          "its retries, or the disk could not be written); 2 bad input, before any work")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="settings file; defaults for the dataset if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable); the value is read as YAML")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its checkpoint")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="data-parallel on N Ray Train workers on this machine (default 1: one process); "
                        "the batch size stays the global batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="entrannas-tune", epilog=EPILOG,
                                     description="EnTranNAS / EnTranNAS-DST architecture search.")
    sub = parser.add_subparsers(dest="command", required=True)
    search = sub.add_parser("search", help="run one architecture search",
                            description="Run one search; writes config.yaml, history.jsonl, genotype.json "
                                        "and checkpoint.pt into --out.")
    _add_config_args(search)
    evaluate = sub.add_parser("evaluate", help="train a genotype from scratch and report its test error",
                              description="Train a genotype from scratch; writes config.yaml, history.jsonl, "
                                          "result.json and checkpoint.pt into --out.")
    evaluate.add_argument("--genotype", required=True, metavar="NAME|FILE|SEARCH_DIR",
                          help="a zoo name (DARTS_V1, DARTS_V2, PC_DARTS, ...), a JSON or DARTS-notation "
                               "file, or a search output directory")
    _add_config_args(evaluate)

    sweep = sub.add_parser("sweep", help="run an ablation sweep with Ray Tune",
                           description="Run every trial of a sweep spec (ablations/*.yaml) with Ray Tune.",
                           epilog="exit status: 0 every trial finished (diverged counts as finished); 1 a "
                                  "trial failed after its retries; 2 bad input (spec, storage, name), "
                                  "before Ray starts")
    sweep.add_argument("spec", metavar="SPEC.yaml")
    sweep.add_argument("--storage", default="runs", metavar="DIR", help="experiments root (default ./runs)")
    sweep.add_argument("--name", help="experiment name (default: the spec's name)")
    sweep.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a base setting (removes an axis of that name); evaluate.KEY=VALUE "
                            "sets an evaluation setting")
    sweep.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    sweep.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (on 127.0.0.1)")
    resume = sub.add_parser("resume", help="continue an interrupted sweep",
                            description="Continue a sweep: finished trials are kept, interrupted ones "
                                        "continue from their last epoch checkpoint.")
    resume.add_argument("experiment", metavar="EXPERIMENT_DIR")
    resume.add_argument("--address", help="join this Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    resume.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    resume.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (on 127.0.0.1)")

    sub.add_parser("bench", help="time search steps per configuration (see 'entrannas-tune bench -h')",
                   add_help=False)
    report = sub.add_parser("report", help="ablation tables and plots from finished runs",
                            description="Tables (CSV, Markdown, LaTeX), plots and index.md from sweep "
                                        "experiments or search/evaluate directories.")
    report.add_argument("dirs", nargs="+", metavar="DIR")
    report.add_argument("--out", help="output directory (default: DIR/report of the first DIR)")
    report.add_argument("--group-by", nargs="+", metavar="KEY", help="group tables and plots by these keys "
                        "(default: each swept setting)")
    return parser


def _error(message: str) -> int:
    print(f"entrannas-tune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run_job(job, run, config, resume: bool, args, after_epoch: Callable[[dict], None], diverged: type) -> int:
    """Drive a job's epoch generator: progress bar, history, checkpoint and summary line per epoch."""
    from tqdm import tqdm

    from .rundir import RunDirError, format_record

    if resume:
        job.load(run.checkpoint)
        try:
            run.truncate_history(job.epoch)
        except RunDirError as e:
            return _error(str(e))
        print(f"resumed {run.path} at epoch {job.epoch + 1} of {config.epochs}")
    elif args.resume:
        print(f"no checkpoint in {run.path}: starting from scratch")
    print(f"{args.command}: dataset {config.dataset}, {config.epochs} epochs, device {job.device}, out {run.path}")
    bar = None

    def on_step(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"epoch {job.epoch + 1}/{config.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        bar.update(1)

    try:
        for record in job.run(on_step):
            if bar is not None:
                bar.close()
                bar = None
            run.append_history(record)
            job.save(run.checkpoint)
            after_epoch(record)
            print(format_record(record), flush=True)
    except diverged as e:
        print(f"entrannas-tune: {args.command} diverged: {e}", file=sys.stderr)
        return 1
    return 0


def _prepare(args, cls):
    """Load the config and the output directory; any bad input raises before work starts."""
    from .config import load_config
    from .rundir import RunDir

    config = load_config(args.config, args.overrides, cls=cls)
    run = RunDir(args.out)
    return config, run


def _run_workers(args, config, run, resume: bool, genotype: Optional[dict] = None) -> int:
    """``--workers N`` (N > 1): the job on N Ray Train workers, rank 0 writing the run directory."""
    from orchestrator.sweep import ray_environment

    ray_environment(None)   # before Ray is first imported
    from orchestrator.parallel import run_job

    print(("resumed " if resume else "") + f"{args.command}: dataset {config.dataset}, {config.epochs} epochs, "
          f"{args.workers} workers, out {run.path}")
    diverged = run_job(args.command, config.to_dict(), run.path, args.workers, genotype)
    if diverged:
        print(f"entrannas-tune: {args.command} diverged: {diverged}", file=sys.stderr)
        return 1
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .config import ConfigError, SearchConfig, check_device_support
    from .distributed import check_data_parallel
    from .rundir import RunDirError
    from .runtime import resolve_device

    try:
        config, run = _prepare(args, SearchConfig)
        check_device_support(config, resolve_device(config.device))   # before the run directory exists
        check_data_parallel(config, args.workers, "--workers")
        resume = run.prepare(config.to_dict(), args.resume, defaults=config.field_defaults())
    except (ConfigError, RunDirError) as e:
        return _error(str(e))
    if args.workers > 1:
        status = _run_workers(args, config, run, resume)
        if status == 0:
            print(f"done: genotype in {run.path / 'genotype.json'}")
        return status

    from .search import SearchDiverged, search_job

    try:
        search = search_job(config)
    except (FileNotFoundError, ConfigError) as e:   # missing data files; a setting this device cannot run
        return _error(str(e))
    status = _run_job(search, run, config, resume, args,
                      lambda record: run.write_json("genotype.json", record["genotype"]), SearchDiverged)
    if status == 0:
        print(f"done: genotype in {run.path / 'genotype.json'}")
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import ConfigError, EvalConfig
    from .distributed import check_data_parallel
    from .genotype import GenotypeError
    from .rundir import RunDirError
    from .zoo import load_genotype

    try:
        genotype = load_genotype(args.genotype)
        config, run = _prepare(args, EvalConfig)
        check_data_parallel(config, args.workers, "--workers")
        resume = run.prepare(config.to_dict(), args.resume, inputs={"genotype.json": genotype.to_dict()},
                             defaults=config.field_defaults())
    except (ConfigError, RunDirError, GenotypeError) as e:
        return _error(str(e))

    from .train import Evaluation, TrainingDiverged

    try:
        evaluation = Evaluation(genotype, config)
    except FileNotFoundError as e:
        return _error(str(e))
    cost = evaluation.cost()
    print(f"genotype {args.genotype}: {cost['params_m']:.3f} M parameters, "
          f"{cost['multiply_adds_m']:.1f} M multiply-adds")
    if args.workers > 1:
        del evaluation
        status = _run_workers(args, config, run, resume, genotype.to_dict())
    else:
        status = _run_job(evaluation, run, config, resume, args, lambda record: None, TrainingDiverged)
    if status == 0:
        history = run.history()
        result = {"genotype": genotype.to_dict(), "genotype_source": args.genotype,
                  "test_error": history[-1]["test_error"], "epochs": len(history), **cost,
                  "seconds": sum(r["seconds"] for r in history), "seed": config.seed}
        run.write_json("result.json", result)
        print(f"done: test error {result['test_error']:.4f}; result in {run.path / 'result.json'}")
    return status


def _finish_sweep(results, experiment, no_report: bool) -> int:
    """Summary and report; exit status 0 when every trial finished (a diverged one counts: it is a
    result), 1 when any failed after its retries."""
    from orchestrator.sweep import summarize

    print(f"sweep finished: {len(results)} trials; {experiment}")
    statuses = summarize(results)
    if not no_report:
        from results.report import write_report

        print(f"report: {write_report([experiment])}")
    failed = statuses.count("failed") + statuses.count("running")
    if failed:
        print(f"entrannas-tune: {failed} of {len(statuses)} trials did not finish (causes above)", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from results.collect import NotAnExperiment
    from results.report import write_report

    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        return _error(f"--out {args.out}: exists and is not a directory")
    try:
        index = write_report(args.dirs, args.out, args.group_by)
    except (NotAnExperiment, KeyError) as e:
        return _error(str(e).strip('"'))
    print(f"report: {index}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from orchestrator.spec import SpecError, load_spec
    from orchestrator.sweep import ExperimentError, run_sweep

    try:
        spec = load_spec(args.spec, args.overrides)
        if args.name:
            spec = spec.renamed(args.name)
        results = run_sweep(spec, args.storage, args.address, args.dashboard)
    except (SpecError, ExperimentError) as e:
        return _error(str(e))
    from pathlib import Path

    return _finish_sweep(results, Path(args.storage).expanduser().resolve() / spec.name, args.no_report)


def cmd_resume(args: argparse.Namespace) -> int:
    from orchestrator.spec import SpecError
    from orchestrator.sweep import ExperimentError, resume_sweep

    try:
        results = resume_sweep(args.experiment, args.address, args.dashboard)
    except (SpecError, ExperimentError) as e:
        return _error(str(e))
    from pathlib import Path

    return _finish_sweep(results, Path(args.experiment).expanduser().resolve(), args.no_report)


COMMANDS = {"search": cmd_search, "evaluate": cmd_evaluate, "sweep": cmd_sweep, "resume": cmd_resume,
            "report": cmd_report}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:   # the benchmark lives in the checkout's benchmarks/ and parses its own options
        import importlib.util
        from pathlib import Path

        script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"
        if not script.is_file():
            return _error(f"bench: {script} not found; the benchmark runs from a source checkout")
        spec = importlib.util.spec_from_file_location("entrannas_bench", script)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        return bench.main(argv[1:])
    args = build_parser().parse_args(argv)
    from .runtime import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except CheckpointError as e:
        return _error(str(e))
    except OSError as e:   # a full disk, a folder that became read-only: say where, keep what was written
        where = f"{e.filename}: " if e.filename else ""
        print(f"entrannas-tune: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
