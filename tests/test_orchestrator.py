"""Sweeps on a real Ray: local, multi-node on this machine, faults, kill and resume."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
import yaml

from orchestrator.spec import spec_from_dict
from orchestrator.sweep import run_sweep
from orchestrator.trial import search_trial

pytestmark = pytest.mark.slow

# This module's trial wrappers travel to Ray workers by value (workers cannot import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

TINY = {"dataset": "digits", "layers": 3, "init_channels": 4, "subset_fraction": 0.1, "batch_size": 64,
        "arch_warmup_epochs": 0}


def tiny_spec(name="t", epochs=2, sweep=None, **changes):
    data = {"name": name, "base": {**TINY, "epochs": epochs}, "sweep": sweep or {"seed": [0, 1]},
            "resources": {"cpu": 1}, "max_concurrent": 2}
    data.update(changes)
    return spec_from_dict(data)


def trial_records(experiment: Path) -> dict:
    """trial id -> its per-epoch Tune results (from result.json)."""
    out = {}
    for d in sorted(p for p in experiment.iterdir() if p.is_dir()):
        lines = (d / "result.json").read_text().splitlines() if (d / "result.json").exists() else []
        out[d.name] = [json.loads(line) for line in lines if line.strip()]
    return out


@pytest.fixture
def local_ray():
    yield
    ray.shutdown()


def test_small_grid_completes_with_results_genotypes_and_checkpoints(tmp_path, local_ray):
    spec = tiny_spec(evaluate={"epochs": 1, "layers": 3, "init_channels": 4, "subset_fraction": 0.1})
    lines = []
    results = run_sweep(spec, tmp_path, out=lines.append)
    assert len(results) == 2 and not results.errors
    assert any("2/2 done, 0 running, 0 failed | best valid_error" in line for line in lines), lines
    records = trial_records(tmp_path / "t")
    assert len(records) == 2
    for trial, rows in records.items():
        search = [r for r in rows if r["stage"] == "search"]
        assert [r["epoch"] for r in search] == [0, 1]
        assert all(json.loads(r["genotype"])["normal"] for r in search)
        assert rows[-1]["stage"] == "evaluate" and 0 <= rows[-1]["eval_test_error"] <= 1 and rows[-1]["done"]
        assert rows[-1]["seed"] == rows[-1]["config"]["trial"]["point"]["seed"]
        assert list((tmp_path / "t" / trial).glob("checkpoint_*/trial.pt"))
    assert (tmp_path / "t" / "sweep.yaml").is_file()


def test_an_existing_experiment_is_not_overwritten(tmp_path, local_ray, capsys):
    from entrannas.cli import main

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "sweep.yaml").write_text("name: t\n")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(tiny_spec().to_dict()))
    assert main(["sweep", str(path), "--storage", str(tmp_path)]) == 2
    assert "already holds a sweep" in capsys.readouterr().err
    assert (tmp_path / "t" / "sweep.yaml").read_text() == "name: t\n"


# -- faults -------------------------------------------------------------------------------------
def flaky_trial(marker_dir: str):
    """seed 1 fails once, after reporting its first epoch; seed 2 always fails."""
    def trial(config):
        seed = config["point"]["seed"]
        if seed == 2:
            raise RuntimeError("seed 2 always fails")
        if seed == 1:
            marker = Path(marker_dir) / "failed-once"
            if not marker.exists():
                from ray import tune

                original = tune.report

                def report_then_fail(metrics, checkpoint=None):
                    original(metrics, checkpoint=checkpoint)
                    marker.touch()
                    raise RuntimeError("transient failure")

                tune.report = report_then_fail
                try:
                    search_trial(config)
                finally:
                    tune.report = original
                return
        search_trial(config)
    return trial


def test_failing_trials_are_retried_then_reported(tmp_path, local_ray):
    spec = tiny_spec(epochs=3, sweep={"seed": [0, 1, 2]}, max_failures=1)
    results = run_sweep(spec, tmp_path / "runs", out=lambda line: None, trial_fn=flaky_trial(str(tmp_path)))
    by_seed = {r.config["trial"]["point"]["seed"]: r for r in results}
    assert by_seed[0].error is None and by_seed[1].error is None
    assert "seed 2 always fails" in str(by_seed[2].error)
    records = {rows[0]["config"]["trial"]["point"]["seed"]: rows
               for rows in trial_records(tmp_path / "runs" / "t").values() if rows}
    # The retried trial continued from its epoch-0 checkpoint: its first result after the restart is
    # epoch 1, the first since the restore. (Tune may drop the row of a result reported just before
    # the crash, so epoch 0's row is not required; a repeated epoch would be a restart from scratch.)
    epochs = [r["epoch"] for r in records[1]]
    assert epochs in ([0, 1, 2], [1, 2]), epochs
    assert next(r for r in records[1] if r["epoch"] == 1)["iterations_since_restore"] == 1
    assert (tmp_path / "failed-once").exists()


def test_a_diverging_trial_ends_as_diverged(tmp_path, local_ray):
    spec = tiny_spec(sweep={"lr": [1e30]}, epochs=3)
    results = run_sweep(spec, tmp_path, out=lambda line: None)
    metrics = results[0].metrics
    assert results[0].error is None and metrics["diverged"] and "training loss is" in metrics["error"]


# -- clusters -----------------------------------------------------------------------------------
def test_trials_spread_over_a_three_node_cluster(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        spec = tiny_spec(sweep={"seed": [0, 1, 2]}, max_concurrent=3, epochs=3)
        results = run_sweep(spec, tmp_path, address=cluster.address, out=lambda line: None)
        assert not results.errors
        nodes = {r.metrics["node_id"] for r in results}
        assert len(nodes) >= 2, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    """Processes with ``text`` in their command line or their environment. Ray's workers rename
    themselves (``ray::ImplicitFunc.train``), so only their environment (RAY_TMPDIR) still says
    which cluster they belong to."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            seen = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if text.encode() in seen:
            found.append(int(pid))
    return found


