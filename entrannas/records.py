"""The one schema of what a search reports: an epoch record (``Search.run``'s dicts, one line of
``history.jsonl`` each), its flat form as a Ray Tune trial's metrics (one line of a trial's
``result.json``), and a trial's status. The search writes the first, the trial the second, and the
report reads both through the functions here.
"""

from __future__ import annotations

import json
from typing import Optional

from .runtime import WHERE_IT_RAN

#: An epoch record's fields, and what each holds (a random-mode record has the genotype's alone).
EPOCH_FIELDS = {
    "epoch": "0-based epoch", "seed": "the run's seed", "tau": "the softmax temperature of this epoch",
    "lr": "the weights' learning rate", "arch_updated": "whether alpha and beta moved this epoch",
    "train_loss": "super-net training loss", "train_acc": "super-net training accuracy",
    "valid_loss": "super-net loss on the architecture split", "valid_acc": "super-net accuracy there",
    "derived_valid_acc": "the derived architecture's accuracy there, with the super-net's weights",
    "supernet_gap": "valid_acc minus derived_valid_acc",
    "genotype": "the architecture derived at the end of the epoch (Genotype.to_dict)",
    "genotype_stability": "share of the genotype's choices unchanged since the previous epoch",
    "kept_connections": "inputs kept per node, {normal: [...], reduce: [...]}",
    "thresholds": "DST's t_j per node, {normal: [...], reduce: [...]}",
    "seconds": "the epoch's seconds", "valid_seconds": "the validation passes' share of them",
    "peak_memory_mb": "peak device (CUDA) or process (CPU) memory",
    "images_per_second": "training images (the weight steps') per second of the epoch's training",
    "workers": "data-parallel processes (entrannas.distributed)",
    "derivations": "host reads of a derived architecture", "architectures": "derived architectures the steps ran",
    "cuda_graphs": "recorded and eager passes, with cuda_graphs",
    **{key: "where it ran" for key in WHERE_IT_RAN},
}
#: Trial statuses, as the sweep's summary and the report show them.
STATUSES = ("done", "stopped", "failed", "diverged", "running")


def valid_error(record: dict) -> Optional[float]:
    """1 - valid_acc of an epoch record, or the ``valid_error`` a trial's metrics carry."""
    if record.get("valid_error") is not None:
        return record["valid_error"]
    return None if record.get("valid_acc") is None else 1 - record["valid_acc"]


def search_quality(record: dict) -> dict:
    """Whether a search settles, from one epoch: the derived network's validation error, the
    super-net's accuracy minus the derived one's, the genotype's stability."""
    derived = record.get("derived_valid_acc")
    return {"derived_valid_error": None if derived is None else 1 - derived,
            "supernet_gap": record.get("supernet_gap"), "genotype_stability": record.get("genotype_stability")}


def trial_metrics(record: dict) -> dict:
    """An epoch record as a Tune trial's flat metrics: the genotype as a JSON string, kept
    connections and thresholds per cell type, ``valid_error`` beside the accuracy."""
    thresholds = record.get("thresholds") or {}
    return {
        "stage": "search",
        **{key: record.get(key) for key in ("epoch", "seed", "tau", "train_loss", "train_acc", "valid_loss",
                                            "valid_acc", "derived_valid_acc", "supernet_gap", "genotype_stability")},
        "valid_error": valid_error(record),
        "derived_valid_error": search_quality(record)["derived_valid_error"],
        "genotype": json.dumps(record["genotype"]),
        "kept_normal": record["kept_connections"]["normal"],
        "kept_reduce": record["kept_connections"]["reduce"],
        "thresholds_normal": thresholds.get("normal"),
        "thresholds_reduce": thresholds.get("reduce"),
        "search_seconds": record.get("seconds"),
        "peak_memory_mb": record.get("peak_memory_mb"),
        "images_per_second": record.get("images_per_second"),
        "workers": record.get("workers", 1),
        **{key: record.get(key) for key in WHERE_IT_RAN},
    }


def trial_settings(config: dict) -> dict:
    """A sweep trial's own settings from its Tune config (``params.json``, or a result's ``config``):
    its grid point and its sampled values."""
    return {**(config.get("trial") or {}).get("point", {}), **(config.get("sample") or {})}


def trial_status(last: dict, errored: bool) -> str:
    """A trial's status from its last reported metrics and whether Tune recorded an error: the one
    rule for the report (from the files) and the sweep's closing summary (from Tune's results).

    A trial reports ``finished`` with every result (true at its last epoch); Tune sets ``done`` on
    the last result of a trial that ends, so ``done`` without ``finished`` is a trial a scheduler
    stopped early (``stopped``)."""
    if last.get("diverged"):
        return "diverged"
    if last.get("done"):
        return "done" if last.get("finished", True) else "stopped"
    return "failed" if errored else "running"
