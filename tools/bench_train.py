"""Training throughput and memory of the real trainer: BF16 vs FQ-INT8 vs a row-wise INT8 peer.

Each row is `python -m train` (or torchrun for --nproc > 1) on random tokens, so what is timed is
the product's own step: FSDP2, FQ layers, optimizer, logging. Tokens/s and peak memory are the
medians of the logged steps after warm-up, read back from metrics.jsonl.

    python tools/bench_train.py --config configs/llama-1b.toml --steps 30 --rows bf16,fq,rowwise
    python tools/bench_train.py --nproc 2 --rows bf16,fq ...   # FSDP over 2 GPUs
    python tools/bench_train.py --profile 3 ...                # + where each row's time goes
    python tools/bench_train.py --profile 3 --keep runs ...    # ... and keep the Chrome traces
    python tools/bench_train.py --memory 6 ...                 # + what is alive at step 6's peak

Rows: bf16 (fq.enabled=false), fq (FQ-INT8 with fallback), rowwise (fq.fallback=none: per-row
INT8 without fallback, the torchao-style recipe), fqbudget (fallback capped near 5% of tiles per
layer and GEMM, the kernels' design point), float8 (torchao's float8 training, a peer; needs
torchao), with suffixes: `+compile` (torch.compile),
`+bf16comm` (bf16 all-gather / fp32 reduce-scatter instead of the default INT8 wire),
`+deepspeed` (DeepSpeed ZeRO-3, ZeRO++ with INT8 comms), `+swiglu8` (fq.swiglu_int8: SwiGLU
saves its inputs as INT8). Comms matter from --nproc 2 on;
`--sockets` makes NCCL use its socket transport (NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1), which
stands in for slow links between nodes:

    python tools/bench_train.py --nproc 2 --sockets --rows fq+bf16comm,fq,fq+deepspeed ...
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ROWS = {
    "bf16": ["--fq.enabled=false"],
    "fq": ["--fq.enabled=true"],
    "rowwise": ["--fq.enabled=true", "--fq.fallback=none"],
    "fqbudget": ["--fq.enabled=true", "--fq.fallback=budget", "--fq.budget=0.05"],
    "float8": ["--fq.enabled=false", "--train.peer_linear=torchao_float8"],
}
# Row suffixes, combinable: "fq+bf16comm", "bf16+deepspeed+compile".
MODIFIERS = {
    "compile": ["--train.compile=true"],
    "bf16comm": ["--parallel.all_gather_dtype=bf16", "--parallel.reduce_scatter_dtype=fp32"],
    "deepspeed": ["--parallel.engine=deepspeed"],  # ZeRO-3; ZeRO++ with the (default) int8 comm dtypes
    "swiglu8": ["--fq.swiglu_int8=true"],  # SwiGLU saves gate and up as INT8 (fq/swiglu.py)
}


def row_overrides(name: str) -> list[str]:
    base, *mods = name.split("+")
    unknown = [m for m in mods if m not in MODIFIERS] + ([] if base in ROWS else [base])
    if unknown:
        sys.exit(f"--rows: unknown {unknown} in '{name}'; rows are {list(ROWS)}, suffixes +{', +'.join(MODIFIERS)}")
    # Explicit either way: the GPU configs turn train.compile on, and a row without +compile is eager.
    compile_flag = [] if "compile" in mods else ["--train.compile=false"]
    return [*ROWS[base], *compile_flag, *(o for m in mods for o in MODIFIERS[m])]


def random_dataset(prefix: str, vocab: int, tokens: int, seed: int = 0) -> None:
    from train.data import IndexedDatasetWriter

    rng = np.random.default_rng(seed)
    writer = IndexedDatasetWriter(prefix + ".bin", prefix + ".idx", vocab, eos_id=vocab - 1)
    doc = 4096
    data = rng.integers(0, vocab - 1, size=tokens, dtype=np.int64)
    data[doc - 1::doc] = vocab - 1
    writer.add(data, np.full(tokens // doc, doc))
    writer.finish()


def run_row(name: str, args, data: str, workdir: str) -> dict:
    run_dir = os.path.join(workdir, name.replace("+", "_"))
    cli = ["--config", args.config, f"--data.path={data}", f"--train.steps={args.steps}",
           "--logging.interval=1", "--train.val_interval=0", "--checkpoint.interval=0",
           "--logging.tensorboard=false", "--logging.progress_bar=false", f"--logging.dir={run_dir}",
           f"--model.vocab_size={args.vocab}", *row_overrides(name), *args.extra]
    if args.profile:  # the steps right after warm-up; left out of the medians below
        cli += [f"--logging.profile_steps={args.profile}", f"--logging.profile_start={args.warmup + 1}"]
    if args.memory:
        cli += [f"--logging.memory_snapshot_step={args.memory}"]
    if args.nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "train", *cli]
    else:
        cmd = [sys.executable, "-m", "train", *cli]
    env = dict(os.environ, NCCL_P2P_DISABLE="1", NCCL_SHM_DISABLE="1") if args.sockets else None
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {"row": name, "error": f"exit {proc.returncode}"}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    timed = [r for r in rows[args.warmup:] if not args.warmup < r["step"] <= args.warmup + args.profile]
    med = lambda key: statistics.median(r[key] for r in timed if r.get(key) is not None)  # noqa: E731
    backend = [line for line in proc.stderr.splitlines() if "fq: backend" in line]
    return {"row": name, "tokens_per_sec": med("tokens_per_sec"), "mfu": med("mfu") if timed[0].get("mfu") else None,
            "peak_mem_gib": max((r.get("peak_mem_gib") or 0.0) for r in timed), "loss_last": rows[-1]["loss"],
            "fallback_ratio": rows[-1].get("fallback_ratio"),
            "backend": backend[-1].split("fq: ", 1)[1][:60] if backend else "fq off",
            "profile": _read_profile(run_dir, "summary.json") if args.profile else None,
            "memory": _read_profile(run_dir, "memory_summary.json") if args.memory else None}


def _read_profile(run_dir: str, name: str) -> dict | None:
    path = os.path.join(run_dir, "profile", name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-1b.toml"))
    ap.add_argument("--rows", default="bf16,fq,rowwise")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=10, help="logged steps left out of the medians")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--baseline", default=None, help="the row ratios are taken against (default: the first row)")
    ap.add_argument("--sockets", action="store_true", help="NCCL over its socket transport (no NVLink, no shared memory)")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile this many steps after the warm-up and print where the time goes")
    ap.add_argument("--memory", type=int, default=0,
                    help="record the allocator over this step and print what is alive at its peak")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="keep each row's run directory (metrics.jsonl, profile traces) under DIR "
                         "instead of a temporary directory")
    args, args.extra = ap.parse_known_args()  # the rest: --section.key=value overrides for every row
    for name in args.rows.split(","):
        row_overrides(name)  # unknown rows fail before any run
    if args.keep:  # a row's metrics.jsonl is appended to, so an earlier run would mix into the medians
        taken = [d for d in (name.replace("+", "_") for name in args.rows.split(","))
                 if os.path.exists(os.path.join(args.keep, d))]
        if taken:
            sys.exit(f"--keep {args.keep}: already holds {taken} from an earlier call; give a new directory")
        os.makedirs(args.keep, exist_ok=True)
    with contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory() as workdir:
        data = os.path.join(workdir, "random")
        random_dataset(data, args.vocab, tokens=4096 * 2048)
        results = []
        for name in args.rows.split(","):
            results.append(run_row(name, args, data, workdir))
            print(json.dumps(results[-1]), flush=True)
    ref = args.baseline or results[0]["row"]
    base = next((r for r in results if r["row"] == ref and "error" not in r), None)
    print(f"\n| row | tokens/s | vs {ref} | MFU | peak GiB | vs {ref} | last loss | fallback | backend |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | {r['error']} |")
            continue
        speed = f"{r['tokens_per_sec'] / base['tokens_per_sec']:.2f}x" if base else "-"
        mem = f"{r['peak_mem_gib'] / base['peak_mem_gib']:.2f}x" if base and base["peak_mem_gib"] else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
        fb = f"{100 * r['fallback_ratio']:.2f}%" if r["fallback_ratio"] is not None else "-"
        print(f"| {r['row']} | {r['tokens_per_sec']:,.0f} | {speed} | {mfu} | {r['peak_mem_gib']:.1f} | {mem} "
              f"| {r['loss_last']:.3f} | {fb} | {r['backend']} |")
    if args.profile:
        from train.profiling import format_summary
        for r in results:
            if r.get("profile"):
                print(f"\n{r['row']}:\n{format_summary(r['profile'])}")
    if args.memory:
        from train.profiling import format_breakdown
        for r in results:
            if r.get("memory"):
                print(f"\n{r['row']}:\n{format_breakdown(r['memory'], args.memory)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
