"""Ablation tables and plots from finished runs: ``collect`` (directories -> DataFrames),
``tables``, ``plots`` (DataFrames -> Figures) and ``report`` (all of it written to disk)."""
