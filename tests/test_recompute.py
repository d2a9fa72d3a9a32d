"""Activation checkpointing (train.recompute_every): the same numbers as without it, fewer saved
activations, and FQ telemetry, budget thresholds and outlier counts taken once, not again in
the backward's rerun of each block."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from fq import FQConfig, FQLinear, collect_stats, convert
from tests.test_resume import losses, train
from train.config import ModelConfig
from train.model import Transformer

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def step(recompute: bool, fq: FQConfig | None):
    torch.manual_seed(0)
    model = Transformer(CFG)
    if fq is not None:
        convert(model, fq)
    for block in model.layers:
        block.recompute = recompute
    tokens = torch.randint(0, 97, (4, 25), generator=torch.Generator().manual_seed(1))
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    # Counts what autograd keeps outside the checkpointed blocks (their inner saves go to
    # checkpoint's own hooks, which drop them).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in range(2):  # two micro-batches: the budget adapts between them
            logits = model(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    fq_layers = [m for m in model.modules() if isinstance(m, FQLinear)]
    counts = [m.fq_stats.clone() for m in fq_layers]  # raw counts: a ratio would hide a double count
    return loss.detach(), grads, sum(saved), (counts, collect_stats(model) if fq else {}), [m.fq_thr for m in fq_layers]


@pytest.mark.parametrize("fq", [None, FQConfig(), FQConfig(tile=32, threshold=1.2, fallback="budget", budget=0.05, stochastic_rounding=True)],
                         ids=["bf16", "fq", "fq-budget-sr"])
def test_recompute_gives_the_same_step_with_fewer_saved_tensors(fq):
    loss_a, grads_a, saved_a, stats_a, thr_a = step(False, fq)
    loss_b, grads_b, saved_b, stats_b, thr_b = step(True, fq)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert saved_b < saved_a / 2, (saved_a, saved_b)
    assert all(torch.equal(a, b) for a, b in zip(stats_a[0], stats_b[0]))  # not counted again in the rerun
    assert all(torch.equal(a, b) for a, b in zip(thr_a, thr_b))
    if fq is not None and fq.fallback == "budget":
        assert stats_a[1]["fq/fallback_ratio"] > 0 and any((t > fq.threshold).any() for t in thr_a)


@pytest.mark.slow
def test_cli_recompute_every_matches_plain_run(default_cache, tmp_path):
    """Through the trainer: FQ with a budget, outlier telemetry on every step, every other
    block recomputed; losses, gradient norms and every logged metric equal the plain run's."""
    args = ["--train.steps=3", "--fq.fallback=budget", "--logging.outliers=true", "--logging.outlier_interval=1",
            "--model.n_layers=4"]
    train(default_cache["cache"], tmp_path / "plain", *args)
    res = train(default_cache["cache"], tmp_path / "recompute", *args, "--train.recompute_every=2")
    assert "2 of 4 blocks recompute their activations" in res.stderr
    assert losses(tmp_path / "plain") == losses(tmp_path / "recompute")

    def metrics(run):
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if '"loss"' in line]
        drop = ("tokens_per_sec", "mfu", "tflops", "step_time", "time", "elapsed", "peak_mem_gib", "eta")
        return [{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in recs]

    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "recompute")
    assert any(k.startswith("outliers/") for k in a[-1]), sorted(a[-1])
    assert a == b


def test_compiled_recompute_keeps_uncompiled_fq_layers_outside_the_checkpoint():
    """FQ layers that torch.compile cannot trace (the reference backend) break a compiled
    checkpoint: dynamo then gave up on the whole block (not one graph compiled here; on the
    H100, when stochastic rounding still ran FQ uncompiled, those blocks ran at 1/30 of the speed).
    compile_blocks compiles the body of a recomputing block under an uncompiled checkpoint:
    its graphs compile, and the step and telemetry equal the compiled model's without recompute."""
    from torch._dynamo.utils import counters
    from train.model import compile_blocks

    runs = []
    for recompute in (False, True):
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = convert(Transformer(CFG), FQConfig(tile=32))
        for block in model.layers:
            block.recompute = recompute
        compile_blocks(model, traceable=False)
        tokens = torch.randint(0, 97, (4, 25), generator=torch.Generator().manual_seed(1))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        assert counters["stats"]["unique_graphs"] >= len(model.layers)  # every block compiled something
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                     [m.fq_stats.clone() for m in model.modules() if isinstance(m, FQLinear)]))
    (loss_a, grads_a, counts_a), (loss_b, grads_b, counts_b) = runs
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-4, atol=1e-6), n
    assert all(torch.equal(a, b) for a, b in zip(counts_a, counts_b))
