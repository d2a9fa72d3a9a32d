"""Does fallback pay on a real model? Per Linear layer: tiles flagged and GEMM error vs float64.

Trains a small Llama on the default corpus in fp32 (FQ off, so the captured tensors do not
depend on FQ), captures every block Linear's input X and output gradient dY on one batch, and
quantizes them with the reference: forward Y = X W^T, input gradient dX = dY W and weight
gradient dW = dY^T X, with the configured fallback and without, against float64 and BF16.

    python tools/fallback_study.py --steps 150             # CPU, about 3 minutes
    python tools/fallback_study.py --steps 0 --tile 64 --threshold 16

A ratio above 1 in the `fb/none` column means fallback made that GEMM worse (docs/fq.md).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fq import reference as R  # noqa: E402
from fq.config import FQConfig  # noqa: E402
from train.config import ModelConfig  # noqa: E402
from train.data import IndexedDataset, SampleStream  # noqa: E402
from train.default_data import ensure_default_dataset  # noqa: E402
from train.model import Transformer  # noqa: E402


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def gemm_error(a: torch.Tensor, b: torch.Tensor, tile: int, thr: float, fallback: bool) -> tuple[float, float]:
    """(fraction of flagged tiles, relative error) of the FQ product a @ b.T."""
    return product_error(R.quantize_act(a, tile, thr, thr, fallback), a, b)


def product_error(q: R.TileQuant, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(fraction of flagged tiles, relative error) of a @ b.T computed from a's quantization q."""
    bq, bs = R.quantize_rows(b)
    y = R.gemm_a_fallback(q, bq, bs, torch.float32)
    return q.flags.float().mean().item(), rel(y, a.double() @ b.double().t())


def row_rms_flags(a: torch.Tensor, tile: int, thr: float) -> torch.Tensor:
    """An alternative to FQ's test (a spike over the row's median tile absmax): a tile falls back
    when one of its rows holds a value above thr x that row's RMS over all of K."""
    m = a.shape[0]
    rowmax = R._tile_stats(R._tiles(a, tile), *a.shape, tile, thr, thr, False)[0]  # (M, Kt)
    rms = a.float().pow(2).mean(dim=1).sqrt().clamp_min(1e-30)
    hot = rowmax > thr * rms[:, None]
    mt = R.num_tiles(m, tile)
    pad = torch.zeros(mt * tile, hot.shape[1], dtype=torch.bool)
    pad[:m] = hot
    return pad.view(mt, tile, -1).any(dim=1)


def gemm_error_flags(a: torch.Tensor, b: torch.Tensor, tile: int, flags: torch.Tensor) -> tuple[float, float]:
    """gemm_error with given fallback flags."""
    xt = R._tiles(a, tile)
    rowmax, _, stats = R._tile_stats(xt, *a.shape, tile, 1e9, 1e9, False)
    return product_error(R.quantize_with_flags(a, xt, rowmax, flags, stats, tile), a, b)


def dw_error(dy: torch.Tensor, x: torch.Tensor, tile: int, thr: float, fallback: bool) -> tuple[float, float]:
    """(fraction of flagged X tiles, relative error) of the FQ weight gradient dy.T @ x, computed
    as FQLinear's backward does: X's forward quantization, dY per column with X's row scales."""
    q = R.quantize_act(x, tile, thr, thr, fallback, transposed=True)
    dq, ds = R.quantize_cols_t(dy, row_mult=q.scale_t)
    y = R.gemm_wgrad(dq, ds, q.qt, torch.float32)
    return q.flags.float().mean().item(), rel(y, dy.double().t() @ x.double())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--threshold", type=float, default=FQConfig.threshold)
    ap.add_argument("--row-threshold", type=float, default=16.0,
                    help="the row-RMS test's threshold (value / row RMS), compared in the summary")
    args = ap.parse_args()
    torch.manual_seed(0)
    prefix = ensure_default_dataset()
    dataset = IndexedDataset(prefix)
    stream = SampleStream(dataset, args.seq, 0)
    model = Transformer(ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.dim // 64,
                                    n_kv_heads=max(1, args.dim // 128), vocab_size=dataset.vocab_size,
                                    max_seq_len=args.seq))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))

    def loss_of(start: int, count: int) -> torch.Tensor:
        tokens = stream.batch(start, count).long()
        logits = model(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))

    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (step + 1) / 20)
        loss = loss_of(step * args.batch, args.batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss.item():.3f}", flush=True)

    caps: dict[str, dict[str, torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            def fwd(mod, inp, out, name=name):
                caps.setdefault(name, {})["x"] = inp[0].detach().reshape(-1, inp[0].shape[-1])

            def bwd(mod, gin, gout, name=name):
                caps.setdefault(name, {})["dy"] = gout[0].detach().reshape(-1, gout[0].shape[-1])
            hooks += [m.register_forward_hook(fwd), m.register_full_backward_hook(bwd)]
    loss_of((args.steps + 7) * 2 * args.batch, 2 * args.batch).backward()  # a batch not trained on
    for h in hooks:
        h.remove()

    modules = dict(model.named_modules())
    print(f"\ntile {args.tile}, threshold {args.threshold}, after {args.steps} steps")
    print(f"{'layer':<28} {'op':<3} {'flagged':>8} {'err fb':>9} {'err none':>9} {'fb/none':>8} {'err bf16':>9}")
    ratios, flagged = {"x": [], "dy": [], "dw": []}, {"x": [], "dy": [], "dw": []}
    row_test = {"x": [], "dy": []}
    for name, d in caps.items():
        w = modules[name].weight.detach()
        for op, a, b in (("x", d["x"], w), ("dy", d["dy"], w.t().contiguous()), ("dw", d["dy"], d["x"])):
            error = dw_error if op == "dw" else gemm_error
            fr, e_fb = error(a, b, args.tile, args.threshold, True)
            _, e_none = error(a, b, args.tile, args.threshold, False)
            ref = a.double() @ b.double().t() if op != "dw" else a.double().t() @ b.double()
            e_bf16 = rel(a.bfloat16().double() @ b.bfloat16().double().t() if op != "dw"
                         else a.bfloat16().double().t() @ b.bfloat16().double(), ref)
            ratios[op].append(e_fb / e_none)
            flagged[op].append(fr)
            if op != "dw":
                fr_row, e_row = gemm_error_flags(a, b, args.tile, row_rms_flags(a, args.tile, args.row_threshold))
                row_test[op].append((fr_row, e_row / e_none))
            print(f"{name:<28} {op:<3} {100 * fr:7.1f}% {e_fb:9.2e} {e_none:9.2e} {e_fb / e_none:8.2f} {e_bf16:9.2e}")
    print(f"\nflagged tiles: X {100 * sum(flagged['x']) / len(flagged['x']):.1f}%, "
          f"dY {100 * sum(flagged['dy']) / len(flagged['dy']):.1f}%")
    for op, r in ratios.items():
        print(f"error with / without fallback, {op:<2} GEMMs: mean {sum(r) / len(r):.2f}, max {max(r):.2f} "
              f"over {len(r)}")
    for op, rows in row_test.items():
        fr, r = [x[0] for x in rows], [x[1] for x in rows]
        print(f"row-RMS test (> {args.row_threshold:g} x row RMS), {op:<2}: flagged {100 * sum(fr) / len(fr):.1f}% "
              f"(FQ's test {100 * sum(flagged[op]) / len(flagged[op]):.1f}%); error / no fallback: "
              f"mean {sum(r) / len(r):.2f}, max {max(r):.2f}")


if __name__ == "__main__":
    main()
