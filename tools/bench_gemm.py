"""Benchmark FQ INT8 GEMMs against BF16 torch.matmul measured in the same run (GPU).

    python tools/bench_gemm.py --json fq_bench.json      # H100: Llama shapes, M = 16384 tokens
    python tools/bench_gemm.py --graphs                  # GPU time only: calls replayed as CUDA graphs
    TRITON_INTERPRET=1 python tools/bench_gemm.py --dry  # CPU smoke run of the same code path

Speed-ups are BF16 time / FQ time, medians of triton.testing.do_bench: each call timed from
Python, so a call whose kernels take less GPU time than their launches take on the host shows
the host's time (eager mode). With --graphs every call is captured in a CUDA graph and replayed
(triton.testing.do_bench_cudagraph, mean, no L2 flush between calls): the GPU time alone, which
is what a compiled training step sees while the host keeps ahead of the GPU. "fwd" includes activation
quantization (weights quantized beforehand); "fwd+bwd" is one FQLinear (bf16 weight and input,
the FSDP2 param_dtype regime) through autograd: weight quantization, all quantize kernels and the
three GEMMs, against nn.Linear. Fallback ratios are injected by putting one 1000x spike into the
chosen fraction of activation tiles; the ratio reached is printed next to each figure.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fq import FQConfig, FQLinear  # noqa: E402
from fq import reference as R  # noqa: E402
from fq import triton_kernels as T  # noqa: E402

SHAPES = [(16384, 4096, 14336), (16384, 14336, 4096), (16384, 2048, 8192), (16384, 8192, 2048)]
THR = FQConfig.threshold


def timer(dry: bool, graphs: bool = False):
    if dry:
        return lambda fn: (fn(), 0.0)[1]
    import triton.testing

    if graphs:
        return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100)
    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def activations(m, k, ratio, tile, device, seed=0):
    """bf16 Gaussian (m, k) with one 1000x spike in round(ratio * tiles) random tiles."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
    mt, kt = math.ceil(m / tile), math.ceil(k / tile)
    n = round(ratio * mt * kt)
    if n:
        pick = torch.randperm(mt * kt, device=device, generator=g)[:n]
        rows = torch.clamp((pick // kt) * tile + 7, max=m - 1)
        cols = torch.clamp((pick % kt) * tile + 11, max=k - 1)
        x[rows, cols] = 1000.0
    return x


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def bench_shape(m, k, n, tile, bench, device):
    res = {"M": m, "K": k, "N": n, "tile": tile}
    flops = 2.0 * m * k * n
    x = activations(m, k, 0.0, tile, device)
    w = (torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
    t_bf16 = bench(lambda: x @ w.t())
    res["bf16_ms"] = t_bf16
    res["bf16_tflops"] = flops / t_bf16 / 1e9 if t_bf16 else 0.0
    wq, ws = T.quantize_rows(w)
    xq = T.quantize_act(x, tile, THR, THR, True, transposed=True)

    def speedup(t):
        return t_bf16 / t if t else 0.0

    if device == "cuda":
        res["int_mm_x"] = speedup(bench(lambda: torch._int_mm(xq.q, wq.t())))
    res["rowwise_int8_gemm_x"] = speedup(bench(lambda: T.gemm_rowwise(xq.q, xq.scale, wq, ws, torch.bfloat16)))
    # The same GEMM on Triton's TMA kernel (where the Gluon one cannot run) and on the autotuned
    # pointer-based kernel, which runs where TMA cannot.
    if device == "cuda":
        res["tma_gemm_x"] = speedup(bench(lambda: T._gemm(xq.q, wq, xq.scale, ws, torch.bfloat16, kernel="tma")))
    res["pointer_gemm_x"] = speedup(bench(lambda: T._gemm(xq.q, wq, xq.scale, ws, torch.bfloat16, kernel="pointer")))
    res["rowwise_int8_fwd_x"] = speedup(bench(lambda: T.gemm_a_fallback(
        T.quantize_act(x, tile, THR, THR, False), wq, ws, torch.bfloat16)))
    t_q = bench(lambda: T.quantize_act(x, tile, THR, THR, True))
    res["quant_ms"] = t_q
    res["quant_tbps_min_bytes"] = 3.0 * m * k / t_q / 1e9 if t_q else 0.0  # read bf16 once, write int8
    res["quant_tbps_moved_bytes"] = 5.0 * m * k / t_q / 1e9 if t_q else 0.0  # two passes read x
    res["quant_transposed_ms"] = bench(lambda: T.quantize_act(x, tile, THR, THR, True, transposed=True))
    for ratio in (0.0, 0.05, 0.2):
        xr = activations(m, k, ratio, tile, device, seed=1)
        xrq = T.quantize_act(xr, tile, THR, THR, True)
        res[f"ratio_{ratio}"] = xrq.flags.float().mean().item()
        res[f"fwd_{ratio}_x"] = speedup(bench(lambda: T.gemm_a_fallback(
            T.quantize_act(xr, tile, THR, THR, True, transposed=True), wq, ws, torch.bfloat16)))
        res[f"gemm_{ratio}_x"] = speedup(bench(lambda: T.gemm_a_fallback(xrq, wq, ws, torch.bfloat16)))
        if ratio == 0.05:
            # Correctness at full size: the Triton GEMM against the reference on the same INT8 operands.
            y_t = T.gemm_a_fallback(xrq, wq, ws, torch.float32)
            y_r = R.gemm_a_fallback(xrq, wq, ws, torch.float32)
            res["fwd_vs_reference_rel"] = rel(y_t, y_r)
            ref = xr.double() @ w.double().t()
            res["fwd_vs_fp64_rel"] = rel(y_t, ref)
            res["bf16_vs_fp64_rel"] = rel(xr @ w.t(), ref)
            res["nofallback_vs_fp64_rel"] = rel(T.gemm_a_fallback(
                T.quantize_act(xr, tile, THR, THR, False), wq, ws, torch.float32), ref)
            del y_t, y_r, ref
    gy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    xg = x.detach().requires_grad_(True)
    lin = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    fql = FQLinear.from_linear(lin, FQConfig(tile=tile), "bench", "triton")
    t_lin = bench(lambda: torch.autograd.grad(lin(xg), (xg, lin.weight), gy))
    t_fql = bench(lambda: torch.autograd.grad(fql(xg), (xg, fql.weight), gy))
    assert fql.last_backend == "triton"
    if device == "cuda" and not res.get("profiled"):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.autograd.grad(fql(xg), (xg, fql.weight), gy)
            torch.cuda.synchronize()
        res["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
        print(res["profile"], flush=True)
    res["fwd_bwd_bf16_ms"], res["fwd_bwd_fq_ms"] = t_lin, t_fql
    res["fwd_bwd_x"] = t_lin / t_fql if t_fql else 0.0
    # Where the backward time goes.
    dyq = T.quantize_act(gy, tile, THR, THR, True)
    wq_t, ws_t = T.quantize_cols_t(w)
    dq_t, ds = T.quantize_cols_t(gy, row_mult=xq.scale_t)
    res["parts_ms"] = {
        "quant_x": t_q,
        "quant_w_rows": bench(lambda: T.quantize_rows(w)),
        "gemm_fwd": bench(lambda: T.gemm_a_fallback(xq, wq, ws, torch.bfloat16)),
        "quant_dy_rows": bench(lambda: T.quantize_act(gy, tile, THR, THR, True)),
        "quant_w_cols": bench(lambda: T.quantize_cols_t(w)),
        "gemm_dx": bench(lambda: T.gemm_a_fallback(dyq, wq_t, ws_t, torch.bfloat16)),
        "quant_dy_cols": bench(lambda: T.quantize_cols_t(gy, row_mult=xq.scale_t)),
        "gemm_dw": bench(lambda: T.gemm_wgrad(dq_t, ds, xq.qt, torch.bfloat16)),
        "bf16_dx": bench(lambda: gy @ w),
        "bf16_dw": bench(lambda: gy.t() @ x),
    }
    return res


def gemm_configs_diag(m, k, n, tile, bench, device):
    """Every bulk GEMM config on the forward and weight-gradient layouts: time, registers, spills.
    (The fallback tiles' remainder is a separate kernel: `fq.triton_kernels._fallback_tail_kernel`.)"""
    x = activations(m, k, 0.05, tile, device, seed=1)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    gy = torch.randn(m, n, device=device, dtype=torch.bfloat16)
    xq = T.quantize_act(x, tile, THR, THR, True, transposed=True)
    wq, ws = T.quantize_rows(w)
    dq_t, ds = T.quantize_cols_t(gy, row_mult=xq.scale_t)
    t_bf16 = bench(lambda: x @ w.t())
    out = []
    modes = {
        "rowwise": lambda meta: T._gemm(xq.q, wq, xq.scale, ws, torch.bfloat16, meta),
        "dw": lambda meta: T._gemm(dq_t, xq.qt, ds, None, torch.bfloat16, meta),
    }
    for name, run in modes.items():
        for cfg in T._gemm_configs():
            meta = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            _, ck = run(meta)
            t = bench(lambda: run(meta))
            row = {"config": meta, "gemm": name, "x_bf16_fwd": t_bf16 / t if t else 0.0,
                   "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None)}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


def copy_bandwidth(bench, device, nbytes=2**31):
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2.0 * nbytes / t / 1e9 if t else 0.0


def table(results, copy_tbps) -> str:
    lines = ["| M,K,N | bf16 TFLOP/s | _int_mm | row-wise INT8 GEMM (pointer kernel) | row-wise INT8 fwd | FQ fwd 0% "
             "| FQ fwd 5% | FQ fwd 20% | FQ fwd+bwd | quantize TB/s (3 B/elem) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        def best(ratio):
            return f"{r[f'fwd_{ratio}_x']:.2f}x (GEMM alone {r[f'gemm_{ratio}_x']:.2f}x)"
        lines.append(
            f"| {r['M']},{r['K']},{r['N']} | {r['bf16_tflops']:.0f} | {r.get('int_mm_x', 0):.2f}x | "
            f"{r['rowwise_int8_gemm_x']:.2f}x ({r['pointer_gemm_x']:.2f}x) | {r['rowwise_int8_fwd_x']:.2f}x | "
            f"{best(0.0)} | {best(0.05)} | {best(0.2)} | {r['fwd_bwd_x']:.2f}x | {r['quant_tbps_min_bytes']:.2f} "
            f"({100 * r['quant_tbps_min_bytes'] / copy_tbps if copy_tbps else 0:.0f}% of copy) |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="tiny shapes, no timing (CPU interpreter smoke run)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--shapes", default="", help="M,K,N;M,K,N (default: Llama shapes with M=16384)")
    ap.add_argument("--json", default="", help="write every figure here")
    ap.add_argument("--diag", action="store_true", help="also time every GEMM config (registers, spills)")
    ap.add_argument("--graphs", action="store_true", help="time calls replayed as CUDA graphs (GPU time only)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry:
        sys.exit("bench_gemm.py: no CUDA device; use --dry with TRITON_INTERPRET=1 for a CPU smoke run")
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    elif args.dry:
        shapes = [(256, 192, 128)]
    bench = timer(args.dry, args.graphs)
    # Always timed eagerly: in a CUDA graph the copy becomes a memcpy node that the copy engines
    # run at ~2.4 TB/s on the H100, below the ~3.0 TB/s of a copy kernel.
    copy_tbps = copy_bandwidth(timer(args.dry), device, 2**20 if args.dry else 2**31)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": __import__("triton").__version__, "copy_tbps": copy_tbps,
           "timing": "CUDA graphs (GPU time)" if args.graphs else "do_bench (eager calls)"}
    print(json.dumps(env), flush=True)
    results = []
    for m, k, n in shapes:
        r = bench_shape(m, k, n, args.tile, bench, device)
        print(json.dumps(r), flush=True)
        results.append(r)
    diag = gemm_configs_diag(*shapes[0], args.tile, bench, device) if args.diag else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results, "gemm_configs": diag}, f, indent=1)
    print(table(results, copy_tbps))


if __name__ == "__main__":
    main()
