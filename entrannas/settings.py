"""Reading settings: YAML (with YAML 1.2's booleans), ``--set key=value`` pairs, path settings, and
the one error every bad setting raises (it names the field, the value and what is allowed)."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml


class YamlLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2's booleans: only true and false are booleans. PyYAML follows
    YAML 1.1, where an unquoted on, off, yes, no, y or n is one too, so ``precision: off`` would read as
    ``False`` and ``mode: n`` as ``False``; here they stay the strings that were written."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# YAML 1.1 reads 1e-4 (no dot) as text; read it as the number a user means.
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def yaml_error(path: os.PathLike, error: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: file, line and column, and what is wrong."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{where}: not valid YAML: {problem}"


def read_yaml(text: str) -> Any:
    """Every YAML the project reads (configs, sweep specs, ``--set`` values, saved runs) goes through here."""
    return yaml.load(text, Loader=YamlLoader)


class ConfigError(ValueError):
    """A configuration value that is not allowed: names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field} = {value!r}: {allowed}")

    def __reduce__(self):
        # Pickled with its own arguments, so that it crosses to a Ray driver intact.
        return type(self), (self.field, self.value, self.allowed)


def did_you_mean(key, known) -> str:
    """"did you mean 'lambda_'? " where one of ``known`` is close to a misspelt ``key``, else ''."""
    close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}? " if close else ""


def unknown_setting(key: str, known, what: str = "setting") -> str:
    """'unknown setting; allowed: ...', asking first about a close known name (``lamda`` and
    ``lambda`` about ``lambda_``). ``known`` in the order to list."""
    return f"unknown {what}; {did_you_mean(key, known)}allowed: {', '.join(known)}"


#: Settings that name a path: made absolute when read (against the directory the user runs from),
#: so that a run started elsewhere (a Ray trial in its own directory) finds the same files.
PATH_SETTINGS = ("data_dir",)


def absolute_path(value: Any) -> Any:
    """A path setting's value made absolute (other values as they are)."""
    return str(Path(value).expanduser().absolute()) if isinstance(value, str) and value else value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` from ``--set``; values are read as YAML (numbers, lists, booleans)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError("--set", pair, "expected key=value")
        key, raw = pair.split("=", 1)
        out[key.strip()] = read_yaml(raw) if raw.strip() else None
    return out
