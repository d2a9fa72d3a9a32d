"""Weak scaling of the trainer: tokens/s per GPU at 1, 2, 4, 8 processes, the per-GPU batch fixed.

    python tools/bench_scaling.py --config configs/llama-1b.toml --nprocs 1,2,4,8 \\
        --rows fq+bf16comm+compile,fq+compile --per-gpu-batch 8 --train.micro_batch_size=4 --out scaling.json
    NCCL over sockets: add --sockets.   Plot: --plot scaling.json,scaling_sockets.json --plot-dir docs/img

Each (row, N) is one tools/bench_train.py row run with --nproc N and train.global_batch_size =
per-GPU batch x N; efficiency is tokens/s per GPU at N over the same row's at 1 process.
Rows and suffixes as in bench_train (e.g. `fq` = FQ with INT8 comms, `fq+bf16comm` = FQ with
bf16 all-gather / fp32 reduce-scatter). The default rows are compiled, as the GPU configs run: a
row without +compile is eager, and eager FQ is bound by Python launches (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.bench_train import ROOT, random_dataset, row_overrides, run_row  # noqa: E402


def efficiency_table(results: list[dict]) -> str:
    lines = ["| row | processes | tokens/s | tokens/s per GPU | efficiency |", "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {r['nproc']} | {r['error']} | | |")
            continue
        one = next((x for x in results if x["row"] == r["row"] and x["nproc"] == 1 and "error" not in x), None)
        per_gpu = r["tokens_per_sec"] / r["nproc"]
        eff = f"{100 * per_gpu / one['tokens_per_sec']:.1f}%" if one else "-"
        lines.append(f"| {r['row']} | {r['nproc']} | {r['tokens_per_sec']:,.0f} | {per_gpu:,.0f} | {eff} |")
    return "\n".join(lines)


def plot(paths: str, out_dir: str) -> None:
    """One line per row and transport, from one or more results JSONs (comma-separated)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = []
    for path in paths.split(","):
        with open(path) as f:
            results += [r for r in json.load(f) if "error" not in r]
    label = lambda r: r["row"] + (" (sockets)" if r.get("sockets") else "")  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(label(r) for r in results):
        pts = sorted((r["nproc"], r["tokens_per_sec"] / r["nproc"]) for r in results if label(r) == name)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set(xlabel="GPUs", ylabel="tokens/s per GPU", title="Weak scaling", xscale="log", xticks=[1, 2, 4, 8])
    ax.set_xticklabels(["1", "2", "4", "8"])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(os.path.join(out_dir, "scaling.png"), dpi=120)
    print(f"plot in {out_dir}/scaling.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-1b.toml"))
    ap.add_argument("--rows", default="fq+bf16comm+compile,fq+compile")
    ap.add_argument("--nprocs", default="1,2,4,8")
    ap.add_argument("--per-gpu-batch", type=int, default=8, help="samples per GPU per step")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--sockets", action="store_true", help="NCCL over its socket transport")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="only draw the PNG from these results JSONs (comma-separated)")
    ap.add_argument("--plot-dir", default=os.path.join(ROOT, "docs", "img"))
    args, extra = ap.parse_known_args()
    if args.plot:
        plot(args.plot, args.plot_dir)
        return
    for name in args.rows.split(","):
        row_overrides(name)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        data = os.path.join(workdir, "random")
        random_dataset(data, args.vocab, tokens=4096 * 2048)
        for n in (int(x) for x in args.nprocs.split(",")):
            run_args = copy.copy(args)
            run_args.nproc, run_args.profile, run_args.memory = n, 0, 0
            run_args.extra = [*extra, f"--train.global_batch_size={args.per_gpu_batch * n}"]
            for name in args.rows.split(","):
                r = run_row(name, run_args, data, os.path.join(workdir, f"n{n}"))
                r["nproc"], r["sockets"] = n, args.sockets
                results.append(r)
                print(json.dumps({k: r.get(k) for k in ("row", "nproc", "tokens_per_sec", "error")}), flush=True)
                if args.out:  # after every point: a run cut short by a time limit keeps what it measured
                    with open(args.out, "w") as f:
                        json.dump(results, f, indent=1)
    print("\n" + efficiency_table(results))


if __name__ == "__main__":
    main()