def kill_processes_mentioning(text: str, wait: float = 30.0) -> None:
    """SIGKILL them, and wait until they are gone: a trial worker orphaned by a killed driver would
    otherwise keep training, and writing into the experiment, while a resume starts."""
    deadline = time.monotonic() + wait
    while True:
        pids = processes_mentioning(text)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def cli(*args, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "entrannas", *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, **kwargs)


def test_joining_a_ray_start_cluster_on_loopback(tmp_path):
    temp_dir = f"/tmp/rt{os.getpid()}"   # short: Ray's socket paths must stay under 108 bytes
    port = free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    start = subprocess.run([str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
                           capture_output=True, text=True, env=os.environ.copy())
    assert start.returncode == 0, start.stderr
    try:
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec().to_dict()))
        proc = cli("sweep", str(spec), "--storage", str(tmp_path), "--address", f"127.0.0.1:{port}",
                   "--no-report", timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "sweep finished: 2 trials" in proc.stdout and proc.stdout.count("  done ") == 2
    finally:
        kill_processes_mentioning(temp_dir)


def test_a_sweep_submitted_as_a_ray_job_spreads_over_two_ray_start_nodes(tmp_path):
    """docs/cluster.md's recipe on loopback: a head and a worker node started with ``ray start``
    (as a SLURM allocation or a KubeRay cluster has them), the sweep submitted with ``ray job
    submit``; its trials run on both nodes and the report is written."""
    temp_dir = f"/tmp/rj{os.getpid()}"
    env = {**os.environ, "RAY_TMPDIR": temp_dir, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)   # a local sweep's single-node mode, set in this process
    port, dashboard = free_port(), free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))

    def run(*args, timeout=120):
        return subprocess.run([ray_bin, *args], capture_output=True, text=True, env=env, timeout=timeout)

    try:
        # two nodes on one machine: each node's dashboard agent needs a port of its own
        head = run("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}")
        assert head.returncode == 0, head.stderr
        worker = run("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                     f"--dashboard-agent-listen-port={free_port()}")
        assert worker.returncode == 0, worker.stderr
        spec = tmp_path / "s.yaml"
        spec.write_text(yaml.safe_dump(tiny_spec(name="job").to_dict()))
        deadline = time.monotonic() + 60
        while True:   # the head's job server and agent take a few seconds to come up after `ray start`
            job = run("job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--", sys.executable, "-m",
                      "entrannas", "sweep", str(spec), "--storage", str(tmp_path), timeout=400)
            submitted = "submitted successfully" in job.stdout + job.stderr   # then it ran: no second try
            if job.returncode == 0 or submitted or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "sweep finished: 2 trials" in job.stdout and "succeeded" in job.stdout + job.stderr
        nodes = {rows[-1]["node_id"] for rows in trial_records(tmp_path / "job").values() if rows}
        assert len(nodes) == 2, nodes
        assert (tmp_path / "job" / "report" / "index.md").is_file()
    finally:
        kill_processes_mentioning(temp_dir)


def test_without_an_address_a_sweep_starts_its_own_ray_beside_a_running_cluster():
    """Ray's own default joins the last cluster started on this machine (and waits on it when it has
    died: a sweep hung so here). Without --address the README promises a local Ray of its own."""
    from ray.cluster_utils import Cluster

    from orchestrator.sweep import start_ray

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"elsewhere": 1}})
    try:
        start_ray(tiny_spec(), None)
        assert "elsewhere" not in ray.cluster_resources()
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_killed_driver_then_resume(tmp_path):
    temp_dir = f"/tmp/rk{os.getpid()}"
    env = {"RAY_TMPDIR": temp_dir}
    spec = tmp_path / "s.yaml"
    data = tiny_spec(name="k", epochs=6, sweep={"seed": [0, 1]}, max_concurrent=1).to_dict()
    spec.write_text(yaml.safe_dump(data))
    experiment = tmp_path / "runs" / "k"
    driver = subprocess.Popen([sys.executable, "-m", "entrannas", "sweep", str(spec), "--storage",
                               str(tmp_path / "runs"), "--no-report"], env={**os.environ, **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = list(trial_records(experiment).values()) if experiment.exists() else []
            finished = [r for r in rows if r and r[-1].get("done")]
            running = [r for r in rows if r and not r[-1].get("done") and len(r) >= 2]
            if finished and running:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the sweep never reached one finished and one half-done trial")
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        kill_processes_mentioning(temp_dir)
    before = trial_records(experiment)
    finished_id = next(t for t, r in before.items() if r and r[-1].get("done"))

    started = time.monotonic()
    proc = cli("resume", str(experiment), "--no-report", env=env, timeout=300)
    kill_processes_mentioning(temp_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = trial_records(experiment)
    assert after[finished_id] == before[finished_id], "a finished trial is never rerun"
    for trial, rows in after.items():
        epochs = [r["epoch"] for r in rows]
        # No epoch is repeated (the interrupted trial continued from its checkpoint). A result the
        # killed driver had not yet written may be missing, its checkpoint being already saved.
        assert epochs == sorted(set(epochs)) and epochs[-1] == 5 and len(epochs) >= 5, (trial, epochs)
        assert rows[-1]["done"]
    print(f"resume took {time.monotonic() - started:.1f} s")


def test_losing_a_worker_node_mid_sweep_loses_no_trial(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    doomed = cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(name="n", epochs=8, sweep={"seed": [0, 1, 2]},
                                             max_concurrent=3).to_dict()))
    experiment = tmp_path / "n"
    driver = subprocess.Popen([sys.executable, "-m", "entrannas", "sweep", str(spec), "--storage", str(tmp_path),
                               "--address", cluster.address, "--no-report"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            rows = [r for rs in (trial_records(experiment).values() if experiment.exists() else []) for r in rs]
            if any(r.get("node_id") == doomed.node_id for r in rows):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no trial ran on the worker node")
        cluster.remove_node(doomed)
        output, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, output
        assert "sweep finished: 3 trials" in output and output.count("  done ") == 3, output
        for rows in trial_records(experiment).values():
            assert rows[-1]["done"] and rows[-1]["epoch"] == 7
            assert rows[-1]["node_id"] != doomed.node_id
    finally:
        driver.kill()
        ray.shutdown()
        cluster.shutdown()
