"""Exact resume after SIGKILL (2 ranks), resharding 4 -> 2, 4 -> 1, 2 -> 4, and preemption by
SIGUSR1: real `python -m train` / torchrun runs on gloo, tiny model, FQ and INT8 comms on."""
import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

G = 8  # global batch
TINY = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--data.seq_len=32", f"--train.global_batch_size={G}", "--train.micro_batch_size=2",
        "--train.val_interval=0", "--train.deterministic=true", "--logging.interval=1",
        "--logging.tensorboard=false", "--logging.progress_bar=false"]
# Resuming on another world size changes only the order of float sums (and the INT8 comm
# blocks), so losses agree to rounding, far below the ~0.02-nat differences between batches.
RESHARD_TOL = 2e-3


def command(nproc: int, run_dir, *args) -> list[str]:
    launcher = [sys.executable, "-m", "train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "train"]
    return launcher + TINY + [f"--logging.dir={run_dir}", *args]


def run_env(cache: str, **extra) -> dict:
    # One thread per process: two cores shared by several ranks (and other tests).
    return {**os.environ, "FQTRAIN_CACHE": cache, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def train(cache: str, run_dir, *args, nproc: int = 1, env: dict | None = None,
          expect_rc: int = 0) -> subprocess.CompletedProcess:
    res = subprocess.run(command(nproc, run_dir, *args), cwd=ROOT, env=run_env(cache, **(env or {})),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == expect_rc, res.stdout[-3000:] + res.stderr[-6000:]
    return res


def losses(run_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for rec in map(json.loads, f):
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def full_state(path: str) -> dict:
    """Every tensor of a DCP checkpoint (model and optimizer), flattened, in one process."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    from train.checkpoint import verify

    assert verify(path, full=True) is None
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix] = obj

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process"
        walk("", _load_state_dict_from_keys(checkpoint_id=path))
    return flat


def children(parent: int) -> list[int]:
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    out.append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in sessions of
    their own, so killing its process group would leave them running)."""
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children(p)
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def train_state(path: str) -> dict:
    with open(os.path.join(path, "train_state.json"), encoding="utf-8") as f:
        return json.load(f)


def assert_same_state(a: str, b: str) -> None:
    sa, sb = full_state(a), full_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs between {a} and {b}"


@pytest.fixture(scope="module")
def two_rank_runs(default_cache, tmp_path_factory):
    """8 steps straight (async saves) vs 4 steps, SIGKILL, resumed to 8 (sync saves)."""
    cache, tmp = default_cache["cache"], tmp_path_factory.mktemp("resume2")
    straight, killed, resumed = tmp / "straight", tmp / "killed", tmp / "resumed"
    ck = str(killed / "ck")
    t0 = time.time()
    train(cache, straight, "--train.steps=8", "--checkpoint.interval=4", "--checkpoint.async_save=true",
          f"--checkpoint.dir={straight / 'ck'}", nproc=2)

    proc = subprocess.Popen(command(2, killed, "--train.steps=8", "--checkpoint.interval=4",
                                    f"--checkpoint.dir={ck}"),
                            cwd=ROOT, env=run_env(cache),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = os.path.join(ck, "latest")
    while proc.poll() is None:
        if os.path.exists(latest) and open(latest).read().strip() == "step-00000004":
            kill_tree(proc.pid)  # torchrun and both ranks, no clean-up
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(ck, "step-00000008"))

    res = train(cache, resumed, "--train.steps=8", "--checkpoint.interval=4", f"--checkpoint.dir={ck}",
                nproc=2)
    print(f"two-rank runs: {time.time() - t0:.1f} s")
    return {"straight": straight, "killed": killed, "resumed": resumed, "ck": ck, "log": res.stderr,
            "cache": cache, "tmp": tmp}


def test_exact_resume_after_sigkill(two_rank_runs):
    r = two_rank_runs
    assert "resuming from" in r["log"] and "step-00000004 at step 4 (sample 32" in r["log"]
    straight, killed, resumed = losses(r["straight"]), losses(r["killed"]), losses(r["resumed"])
    assert sorted(straight) == list(range(1, 9))
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in range(1, 5):  # bitwise: JSON floats round-trip exactly
        assert killed[step] == straight[step], step
    for step in range(5, 9):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    # Final weights and optimizer state bitwise equal; and the step-4 checkpoint written in the
    # background (async) equals the synchronous one, though training went on meanwhile.
    assert_same_state(os.path.join(r["straight"], "ck", "step-00000008"), os.path.join(r["ck"], "step-00000008"))
    assert_same_state(os.path.join(r["straight"], "ck", "step-00000004"), os.path.join(r["ck"], "step-00000004"))
    assert train_state(os.path.join(r["ck"], "step-00000008"))["consumed_samples"] == 8 * G


@pytest.fixture(scope="module")
def four_rank_run(default_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume4")
    train(default_cache["cache"], tmp / "run", "--train.steps=4", "--checkpoint.interval=2",
          f"--checkpoint.dir={tmp / 'ck'}", nproc=4)
    return {"dir": tmp, "ck": str(tmp / "ck"), "losses": losses(tmp / "run")}


@pytest.mark.parametrize("nproc", [2, 1])
def test_reshard_from_four_ranks(four_rank_run, default_cache, tmp_path, nproc):
    """4 -> 2 and 4 -> 1: the same global samples (steps 3, 4 as the 4-rank run's own, which an
    exact 4 -> 4 resume reproduces bitwise), losses within rounding."""
    src = os.path.join(four_rank_run["ck"], "step-00000002")
    res = train(default_cache["cache"], tmp_path / "run", "--train.steps=4", "--checkpoint.interval=2",
                f"--checkpoint.resume={src}", f"--checkpoint.dir={tmp_path / 'ck'}", nproc=nproc)
    assert "saved by 4 ranks, this run has" in res.stderr
    got, ref = losses(tmp_path / "run"), four_rank_run["losses"]
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) < RESHARD_TOL, (step, got[step], ref[step])
    # Same data position as the 4-rank run after the same steps.
    assert train_state(tmp_path / "ck" / "step-00000004")["consumed_samples"] == \
        train_state(os.path.join(four_rank_run["ck"], "step-00000004"))["consumed_samples"] == 4 * G


def test_reshard_two_to_four(two_rank_runs, tmp_path):
    r = two_rank_runs
    src = os.path.join(r["straight"], "ck", "step-00000004")
    train(r["cache"], tmp_path / "run", "--train.steps=6", "--checkpoint.interval=6",
          f"--checkpoint.resume={src}", f"--checkpoint.dir={tmp_path / 'ck'}", nproc=4)
    got, ref = losses(tmp_path / "run"), losses(r["straight"])
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert abs(got[step] - ref[step]) < RESHARD_TOL, (step, got[step], ref[step])
    assert train_state(tmp_path / "ck" / "step-00000006")["consumed_samples"] == 6 * G


def test_micro_batches_cover_the_global_batch_once_on_any_world_size():
    """The trainer's split of a global batch: every sample base..base+G-1 exactly once, whatever
    the world size, so a resharded resume neither repeats nor skips a sample."""
    from types import SimpleNamespace

    from train.config import Config
    from train.trainer import Trainer

    class Spy:
        def batch(self, start, count):
            return list(range(start, start + count))

    cfg = Config()
    cfg.train.global_batch_size, cfg.train.micro_batch_size = 16, 2
    for world in (1, 2, 4, 8):
        seen = []
        for rank in range(world):
            fake = SimpleNamespace(cfg=cfg, world_size=world, rank=rank, train_stream=Spy())
            for mb in Trainer.micro_batches(fake, 48):
                seen += mb
        assert sorted(seen) == list(range(48, 64)), world


def worker_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in children(torchrun_pid):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return pid
        except OSError:
            continue
    return None


@pytest.mark.parametrize("nproc,sig", [(2, signal.SIGUSR1), (1, signal.SIGTERM)], ids=["usr1-2ranks", "term-1rank"])
def test_signal_saves_at_an_agreed_step_and_exits_0(default_cache, tmp_path, nproc, sig):
    """SIGUSR1 to rank 1 alone of 2 (rank 0 must stop at the same step), SIGTERM to a lone run."""
    run, ck = tmp_path / "run", tmp_path / "ck"
    proc = subprocess.Popen(command(nproc, run, "--train.steps=500", f"--checkpoint.dir={ck}"),
                            cwd=ROOT, env=run_env(default_cache["cache"]),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.1)
        target = worker_pid(proc.pid, 1) if nproc > 1 else proc.pid
        assert target is not None
        os.kill(target, sig)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    assert proc.returncode == 0, out[-4000:]
    steps = sorted(n for n in os.listdir(ck) if n.startswith("step-"))
    assert len(steps) == 1 and (ck / "latest").read_text().strip() == steps[0]
    step = train_state(ck / steps[0])["step"]
    assert 2 <= step < 500 and f"stopped at step {step} on request" in out
    assert f"received {sig.name}" in out
    assert max(losses(run)) == step


# A low threshold flags many tiles and a tiny budget then raises each layer's thresholds from
# the first step; stochastic rounding draws its seeds from per-layer call counters. Both are
# per-rank state that an exact resume has to restore.
FQ_STATE = ["--fq.fallback=budget", "--fq.threshold=1.5", "--fq.budget=0.001", "--fq.stochastic_rounding=true",
            "--fq.tile=32"]


def test_exact_resume_restores_fq_layer_state(default_cache, tmp_path):
    cache = default_cache["cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ck = straight / "ck"
    train(cache, straight, "--train.steps=6", "--checkpoint.interval=3", f"--checkpoint.dir={ck}", *FQ_STATE,
          nproc=2)
    saved = torch.load(ck / "step-00000003" / "rng-rank1.pt", weights_only=False)["fq"]
    assert saved and all(s["seed_calls"] > 0 for s in saved.values())
    assert any(bool((s["thr"] > 1.5).any()) for s in saved.values()), "the budget never moved a threshold"
    assert_resume_from_3_is_exact(cache, straight, resumed, *FQ_STATE)


def assert_resume_from_3_is_exact(cache: str, straight, resumed, *args) -> None:
    """Resume `straight`'s step-3 checkpoint on 2 ranks to step 6: the same losses and final state."""
    ck = straight / "ck"
    train(cache, resumed, "--train.steps=6", "--checkpoint.interval=3", f"--checkpoint.resume={ck / 'step-00000003'}",
          f"--checkpoint.dir={resumed / 'ck'}", *args, nproc=2)
    a, b = losses(straight), losses(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        assert b[step] == a[step], (step, b[step], a[step])
    assert_same_state(str(ck / "step-00000006"), str(resumed / "ck" / "step-00000006"))


def test_exact_resume_restores_error_feedback(default_cache, tmp_path):
    """parallel.error_feedback keeps, per rank, what its INT8 reduce-scatters have not delivered
    yet; the checkpoint holds each rank's residuals, so a resume on as many ranks is bitwise
    the run that went straight on (without them its losses differed from step 5). On another
    number of ranks they start from zero, and the log says so."""
    from torch.distributed.checkpoint import FileSystemReader

    cache = default_cache["cache"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ck = straight / "ck"
    feedback = ["--parallel.error_feedback=true", "--parallel.reduce_scatter_dtype=int8"]
    train(cache, straight, "--train.steps=6", "--checkpoint.interval=3", f"--checkpoint.dir={ck}", *feedback,
          nproc=2)
    keys = FileSystemReader(str(ck / "step-00000003")).read_metadata().state_dict_metadata
    saved = sorted(k for k in keys if k.startswith("error_feedback."))
    assert {k.split(".")[1] for k in saved} == {"rank0", "rank1"}
    assert "error_feedback.rank0.layers.0" in saved and "error_feedback.rank1.root" in saved
    assert_resume_from_3_is_exact(cache, straight, resumed, *feedback)
    res = train(cache, tmp_path / "one", "--train.steps=4", f"--checkpoint.resume={ck / 'step-00000003'}",
                *feedback)
    assert "and error-feedback residuals, are per rank and start afresh" in res.stderr
