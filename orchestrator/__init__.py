"""Ray Tune sweeps over ``entrannas`` searches: ``spec`` (YAML sweep specs, validated before Ray
starts), ``trial`` (the trainable), ``sweep`` (run and resume on a local Ray or a cluster)."""

from .sweep import load_results

__all__ = ["load_results"]
