"""A small Llama trained 200 steps on CPU with FQLinear tracks the nn.Linear loss curve."""
import inspect
import json
import textwrap

import torch

from fq import FQConfig, collect_stats, convert
from train.config import ModelConfig
from train.model import Transformer

STEPS, BATCH, SEQ = 200, 8, 32
# Stated tolerance: mean |loss_fq - loss_ref| over the last 50 steps below 0.1 nats (4% of the
# ~2.5 loss there; measured 0.002-0.07 across per-GEMM variants, which is run-to-run noise of
# this tiny model), and every step's loss within 0.3 nats of the baseline's.
MEAN_TOL, MAX_TOL = 0.1, 0.3


def byte_corpus() -> torch.Tensor:
    text = "".join(inspect.getsource(m) for m in (json, textwrap, inspect))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def train(fq: bool) -> list[float]:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=SEQ)
    model = Transformer(cfg)
    if fq:
        convert(model, FQConfig(tile=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = byte_corpus()
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=gen)
        window = torch.stack([data[i:i + SEQ + 1] for i in idx.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if fq:
        stats = collect_stats(model)
        assert stats["fq/nonfinite"] == 0.0 and 0.0 <= stats["fallback_ratio"] < 0.5
    return losses


def test_fq_tracks_nn_linear_loss_curve():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and immune to a busy CI machine
    try:
        ref, got = train(False), train(True)
    finally:
        torch.set_num_threads(threads)
    assert ref[-1] < ref[0] - 1.0  # the baseline learns
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    assert sum(diffs[-50:]) / 50 < MEAN_TOL, (ref[-5:], got[-5:])
    assert max(diffs) < MAX_TOL, max(diffs)
