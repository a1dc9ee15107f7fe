"""``entrannas-tune``: the command line. Parsing, output directories and progress live here only."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="settings (any SearchConfig key); defaults if omitted")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable); the value is read as YAML")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--resume", action="store_true", help="continue the run in DIR from its checkpoint")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="entrannas-tune",
        description="EnTranNAS / EnTranNAS-DST architecture search.")
    sub = parser.add_subparsers(dest="command", required=True)
    search = sub.add_parser("search", help="run one architecture search",
                            description="Run one search; writes config.yaml, history.jsonl, "
                                        "genotype.json and checkpoint.pt into --out.")
    _add_config_args(search)
    return parser


def _error(message: str) -> int:
    print(f"entrannas-tune: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def cmd_search(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .config import ConfigError, load_config
    from .rundir import RunDir, RunDirError, format_record

    try:
        config = load_config(args.config, args.overrides)
        run = RunDir(args.out)
        resume = run.prepare(config.to_dict(), args.resume)
    except (ConfigError, RunDirError) as e:
        return _error(str(e))

    from .search import Search, SearchDiverged

    try:
        search = Search(config)
    except FileNotFoundError as e:   # a data directory without the expected files
        return _error(str(e))
    if resume:
        search.load(run.checkpoint)
        run.truncate_history(search.epoch)
        print(f"resumed {run.path} at epoch {search.epoch + 1} of {config.epochs}")
    elif args.resume:
        print(f"no checkpoint in {run.path}: starting a new search")
    print(f"search: mode {config.mode}, dataset {config.dataset}, {config.epochs} epochs, "
          f"device {search.device}, out {run.path}")
    bar = None

    def on_step(step: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"epoch {search.epoch + 1}/{config.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        bar.update(1)

    try:
        for record in search.run(on_step):
            if bar is not None:
                bar.close()
                bar = None
            run.append_history(record)
            search.save(run.checkpoint)
            run.write_json("genotype.json", record["genotype"])
            print(format_record(record), flush=True)
    except SearchDiverged as e:
        print(f"entrannas-tune: search diverged: {e}", file=sys.stderr)
        return 1
    if search.epoch >= config.epochs:
        print(f"done: genotype in {run.path / 'genotype.json'}")
    return 0


COMMANDS = {"search": cmd_search}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
