"""launch/slurm.sbatch on a real single-node SLURM cluster (Debian slurm-wlm + munge, as root).

The module installs the packages when missing, starts munged/slurmctld/slurmd on localhost
(tests/slurm/cluster.py), and submits the sbatch script for short 2-process CPU (gloo) runs:
one that completes, and one preempted with SIGUSR1 that saves, requeues itself and resumes.
Every wait is bounded; the daemons are stopped by PID at the end.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, cannot_run_reason, install_packages

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "launch" / "slurm.sbatch"

# A tiny model and batch: two CPU processes take a fraction of a second per step.
TINY_CONFIG = """\
[model]
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2

[data]
seq_len = 64

[train]
global_batch_size = 4
micro_batch_size = 2
val_interval = 0

[logging]
interval = 1
tensorboard = false
progress_bar = false
"""


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = cannot_run_reason()
    if reason:
        pytest.skip(reason)
    seconds = install_packages()
    print(f"slurm-wlm/munge install: {seconds:.1f}s")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def workdir(tmp_path):
    """The submit directory: a config, and logs/ for the job output (SLURM does not create it)."""
    (tmp_path / "logs").mkdir()
    (tmp_path / "tiny.toml").write_text(TINY_CONFIG)
    return tmp_path


def job_env(cache: str, nproc: int = 2) -> dict[str, str]:
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
        "FQTRAIN_CACHE": cache,
        "FQTRAIN_NPROC_PER_NODE": str(nproc),
        "FQTRAIN_PYTHON": sys.executable,
    }


def submit(slurm, workdir, cache, *overrides, nproc: int = 2) -> int:
    return slurm.sbatch(["--time=10", str(SBATCH), "tiny.toml", *overrides], cwd=workdir,
                        env=job_env(cache, nproc))


def train_steps(run_dir: Path) -> list[int]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def wait(predicate, timeout, what, diagnose):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}\n{diagnose()}")
        time.sleep(0.2)


def test_job_completes_with_checkpoint_and_metrics(slurm, workdir, default_cache):
    run = workdir / "run"
    job = submit(slurm, workdir, default_cache["cache"], "--train.steps=6",
                 f"--logging.dir={run}", "--checkpoint.interval=3")
    info = slurm.wait_state(job, {"COMPLETED"}, timeout=300)
    assert info["ExitCode"] == "0:0"
    log = Path(info["StdOut"])
    assert log == workdir / "logs" / f"fqtrain-{job}.out"
    text = log.read_text()
    assert f"job {job} (restart 0): 1 node(s) x 2 processes" in text
    assert train_steps(run) == [1, 2, 3, 4, 5, 6], text[-4000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert (run / "checkpoints" / "step-00000006").is_dir()


def test_preempted_job_saves_requeues_and_resumes(slurm, workdir, default_cache):
    run = workdir / "run"
    steps = 60
    job = submit(slurm, workdir, default_cache["cache"], f"--train.steps={steps}",
                 f"--logging.dir={run}", "--checkpoint.interval=5")
    latest = run / "checkpoints" / "latest"

    def first_checkpoint():
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), slurm.diagnose(job)
        return latest.exists()
    wait(first_checkpoint, 300, "the first checkpoint", lambda: slurm.diagnose(job))

    # What `--signal=B:USR1@120` does before the time limit, sent now: save, requeue, resume.
    slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])
    wait(lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, 120, "the job to requeue",
         lambda: slurm.diagnose(job))
    # SLURM holds a requeued job back for ~2 min (BeginTime); start it in a few seconds instead.
    # Not at once: slurmd refuses a launch whose credential is not newer, to the second, than
    # the kill of the previous run ("already killed, do not launch batch job").
    slurm.run(["scontrol", "update", f"JobId={job}", "StartTime=now+3"])
    info = slurm.wait_state(job, {"COMPLETED"}, timeout=300)

    text = Path(info["StdOut"]).read_text()
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0"
    assert "SIGUSR1 received" in text and f"requeueing job {job}" in text
    assert f"job {job} (restart 1)" in text
    saved = re.findall(r"resuming from \S*step-(\d{8})", text)
    assert len(saved) == 1, text[-4000:]
    resumed_at = int(saved[0])
    assert 0 < resumed_at < steps
    logged = train_steps(run)
    # metrics.jsonl is appended to: one record per step, the resumed run going on from the save.
    assert logged == list(range(1, steps + 1)), logged
    assert latest.read_text().strip() == f"step-{steps:08d}"


def test_time_limit_signal_saves_and_requeues(slurm, workdir, default_cache):
    """The real `--signal=B:USR1@N` path: SLURM signals the script N s before the time limit."""
    run = workdir / "run"
    # A 2-minute limit, signalled 40 s before it. slurmctld checks limits about every 30 s and
    # sends the warning up to one check early: 50 to 80 s in, after the trainer has started.
    # The run is far longer than that; only the signal's save writes a checkpoint.
    job = slurm.sbatch(["--time=2", "--signal=B:USR1@40", str(SBATCH), "tiny.toml",
                        "--train.steps=100000", f"--logging.dir={run}",
                        "--checkpoint.interval=100000"], cwd=workdir,
                       env=job_env(default_cache["cache"]))
    wait(lambda: int(slurm.job(job).get("Restarts", 0)) >= 1, 180, "the job to requeue itself",
         lambda: slurm.diagnose(job))
    slurm.run(["scancel", str(job)])  # requeued: enough; do not run it again
    text = Path(slurm.job(job)["StdOut"]).read_text()
    assert "SIGUSR1 received" in text and f"requeueing job {job}" in text, text[-4000:]
    stopped = train_steps(run)[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{stopped:08d}"


def test_world_size_not_matching_the_config_fails_the_job_at_once(slurm, workdir,
                                                                 default_cache):
    job = submit(slurm, workdir, default_cache["cache"], "--train.steps=6", nproc=3)
    info = slurm.wait_state(job, {"FAILED"}, timeout=60)
    text = Path(info["StdOut"]).read_text()
    assert "train.global_batch_size=4 is not divisible" in text and "(world size 3)" in text


def test_unresolvable_rendezvous_host_says_so(slurm):
    env = dict(slurm.env, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="no-such-node[1-2]",
               SLURM_NNODES="2", FQTRAIN_NPROC_PER_NODE="2")
    res = subprocess.run(["bash", str(SBATCH)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    assert "rendezvous host 'no-such-node1' (the job's first node) does not resolve" in res.stderr


def test_sbatch_outside_slurm_says_so():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(SBATCH), "configs/debug.toml"], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "SLURM_JOB_ID is not set: this script runs inside a SLURM job" in res.stderr


def test_sbatch_without_process_count_says_so():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k != "FQTRAIN_NPROC_PER_NODE"}
    env.update(SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1")
    res = subprocess.run(["bash", str(SBATCH)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert "cannot tell how many processes to run per node" in res.stderr


def test_sbatch_with_tasks_per_node_says_so():
    env = dict(os.environ, SLURM_JOB_ID="7", SLURM_JOB_NODELIST="node[1-2]", SLURM_NNODES="2",
               SLURM_NTASKS="16")
    res = subprocess.run(["bash", str(SBATCH)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert "needs one task per node" in res.stderr
