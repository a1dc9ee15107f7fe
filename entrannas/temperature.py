"""Temperature schedules for the Engine-cell softmax (names are our choice; the paper anneals tau with the epoch)."""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "exponential", "cosine")


def temperature(schedule: str, epoch: int, epochs: int, tau_start: float, tau_end: float) -> float:
    """tau at the start of ``epoch`` (0-based) of ``epochs``: tau_start at epoch 0, tau_end at the last."""
    if schedule not in SCHEDULES:
        raise ValueError(f"tau_schedule: {schedule!r} is not one of {', '.join(SCHEDULES)}")
    if schedule == "constant":
        return float(tau_start)
    frac = min(max(epoch / max(epochs - 1, 1), 0.0), 1.0)
    if schedule == "linear":
        return tau_start + (tau_end - tau_start) * frac
    if schedule == "exponential":
        return tau_start * (tau_end / tau_start) ** frac
    return tau_end + 0.5 * (tau_start - tau_end) * (1.0 + math.cos(math.pi * frac))
