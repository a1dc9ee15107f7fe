"""Ablation tables and plots from finished runs (not yet built: see the open results issue)."""
