"""End-to-end: the CLI, metrics and TensorBoard output, FSDP on 2 ranks vs 1, bad steps."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, free_port

TINY = ["--model.dim=64", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--data.seq_len=32", "--train.global_batch_size=8", "--train.micro_batch_size=2",
        "--optim.warmup_steps=2", "--optim.lr=3e-3", "--logging.progress_bar=false"]


def run_cli(args, cache, nproc=1, timeout=600):
    env = {**os.environ, "FQTRAIN_CACHE": cache, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def test_cli_trains_and_writes_metrics_and_tensorboard(default_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "--train.steps=16", "--logging.interval=4", "--train.val_interval=8",
                    "--train.val_batches=2", f"--logging.dir={run_dir}"], default_cache["cache"])
    train_rows, val_rows = read_metrics(run_dir)
    assert [r["step"] for r in train_rows] == [1, 4, 8, 12, 16]
    for r in train_rows:
        for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "fallback_ratio"):
            assert key in r, key
        assert 0.0 <= r["fallback_ratio"] <= 1.0  # FQ is on by default
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert [r["step"] for r in val_rows] == [8, 16] and all(math.isfinite(r["val_loss"]) for r in val_rows)
    assert "step 16/16" in proc.stderr and "val_loss" in proc.stderr

    # The resolved config is complete and loads back as the same run.
    from train.config import load_config
    resolved = load_config(str(run_dir / "config.toml"))
    assert resolved.train.steps == 16 and resolved.model.dim == 64 and resolved.model.vocab_size == 2048

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    losses = acc.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 4, 8, 12, 16]
    assert losses[-1].value == pytest.approx(train_rows[-1]["loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [8, 16]


def test_cli_reports_config_errors_before_work(tmp_path):
    env = {**os.environ, "FQTRAIN_CACHE": str(tmp_path / "never-built")}
    proc = subprocess.run([sys.executable, "-m", "train", "--train.stesp=3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown key train.stesp (did you mean 'steps'?)" in proc.stderr
    assert not (tmp_path / "never-built").exists()


@pytest.mark.slow
def test_fsdp_two_ranks_match_one_process(default_cache, tmp_path):
    """Same data, same init: 2-rank FSDP (fp32 wire) tracks the single-process run step by step;
    with the default INT8 wire it stays close."""
    common = [*TINY, "--train.steps=10", "--logging.interval=1", "--train.val_interval=0",
              "--fq.enabled=false", "--logging.tensorboard=false"]
    run_cli([*common, f"--logging.dir={tmp_path / 'one'}"], default_cache["cache"])
    run_cli([*common, f"--logging.dir={tmp_path / 'two'}", "--parallel.all_gather_dtype=fp32",
             "--parallel.reduce_scatter_dtype=fp32"], default_cache["cache"], nproc=2)
    run_cli([*common, f"--logging.dir={tmp_path / 'int8'}"], default_cache["cache"], nproc=2)
    one = [r["loss"] for r in read_metrics(tmp_path / "one")[0]]
    two = [r["loss"] for r in read_metrics(tmp_path / "two")[0]]
    int8 = [r["loss"] for r in read_metrics(tmp_path / "int8")[0]]
    assert len(one) == len(two) == len(int8) == 10
    assert one == pytest.approx(two, rel=1e-4)
    assert one == pytest.approx(int8, rel=2e-2)
    assert one[-1] < one[0] - 0.5


class _Poisoned:
    """Wraps Trainer.loss_fn to return NaN on chosen calls."""

    def __init__(self, fn, bad_calls):
        self.fn, self.bad, self.calls = fn, set(bad_calls), 0

    def __call__(self, tokens):
        loss = self.fn(tokens)
        self.calls += 1
        return loss * float("nan") if self.calls in self.bad else loss


def _trainer(default_cache, tmp_path, extra=()):
    from train.config import load_config
    from train.trainer import Trainer

    cfg = load_config(None, [*TINY, "--fq.enabled=false", "--train.val_interval=0", "--logging.interval=1",
                             f"--data.path={default_cache['prefix']}", f"--logging.dir={tmp_path}",
                             "--logging.tensorboard=false", *extra])
    return Trainer(cfg)


def test_nonfinite_loss_skips_the_update(default_cache, tmp_path):
    import torch.distributed as dist

    trainer = _trainer(default_cache, tmp_path, ["--train.steps=4"])
    try:
        accum = 8 // 2
        trainer.loss_fn = _Poisoned(trainer.loss_fn, bad_calls={accum + 1})  # step 2's first micro-batch
        before = None
        for step in range(4):
            if step == 1:
                before = [p.detach().clone() for p in trainer.model.parameters()]
            out = trainer.train_step()
            if step == 1:
                assert math.isnan(out["loss"])
                after = list(trainer.model.parameters())
                assert all(torch.equal(a, b) for a, b in zip(before, after)), "a NaN step changed weights"
            else:
                assert math.isfinite(out["loss"])
        assert trainer.skipped_steps == 1 and trainer.step == 4
        assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
        # Skipped on the device: AdamW counted only the three finite steps.
        assert {float(s["step"]) for s in trainer.optimizer.state.values()} == {3.0}
    finally:
        dist.destroy_process_group()


def test_consecutive_nonfinite_steps_abort(default_cache, tmp_path):
    import torch.distributed as dist
    from train.trainer import TrainingAborted

    trainer = _trainer(default_cache, tmp_path, ["--train.steps=10", "--train.max_bad_steps=3"])
    try:
        trainer.loss_fn = _Poisoned(trainer.loss_fn, bad_calls=range(1, 1000))
        with pytest.raises(TrainingAborted, match="3 consecutive steps"):
            trainer.train()
        # The loop reads step N's numbers after launching step N+1: step 3's abort comes with
        # step 4 launched (its update skipped on the device too), before step 3 is counted.
        assert trainer.step == 4 and trainer.skipped_steps == 2
    finally:
        dist.destroy_process_group()


def test_loop_reads_each_steps_numbers_after_launching_the_next(default_cache, tmp_path, monkeypatch):
    """The host never waits for step N before step N+1 is launched, except where its state must
    be exact: before an evaluation (step 3 here), a save (step 4) and at the end (step 6). Every
    step is still logged, in order, with FQ telemetry, the right token counts, and its own time
    (a clock that advances 1 s per step: steps read right after the one before get no less)."""
    import types

    import torch.distributed as dist

    import train.trainer as trainer_module

    trainer = _trainer(default_cache, tmp_path, ["--train.steps=6", "--train.val_interval=3", "--train.val_batches=1",
                                                 "--checkpoint.interval=4", "--fq.enabled=true",
                                                 f"--checkpoint.dir={tmp_path / 'ck'}"])
    events = []
    launch, complete, evaluate, save = trainer._launch_step, trainer._complete, trainer.evaluate, trainer.save
    clock = [1000.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def timed_launch():
        events.append(f"launch {trainer.step + 1}")
        clock[0] += 1.0
        return launch()

    trainer._launch_step = timed_launch
    trainer._complete = lambda rec, *a: events.append(f"read {rec.step}") or complete(rec, *a)
    trainer.evaluate = lambda: events.append("eval") or evaluate()
    trainer.save = lambda: events.append("save") or save()
    try:
        trainer.train()
    finally:
        dist.destroy_process_group()
    assert events == ["launch 1", "launch 2", "read 1", "launch 3", "read 2", "read 3", "eval",
                      "launch 4", "read 4", "save", "launch 5", "launch 6", "read 5", "read 6", "eval", "save"]
    rows, vals = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6] and [v["step"] for v in vals] == [3, 6]
    assert [r["tokens_seen"] for r in rows] == [8 * 32 * s for s in range(1, 7)]
    assert all(math.isfinite(r["loss"]) and 0.0 <= r["fallback_ratio"] <= 1.0 for r in rows)
    assert [r["tokens_per_sec"] for r in rows[1:]] == [8 * 32 / 1.0] * 5
