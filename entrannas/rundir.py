"""The output directory of one run: resolved config, per-epoch history, result, checkpoint."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional
import yaml

from .config import read_yaml

CONFIG, HISTORY, CHECKPOINT = "config.yaml", "history.jsonl", "checkpoint.pt"


class RunDirError(ValueError):
    pass


class RunDir:
    def __init__(self, path: os.PathLike):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def has_run(self) -> bool:
        return (self.path / HISTORY).exists() or self.checkpoint.exists()

    def prepare(self, config: dict, resume: bool, inputs: Optional[dict] = None,
                defaults: Optional[dict] = None) -> bool:
        """Create the directory, or check that a resumed one ran the same config (and the same
        ``inputs``: JSON files by name, such as the genotype an evaluation trains). A setting that
        the saved config lacks (it came in a later version) counts as the same when the new value
        is its default in ``defaults``, which is how the earlier version behaved.

        Returns whether a checkpoint should be loaded. Never overwrites an earlier run unless resuming.
        """
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path}: exists and is not a directory")
        if self.has_run() and not resume:
            raise RunDirError(f"--out {self.path}: already holds a run; pass --resume to continue it "
                              "or choose another directory")
        saved_path = self.path / CONFIG
        if resume and saved_path.exists():
            saved = read_yaml(saved_path.read_text()) or {}
            defaults = defaults or {}
            changed = sorted(k for k in set(saved) | set(config)
                             if k not in ("device", "num_workers") and saved.get(k) != config.get(k)
                             and not (k not in saved and k in defaults and config.get(k) == defaults[k]))
            if changed:
                detail = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed)
                raise RunDirError(f"--resume {self.path}: the config differs from the saved one ({detail})")
        for name, obj in (inputs or {}).items():
            if resume and (self.path / name).exists() and json.loads((self.path / name).read_text()) != obj:
                raise RunDirError(f"--resume {self.path}: {name} differs from the one this run started with")
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(saved_path, yaml.safe_dump(config, sort_keys=False))
        for name, obj in (inputs or {}).items():
            self.write_json(name, obj)
        return resume and self.checkpoint.exists()

    def history(self) -> list[dict]:
        """The epoch records; a last line cut short (a crash while it was written by an older
        version, or a copy cut off) is left out. A bad line before the last is an error."""
        path = self.path / HISTORY
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        records = []
        for n, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if n == len(lines) - 1:
                    break
                raise RunDirError(f"{path}: line {n + 1} is not a JSON record; the history is damaged") from None
        return records

    def truncate_history(self, epochs_done: int) -> None:
        """Keep the records of the epochs the checkpoint has done, dropping any written after it
        (before a crash), or refuse a history that lacks one of those epochs."""
        kept = [r for r in self.history() if r.get("epoch", -1) < epochs_done]
        if [r.get("epoch") for r in kept] != list(range(epochs_done)):
            have = [r.get("epoch") for r in kept]
            raise RunDirError(f"--resume {self.path}: {HISTORY} holds epochs {have or 'none'}, but the "
                              f"checkpoint has done epochs 0..{epochs_done - 1}; it cannot be resumed")
        write_text_atomic(self.path / HISTORY, "".join(json.dumps(r) + "\n" for r in kept))

    def append_history(self, record: dict) -> None:
        """Add a record by replacing the whole file, so that a crash leaves it whole, old or new."""
        path = self.path / HISTORY
        text = path.read_text() if path.exists() else ""
        if text and not text.endswith("\n"):
            text += "\n"
        write_text_atomic(path, text + json.dumps(record) + "\n")

    def write_json(self, name: str, obj: dict) -> None:
        """One top-level key per line, values compact (a genotype stays readable)."""
        lines = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items())
        write_text_atomic(self.path / name, "{\n" + lines + "\n}\n")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def print_results(rows: list[dict], table: str, out: Optional[Path]) -> None:
    """A benchmark script's output: one JSON document (date, command, ``rows`` as its results) on stdout
    and, written atomically, in ``out``; the short table on stderr."""
    doc = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv]), "results": rows}
    text = json.dumps(doc, indent=2)
    if out:
        write_text_atomic(Path(out), text + "\n")
    print(text)
    print(table, file=sys.stderr)


def format_record(record: dict) -> str:
    """One summary line of an epoch record, for the terminal."""
    kept = record.get("kept_connections") or {}
    parts = [f"epoch {record['epoch'] + 1:>3}"]
    for key, label in (("train_loss", "train loss"), ("train_acc", "train acc"),
                       ("valid_loss", "valid loss"), ("valid_acc", "valid acc"),
                       ("test_loss", "test loss"), ("test_error", "test error")):
        if key in record:
            parts.append(f"{label} {record[key]:.3f}")
    if "derived_valid_acc" in record:   # the derived architecture with the super-net's weights
        parts.append(f"derived acc {record['derived_valid_acc']:.3f}")
    if record.get("genotype_stability") is not None:
        parts.append(f"stable {record['genotype_stability']:.2f}")
    if "tau" in record:
        parts.append(f"tau {record['tau']:.3f}")
    if kept:
        parts.append(f"kept n{kept['normal']} r{kept['reduce']}")
    if "architectures" in record:   # how many derived architectures the epoch's steps ran
        parts.append(f"archs {record['architectures']}")
    seconds = f"{record['seconds']:.1f}s"
    if "valid_seconds" in record:   # a search epoch: its validation pass's share
        seconds += f" (valid {record['valid_seconds']:.1f}s)"
    parts.append(seconds)
    return " | ".join(parts)
