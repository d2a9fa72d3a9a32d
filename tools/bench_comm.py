"""Benchmark INT8 vs bf16/fp32 FSDP communication on GPUs (NCCL). Not a test.

    torchrun --nproc_per_node=2 tools/bench_comm.py check        # Triton bytes == torch bytes
    torchrun --nproc_per_node=2 tools/bench_comm.py collectives  # per collective, 32 MB .. 1 GB
    torchrun --nproc_per_node=2 tools/bench_comm.py train        # ~1B model step time

Sizes are those of the whole unsharded tensor in bf16 (the all-gather output); the
reduce-scatter moves the same number of elements, as fp32 gradients. INT8 times include the
quantize and dequantize kernels. Rank 0 prints one JSON line per measurement and a table last.
For NCCL's socket transport (a stand-in for slow links between nodes) run the same command with
NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_SOCKET_IFNAME=lo.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from parallel.collectives import Int8AllGather, Int8ReduceScatter  # noqa: E402
from parallel.quantize import Layout, dequantize_rows, dequantize_sum, quantize_rows  # noqa: E402

MB = 1 << 20


def log(rank: int, **row) -> None:
    if rank == 0:
        print(json.dumps(row), flush=True)


def cuda_time(fn, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of fn() over iters runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def check(rank: int, world: int) -> None:
    """The Triton kernels on this GPU write the torch path's bytes and sums."""
    g = torch.Generator().manual_seed(rank)
    ok = True
    for rows, n, segments in [(2, 1 << 20, None), (4, 300_001, [1000, 299_001]), (1, 5, None)]:
        x = torch.randn(rows, n, generator=g) * torch.exp(2 * torch.randn(rows, n, generator=g))
        lay = Layout(n, 256, segments)
        cpu = quantize_rows(x, 256, layout=lay)
        gpu = quantize_rows(x.cuda(), 256, layout=lay)
        same_bytes = torch.equal(cpu, gpu.cpu())
        d_cpu = dequantize_rows(cpu, n, 256, torch.empty(rows, n, dtype=torch.bfloat16), lay)
        d_gpu = dequantize_rows(gpu, n, 256, torch.empty(rows, n, dtype=torch.bfloat16, device="cuda"), lay)
        s_cpu = dequantize_sum(cpu, n, 256, torch.empty(n), lay)
        s_gpu = dequantize_sum(gpu, n, 256, torch.empty(n, device="cuda"), lay)
        row = dict(check="triton_vs_torch", rows=rows, n=n, segments=segments is not None,
                   same_bytes=same_bytes, same_bf16_dequant=torch.equal(d_cpu, d_gpu.cpu()),
                   same_sum=torch.equal(s_cpu, s_gpu.cpu()))
        ok &= row["same_bytes"] and row["same_bf16_dequant"] and row["same_sum"]
        log(rank, **row)
    log(rank, check="all", ok=ok)


def collectives(rank: int, world: int, sizes_mb: list[int], iters: int) -> list[dict]:
    group = dist.group.WORLD
    dev = torch.device("cuda")
    rows = []
    for size_mb in sizes_mb:
        n_total = size_mb * MB // 2
        n = n_total // world
        shard = torch.randn(n, device=dev, dtype=torch.bfloat16)
        out = torch.empty(n_total, device=dev, dtype=torch.bfloat16)
        ag_bf16 = cuda_time(lambda: dist.all_gather_into_tensor(out, shard), iters)
        own = out[rank * n:(rank + 1) * n]
        own.copy_(shard)
        int8_ag = Int8AllGather(256)
        ag_int8 = cuda_time(lambda: int8_ag(out, own, group), iters)
        layout = Layout(n, 256)  # built once, as the collectives cache theirs
        q_only = cuda_time(lambda: quantize_rows(own.view(1, n), 256, layout=layout), iters)
        del shard
        grads = torch.randn(n_total, device=dev, dtype=torch.float32)
        red = torch.empty(n, device=dev, dtype=torch.float32)
        rs_fp32 = cuda_time(lambda: dist.reduce_scatter_tensor(red, grads), iters)
        grads_bf16 = grads.to(torch.bfloat16)
        red_bf16 = torch.empty(n, device=dev, dtype=torch.bfloat16)
        rs_bf16 = cuda_time(lambda: dist.reduce_scatter_tensor(red_bf16, grads_bf16), iters)
        del grads_bf16, red_bf16
        int8_rs = Int8ReduceScatter(256)
        rs_int8 = cuda_time(lambda: int8_rs(red, grads, group, dist.ReduceOp.SUM), iters)
        row = dict(bench="collective", size_mb=size_mb, world=world,
                   ag_bf16_ms=ag_bf16, ag_int8_ms=ag_int8, ag_ratio=ag_int8 / ag_bf16,
                   quantize_shard_ms=q_only,
                   rs_fp32_ms=rs_fp32, rs_bf16_ms=rs_bf16, rs_int8_ms=rs_int8,
                   rs_ratio_vs_fp32=rs_int8 / rs_fp32, rs_ratio_vs_bf16=rs_int8 / rs_bf16)
        log(rank, **row)
        rows.append(row)
        del grads, red, out
        torch.cuda.empty_cache()
    return rows


