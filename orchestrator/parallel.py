"""Data-parallel jobs on Ray Train: one search (or evaluation) on several workers.

``resources: {workers: N, cpu: C, gpu: G}`` in a sweep spec, or ``--workers N`` on the command line,
runs a job as a Ray Train ``TorchTrainer`` of N workers with C CPUs and G GPUs each (gloo on CPUs,
NCCL on GPUs). Each worker runs the library's job on its ``Shard`` (``entrannas.distributed``): the
same global batches, its share of each, gradients and batch statistics over all of them. Rank 0
writes the checkpoints; when a worker dies, Ray Train restarts the group (up to ``max_failures``
times) and every worker continues from the last checkpoint.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from entrannas.distributed import Shard

from .trial import STATE_FILE, read_state, save_config, search_trial, trial_configs

#: What a data-parallel sweep trial itself holds: no CPU (it only waits on its workers, which hold
#: their own), and a token of memory, since Tune places a trial by a non-empty resource request.
DRIVER_RESOURCES = {"cpu": 0, "memory": 2**20}


def worker_context(gpu: bool) -> tuple[Shard, torch.device]:
    """This Ray Train worker's shard and device."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device() if gpu else torch.device("cpu")
    return Shard(context.get_world_rank(), context.get_world_size()), device


def run_workers(fn: Callable[[dict], None], config: dict, workers: int, cpu: float, gpu: float,
                storage: os.PathLike, name: str, max_failures: int, in_tune: bool):
    """``fn(config)`` on ``workers`` Ray Train workers of one torch process group; returns Ray Train's
    Result. ``in_tune``: called from a Tune trial, whose results the workers' reports become."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    per_worker = {"CPU": cpu, **({"GPU": gpu} if gpu else {})}
    trainer = TorchTrainer(
        fn, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpu > 0, resources_per_worker=per_worker),
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)))
    return trainer.fit()


class TrainReports:
    """How a data-parallel trial's worker reports its epochs and finds its checkpoint: through Ray
    Train, every worker reporting (a report is a step all take together), rank 0 with the checkpoint."""

    def __init__(self, shard: Shard):
        self.shard = shard

    def report(self, metrics: dict, state: Optional[dict] = None) -> None:
        import ray
        import ray.train

        metrics = {**metrics, "node_id": ray.get_runtime_context().get_node_id()}   # `workers`: the records
        if state is None or self.shard.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / STATE_FILE)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def restore(self) -> Optional[dict]:
        import ray.train

        return read_state(ray.train.get_checkpoint())


def _trial_worker(config: dict) -> None:
    shard, device = worker_context(config["gpus_per_worker"] > 0)
    search_trial(config, TrainReports(shard), shard, device)


def data_parallel_trial(config: dict) -> None:
    """A sweep trial on ``config["workers"]`` Ray Train workers (the Tune trial drives them). Its Ray
    Train run lives in the trial's directory of the experiment (``workers/``), so that a retried or
    resumed trial continues from the run's last checkpoint."""
    from ray import tune

    save_config(*trial_configs(config))
    trial = Path(config["experiment"]) / Path(tune.get_context().get_trial_dir()).name
    run_workers(_trial_worker, config, config["workers"], config["cpus_per_trial"], config["gpus_per_worker"],
                trial, "workers", config["max_failures"], in_tune=True)


# -- the command line's --workers -------------------------------------------------------------------
def _job_worker(config: dict) -> None:
    """One worker of ``search --workers N`` / ``evaluate --workers N``: the run directory's checkpoint,
    history and outputs are rank 0's to write; a restarted group continues from the checkpoint."""
    import ray.train

    from entrannas.config import EvalConfig, SearchConfig
    from entrannas.genotype import Genotype
    from entrannas.rundir import RunDir
    from entrannas.search import SearchDiverged, search_job
    from entrannas.train import Evaluation, TrainingDiverged

    shard, device = worker_context(config["gpu"] > 0)
    torch.set_num_threads(max(1, int(config["cpu"])))
    run = RunDir(config["out"])
    if config["command"] == "search":
        job, diverged = search_job(SearchConfig.from_dict(config["config"]), device, shard), SearchDiverged
    else:
        job = Evaluation(Genotype.from_dict(config["genotype"]), EvalConfig.from_dict(config["config"]), device,
                         shard)
        diverged = TrainingDiverged
    if run.checkpoint.is_file():
        job.load(run.checkpoint)
        if shard.rank == 0:
            run.truncate_history(job.epoch)
    try:
        for record in job.run():
            if shard.rank == 0:
                run.append_history(record)
                job.save(run.checkpoint)
                if config["command"] == "search":
                    run.write_json("genotype.json", record["genotype"])
            ray.train.report({"epoch": record["epoch"]})
    except diverged as e:
        ray.train.report({"diverged": str(e)})


def run_job(command: str, config: dict, out: os.PathLike, workers: int, genotype: Optional[dict] = None,
            max_failures: int = 2) -> Optional[str]:
    """Run ``search`` or ``evaluate`` with ``config`` into the run directory ``out`` on ``workers`` Ray
    Train workers on a local Ray (each a GPU where the job's device is CUDA, else an even share of the
    CPU cores). Returns the divergence message, or None when the job finished. Call
    ``orchestrator.sweep.ray_environment`` before Ray is first imported."""
    import ray

    from entrannas.rundir import RunDir, format_record
    from entrannas.runtime import resolve_device

    gpu = 1 if resolve_device(config.get("device") or "auto").type == "cuda" else 0
    cpu = max(1, (os.cpu_count() or 1) // workers)
    if not ray.is_initialized():   # the workers' output stays in Ray's logs: rank 0's records print here
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 configure_logging=True)
    run = RunDir(out)
    outcome: dict = {}

    def fit() -> None:
        try:
            with tempfile.TemporaryDirectory() as storage:   # Ray Train's own run state; the job's is in `out`
                outcome["result"] = run_workers(
                    _job_worker, {"command": command, "config": config, "genotype": genotype,
                                  "out": str(run.path.resolve()), "cpu": cpu, "gpu": gpu},
                    workers, cpu, gpu, storage, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}", max_failures,
                    in_tune=False)
        except BaseException as e:   # raised again in the calling thread
            outcome["error"] = e

    worker = threading.Thread(target=fit, daemon=True)
    worker.start()
    shown = len(run.history())
    while worker.is_alive():
        worker.join(1.0)
        history = run.history()
        shown = min(shown, len(history))   # a restarted group cut the epochs after its checkpoint
        for record in history[shown:]:
            print(format_record(record), flush=True)
        shown = len(history)
    if "error" in outcome:
        raise outcome["error"]
    return (outcome["result"].metrics or {}).get("diverged")
