"""launch/run.py: the torchrun command it builds, the errors it gives, and real 2-process CPU runs."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import run as launch

ROOT = Path(__file__).resolve().parents[1]

# A run small enough for two CPU processes to take well under a second per step.
TINY = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--data.seq_len=64", "--train.global_batch_size=4", "--train.micro_batch_size=2",
        "--train.val_interval=0", "--logging.interval=1", "--logging.tensorboard=false",
        "--logging.progress_bar=false"]


def build(argv):
    args, overrides = launch.parse_args(argv)
    return launch.build(args, overrides)


def launcher_env():
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def train_steps(run_dir: Path) -> list[int]:
    """Steps of the training records in metrics.jsonl (validation records carry no 'loss')."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


# ---- command construction ---------------------------------------------------------------------

def test_single_node_command(tmp_path):
    cmd = build(["--nproc", "2", f"--logging.dir={tmp_path}", "--train.steps=4"])
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and "--standalone" in cmd and "--max-restarts=0" in cmd
    assert "--local-ranks-filter=0" in cmd
    assert f"--log-dir={tmp_path / 'ranks'}" in cmd and "--tee=3" in cmd
    assert cmd[cmd.index("-m", 3):] == ["-m", "train", f"--logging.dir={tmp_path}",
                                        "--train.steps=4"]


def test_config_and_log_rank_pass_through(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f'[logging]\ndir = "{tmp_path / "out"}"\n[train]\nsteps = 7\n')
    cmd = build(["--nproc", "2", "--log-rank", "1", "--config", str(config), "--optim.lr=0.01"])
    assert "--local-ranks-filter=1" in cmd
    assert f"--log-dir={tmp_path / 'out' / 'ranks'}" in cmd
    assert cmd[-5:] == ["-m", "train", "--config", str(config), "--optim.lr=0.01"]
    assert not any(a.startswith("--local-ranks-filter") for a in build(["--nproc", "2",
                                                                        "--log-rank", "all"]))


def test_multi_node_command():
    cmd = build(["--nproc", "8", "--nnodes", "4", "--node-rank", "2", "--rdzv-endpoint",
                 "localhost:29400", "--rdzv-id", "1234", "--rdzv-timeout", "120",
                 "--train.global_batch_size=64", "--train.micro_batch_size=2"])
    assert "--standalone" not in cmd
    for arg in ("--nnodes=4", "--nproc-per-node=8", "--rdzv-backend=c10d",
                "--rdzv-endpoint=localhost:29400", "--rdzv-id=1234",
                "--rdzv-conf=join_timeout=120,read_timeout=60,is_host=0"):
        assert arg in cmd


def test_dry_run_prints_command(capsys, tmp_path):
    assert launch.main(["--nproc", "2", "--dry-run", f"--logging.dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    assert "torch.distributed.run" in out and "--nproc-per-node=2" in out and "-m train" in out


# ---- errors: clear, immediate ----------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--nproc", "3"], "train.global_batch_size=16 is not divisible"),
    (["--nproc", "2", "--log-rank", "2"], "--log-rank 2: expected 'all' or a local rank 0..1"),
    (["--nproc", "0"], "--nproc 0: must be >= 1"),
    (["--nproc", "2", "--nnodes", "2"], "needs --rdzv-endpoint"),
    (["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29400"],
     "rendezvous host 'no-such-host.invalid' does not resolve"),
    (["--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", "node0"], "expected HOST:PORT"),
    (["--nproc", "1", "--train.stepz=3"], "unknown key train.stepz"),
])
def test_bad_requests_fail_with_a_reason(argv, message, capsys):
    assert launch.main(argv) == 2
    assert message in capsys.readouterr().err


def test_non_override_argument_is_rejected(capsys):
    with pytest.raises(SystemExit):
        launch.parse_args(["--nproc", "2", "train.steps=3"])
    assert "unrecognized argument 'train.steps=3'" in capsys.readouterr().err


def test_unreachable_rendezvous_fails_within_timeout(capsys):
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        start = time.monotonic()
        code = launch.main(["--nproc", "1", "--nnodes", "2", "--node-rank", "1",
                            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-timeout", "2",
                            "--train.global_batch_size=16"])
    assert code == 2 and time.monotonic() - start < 30
    assert f"cannot reach the rendezvous 127.0.0.1:{port}" in capsys.readouterr().err


# ---- real runs: 2 CPU processes on gloo ---------------------------------------------------------

@pytest.mark.slow
def test_two_process_run(tmp_path, default_cache):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "launch.run", "--nproc", "2", "--train.steps=4",
                          f"--logging.dir={out}", "--checkpoint.interval=2", *TINY],
                         cwd=tmp_path, env=launcher_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert train_steps(out) == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    # Rank 0 is shown; every rank's output is kept.
    assert "[default0]" in res.stdout + res.stderr and "[default1]" not in res.stdout + res.stderr
    assert len(list((out / "ranks").glob("*/attempt_0/*/stdout.log"))) == 2


@pytest.mark.slow
@pytest.mark.parametrize("when", ["training", "startup"])
def test_sigusr1_saves_and_exits_zero(tmp_path, default_cache, when):
    """SIGUSR1 to the launcher, during training or before the trainer has installed its
    handler: every rank saves at the same step and the launch exits 0."""
    out = tmp_path / "run"
    log = open(tmp_path / "launch.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "launch.run", "--nproc", "2",
                             "--train.steps=500", f"--logging.dir={out}",
                             "--checkpoint.interval=3", *TINY],
                            cwd=tmp_path, env=launcher_env(), stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        def ready():
            if when == "startup":  # torchrun started, the trainer not yet training
                return "torch.distributed.run" in (tmp_path / "launch.log").read_text()
            return (out / "checkpoints" / "latest").exists()
        while not ready():
            assert proc.poll() is None, (tmp_path / "launch.log").read_text()[-4000:]
            assert time.monotonic() < deadline, f"not at {when} within 240 s"
            time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        code = proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "launch.log").read_text()
    assert code == 0, text[-4000:]
    steps = train_steps(out)
    assert steps and steps[-1] < 500
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{steps[-1]:08d}"
    assert "SIGUSR1: asking the training processes to save a checkpoint and stop" in text


@pytest.mark.slow
def test_two_nodes_rendezvous_on_node_0(tmp_path, default_cache):
    """Two launchers as two 'nodes' of one process each, as launch/slurm.sbatch runs them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    procs = []
    for node in (1, 0):  # node 1 first: it waits for node 0's rendezvous
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "launch.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc", "1", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test",
             "--rdzv-timeout", "120", "--train.steps=3", f"--logging.dir={out}", *TINY],
            cwd=tmp_path, env=launcher_env(), stdout=log, stderr=subprocess.STDOUT))
        log.close()
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = "\n".join((tmp_path / f"node{n}.log").read_text()[-3000:] for n in (0, 1))
    assert codes == [0, 0], logs
    assert train_steps(out) == [1, 2, 3]