def train(rank: int, world: int, configs: list[str], steps: int, warmup: int, batch: int, seq: int,
          layers: int) -> list[dict]:
    from parallel.fsdp import build_mesh, shard_model
    from train.config import ModelConfig, ParallelConfig
    from train.model import Transformer, num_params

    cfg = ModelConfig(dim=2048, n_layers=layers, n_heads=16, n_kv_heads=16, vocab_size=32000,
                      max_seq_len=seq)
    mesh = build_mesh(world, 1, "cuda")
    rows = []
    for name in configs:
        gather, reduce = name.split("/")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Transformer(cfg)
        n_params = num_params(model, exclude_embeddings=False)
        shard_model(model, mesh, ParallelConfig(all_gather_dtype=gather, reduce_scatter_dtype=reduce),
                    param_dtype=torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        g = torch.Generator(device="cuda").manual_seed(rank)
        times, losses = [], []
        for step in range(warmup + steps):
            tok = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device="cuda", generator=g)
            torch.cuda.synchronize()
            dist.barrier()
            t0 = time.perf_counter()
            logits = model(tok[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tok[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        row = dict(bench="train_step", comms=name, params_b=round(n_params / 1e9, 3), world=world,
                   batch=batch, seq=seq, step_ms_median=1000 * statistics.median(times),
                   step_ms_all=[round(1000 * t, 1) for t in times], last_loss=losses[-1],
                   transport="socket" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "default",
                   peak_mem_gb=round(torch.cuda.max_memory_allocated() / 1e9, 1))
        log(rank, **row)
        rows.append(row)
        del model, opt
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("check", "collectives", "train"))
    ap.add_argument("--sizes-mb", default="32,128,256,512,1024")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--configs", default="bf16/fp32,int8/int8")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=18)
    args = ap.parse_args()

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    log(rank, env=dict(torch=torch.__version__, nccl=".".join(map(str, torch.cuda.nccl.version())),
                       gpu=torch.cuda.get_device_name(), world=world,
                       p2p_disabled=os.environ.get("NCCL_P2P_DISABLE", "0")))
    if args.mode == "check":
        check(rank, world)
    elif args.mode == "collectives":
        rows = collectives(rank, world, [int(s) for s in args.sizes_mb.split(",")], args.iters)
        if rank == 0:
            print("| size (bf16) | AG bf16 ms | AG int8 ms | int8/bf16 | quantize shard ms "
                  "| RS fp32 ms | RS bf16 ms | RS int8 ms | int8/fp32 |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['size_mb']} MB | {r['ag_bf16_ms']:.3f} | {r['ag_int8_ms']:.3f} | {r['ag_ratio']:.2f} | "
                      f"{r['quantize_shard_ms']:.3f} | "
                      f"{r['rs_fp32_ms']:.3f} | {r['rs_bf16_ms']:.3f} | {r['rs_int8_ms']:.3f} | "
                      f"{r['rs_ratio_vs_fp32']:.2f} |")
    else:
        rows = train(rank, world, args.configs.split(","), args.steps, args.warmup, args.batch, args.seq,
                     args.layers)
        if rank == 0:
            for r in rows:
                print(f"| {r['transport']} | {r['comms']} | {r['params_b']}B | {r['step_ms_median']:.0f} ms |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
