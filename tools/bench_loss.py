"""LM head + cross-entropy: the plain loss (logits for every token, then F.cross_entropy) against
train/loss.py's chunked one. Forward + backward time and the memory each needs. Not a test.

    python tools/bench_loss.py                                   # 1B shapes: dim 2048, vocab 32000
    python tools/bench_loss.py --dim 4096 --vocab 128256 --tokens 8192   # Llama 3 8B's head

Rows: `plain`, and `chunk N` for N tokens per chunk (the default, train/loss.CHUNK_TOKENS, is
marked). `kept` is what the forward leaves alive for the backward, `peak` the most allocated
during forward + backward, both above the inputs. On CPU only the time is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.loss import CHUNK_TOKENS, linear_cross_entropy  # noqa: E402

GIB = 1 << 30


def plain(h, w, t):
    return F.cross_entropy((h @ w.t()).float(), t)


def measure(loss_fn, h, w, t, iters: int) -> dict:
    cuda = h.is_cuda
    for _ in range(2):  # warm-up
        loss_fn(h, w, t).backward()
    times = []
    for _ in range(iters):
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss_fn(h, w, t).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    row = {"ms": statistics.median(times), "kept_gib": None, "peak_gib": None}
    if cuda:
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = loss_fn(h, w, t)
        row["kept_gib"] = (torch.cuda.memory_allocated() - base) / GIB
        loss.backward()
        del loss
        h.grad = w.grad = None  # the gradients themselves are the same in every row
        row["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="8192,32768", help="tokens per micro-batch, comma-separated")
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--chunks", default="", help="tokens per chunk to compare, comma-separated "
                                                 "(default: half, once and twice the default)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    default = CHUNK_TOKENS
    chunks = [int(c) for c in args.chunks.split(",")] if args.chunks else [default // 2, default, 2 * default]
    table = []
    for n in (int(x) for x in args.tokens.split(",")):
        g = torch.Generator(device=args.device).manual_seed(0)
        h = torch.randn(n, args.dim, device=args.device, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(args.vocab, args.dim, device=args.device, generator=g) * 0.02).to(dtype).requires_grad_()
        t = torch.randint(0, args.vocab, (n,), device=args.device, generator=g)
        rows = [("plain", plain)] + [(f"chunk {c}" + (" (default)" if c == default else ""),
                                      lambda h, w, t, c=c: linear_cross_entropy(h, w, t, chunk=c))
                                     for c in chunks]
        for name, fn in rows:
            r = {"tokens": n, "dim": args.dim, "vocab": args.vocab, "row": name, **measure(fn, h, w, t, args.iters)}
            print(json.dumps(r), flush=True)
            table.append(r)
    print("\n| tokens | row | fwd+bwd ms | kept for backward GiB | peak GiB |\n|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in table:
        print(f"| {r['tokens']} | {r['row']} | {r['ms']:.2f} | {fmt(r['kept_gib'])} | {fmt(r['peak_gib'])} |")


if __name__ == "__main__":
    main()
