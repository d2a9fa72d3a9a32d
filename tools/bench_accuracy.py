"""Accuracy of FQ training: the same model and data trained with BF16, FQ-INT8, INT8 without
fallback, and FQ + INT8 communication; validation loss curves and fallback ratios over training.

    # on the GPU machine (data from tools/debian_corpus.py, carried as .bin/.idx):
    python tools/bench_accuracy.py --config configs/llama-125m.toml --data data/debian/docs \\
        --steps 2000 --gpus 2 --out results/accuracy.json --train.global_batch_size=32
    # anywhere with matplotlib, from the JSON:
    python tools/bench_accuracy.py --plot results/accuracy.json --plot-dir docs/img
    # a run cut short (time limit): read what the rows' metrics.jsonl hold so far
    python tools/bench_accuracy.py --collect WORKDIR --out results/accuracy.json

--time-limit S stops every row S seconds after the start (SIGTERM: the trainer finishes its step,
saves, exits), so a run under a wall-clock budget still ends with comparable curves. The rows'
checkpoints go to --checkpoint-root (default: a temp dir), never into the workdir; the same
command again with the same --workdir and --checkpoint-root continues every row from where it
stopped (checkpoint.resume=auto), its metrics.jsonl growing, so a long comparison can span
several time-limited calls.

Rows: bf16 (fq off), fq (FQ-INT8, fallback on), nofallback (fq.fallback=none: block/row INT8
only), fq_swiglu8 (FQ with fq.swiglu_int8: SwiGLU saves gate and up as INT8), fq_budget5
(fallback capped near 5% of tiles per layer and GEMM), fq_int8comm (FQ + INT8
all-gather/reduce-scatter, FSDP over 2 processes). The one-GPU rows run side by side on `--gpus`
GPUs (CUDA_VISIBLE_DEVICES), the 2-process row after them; with --together every row starts at
once (several per GPU: small models leave the GPU idle while the host launches kernels, so the
rows' tokens/s are then not speed figures). A multi-process row keeps the global batch and lowers
train.micro_batch_size to global / processes where needed, so every row sees the same samples.
Each row is `python -m train` with the shared overrides; its metrics.jsonl is read back.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from train.config import load_config  # noqa: E402

ROWS = {
    "bf16": (1, ["--fq.enabled=false"]),
    "fq": (1, ["--fq.enabled=true"]),
    "nofallback": (1, ["--fq.enabled=true", "--fq.fallback=none"]),
    "fq_swiglu8": (1, ["--fq.enabled=true", "--fq.swiglu_int8=true"]),
    "fq_budget5": (1, ["--fq.enabled=true", "--fq.fallback=budget", "--fq.budget=0.05"]),
    "fq_int8comm": (2, ["--fq.enabled=true", "--parallel.all_gather_dtype=int8",
                        "--parallel.reduce_scatter_dtype=int8"]),
}


def command(name: str, args, run_dir: str, ckpt_dir: str = "") -> list[str]:
    nproc, row = ROWS[name]
    cli = ["--config", args.config, f"--data.path={args.data}", f"--train.steps={args.steps}",
           f"--checkpoint.dir={ckpt_dir}",
           f"--train.val_interval={args.val_interval}", f"--logging.interval={args.log_interval}",
           "--checkpoint.interval=0", "--logging.tensorboard=false", "--logging.progress_bar=false",
           f"--logging.dir={run_dir}", *row, *args.extra]
    if nproc == 1:
        return [sys.executable, "-m", "train", *cli]
    train = load_config(args.config, [o for o in args.extra if o.startswith("--")]).train
    per_rank = train.global_batch_size // nproc
    if train.micro_batch_size > per_rank:
        cli.append(f"--train.micro_batch_size={per_rank}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "train", *cli]


def read_row(name: str, run_dir: str, proc: subprocess.CompletedProcess | None) -> dict:
    """A row's curves from its metrics.jsonl; proc None: a run cut short, read as far as it got."""
    if proc is not None and proc.returncode != 0:
        print(f"{name}: exit {proc.returncode}\n{proc.stderr[-4000:]}", file=sys.stderr)
        return {"row": name, "error": f"exit {proc.returncode}"}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return {"row": name, "error": f"no {path}"}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.endswith("\n")]  # a cut run's last line may be partial
    train = [r for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    layers = sorted({k for r in train for k in r if k.startswith("fq/layers.") and k.endswith("fallback_ratio")})
    return {"row": name, "val": val, "final_val_loss": val[-1][1] if val else None,
            "train": [(r["step"], r["loss"]) for r in train],
            "fallback": [(r["step"], r.get("fallback_ratio")) for r in train],
            "layer_fallback": {k: [(r["step"], r[k]) for r in train if k in r] for k in layers},
            "tokens_per_sec": train[-1].get("tokens_per_sec") if train else None}


def run(args) -> list[dict]:
    names = args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    workdir = args.workdir or tempfile.mkdtemp(prefix="fq-accuracy-")
    os.makedirs(workdir, exist_ok=True)
    ckpt_root = args.checkpoint_root or tempfile.mkdtemp(prefix="fq-accuracy-ckpt-")
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    stopped = False
    results = {}
    single = [n for n in names if ROWS[n][0] == 1]
    if args.together:
        batches = [names]
    else:  # one-GPU rows side by side, one per GPU; multi-process rows after them, alone
        batches = [single[i:i + args.gpus] for i in range(0, len(single), args.gpus)] + \
            [[n] for n in names if ROWS[n][0] > 1]
    for batch in batches:
        if stopped:
            print(f"--time-limit: rows {batch} not run", flush=True)
            continue
        procs = {}
        singles = 0
        for name in batch:
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if ROWS[name][0] == 1 and args.gpus > 1:
                env["CUDA_VISIBLE_DEVICES"] = str(singles % args.gpus)
                singles += 1
            run_dir = os.path.join(workdir, name)
            log = open(os.path.join(workdir, f"{name}.log"), "a")
            cmd = command(name, args, run_dir, os.path.join(ckpt_root, name))
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True),
                           run_dir, log)
        for name, (p, run_dir, log) in procs.items():
            try:
                p.wait(timeout=None if deadline is None else max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                print(f"--time-limit: stopping the rows at {args.time_limit}s", flush=True)
                for q, _, _ in procs.values():  # torchrun passes SIGTERM on to its workers
                    if q.poll() is None:
                        q.send_signal(signal.SIGTERM)
                deadline, stopped = None, True
                p.wait()
            log.close()
            with open(log.name) as f:
                output = f.read()
            # torchrun exits non-zero when signalled even though its workers stopped cleanly: a row
            # stopped by --time-limit is read as far as it got (its log stays in the workdir).
            done = None if stopped else subprocess.CompletedProcess(p.args, p.returncode, "", output)
            results[name] = read_row(name, run_dir, done)
            r = results[name]
            print(json.dumps({k: r.get(k) for k in ("row", "final_val_loss", "tokens_per_sec", "error")}), flush=True)
    return [results[n] for n in names if n in results]


def collect(workdir: str, names: list[str]) -> list[dict]:
    return [read_row(n, os.path.join(workdir, n), None) for n in names
            if os.path.isdir(os.path.join(workdir, n))]


def report(results: list[dict]) -> None:
    """Validation loss at the last step every finished row reached (rows of a cut run end apart)."""
    done = [r for r in results if r.get("val")]
    step = min((r["val"][-1][0] for r in done), default=None)
    at = {r["row"]: dict(r["val"]).get(step) for r in done}
    base = at.get("bf16")
    print(f"\n| row | val loss at step {step} | vs bf16 | fallback at the end |")
    print("|---|---|---|---|")
    for r in results:
        if at.get(r["row"]) is None:
            print(f"| {r['row']} | {r.get('error', 'no validation')} | | |")
            continue
        loss = at[r["row"]]
        gap = f"{100 * (loss / base - 1):+.2f}%" if base else "-"
        fb = r["fallback"][-1][1] if r.get("fallback") else None
        print(f"| {r['row']} | {loss:.4f} | {gap} | {'-' if fb is None else f'{100 * fb:.1f}%'} |")


def plot(path: str, out_dir: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(path) as f:
        results = json.load(f)
    os.makedirs(out_dir, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        if r.get("val"):
            steps, losses = zip(*r["val"])
            ax.plot(steps, losses, marker="o", ms=3, label=r["row"])
    ax.set(xlabel="step", ylabel="validation loss", title="Validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "accuracy_val_loss.png"), dpi=120)
    fq = next((r for r in results if r["row"] == "fq" and r.get("layer_fallback")), None)
    if fq:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for key, series in sorted(fq["layer_fallback"].items()):
            if not series:
                continue
            steps, ratios = zip(*series)
            ax = axes[1] if "grad_fallback" in key else axes[0]
            ax.plot(steps, [100 * x for x in ratios], lw=0.8, alpha=0.7)
        axes[0].set(xlabel="step", ylabel="fallback tiles (%)", title="Forward X, per layer")
        axes[1].set(xlabel="step", title="Output gradient dY, per layer")
        for ax in axes:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "accuracy_fallback_per_layer.png"), dpi=120)
    print(f"plots in {out_dir}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "llama-125m.toml"))
    ap.add_argument("--data", help="prefix of the .bin/.idx dataset (its _val pair is the validation set)")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--val-interval", type=int, default=100)
    ap.add_argument("--log-interval", type=int, default=20)
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to run one-GPU rows side by side on")
    ap.add_argument("--together", action="store_true", help="start every row at once (see above)")
    ap.add_argument("--time-limit", type=float, default=0, help="stop all rows after this many seconds (0: none)")
    ap.add_argument("--workdir", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--checkpoint-root", default=None,
                    help="the rows' checkpoints (default: a temp dir); reuse it to continue stopped rows")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--plot", default=None, help="only draw the PNGs from this results JSON")
    ap.add_argument("--collect", default=None, help="only read back the rows' run directories in this workdir")
    ap.add_argument("--plot-dir", default=os.path.join(ROOT, "docs", "img"))
    args, args.extra = ap.parse_known_args()  # the rest: --section.key=value overrides for every row
    if args.plot:
        plot(args.plot, args.plot_dir)
        return
    if args.collect:
        results = collect(args.collect, args.rows.split(","))
    elif not args.data:
        ap.error("--data is required (a prepared .bin/.idx prefix)")
    else:
        results = run(args)
    report(results)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
