"""Ray Tune sweeps over ``entrannas`` searches (not yet built: see the open orchestrator issue)."""
