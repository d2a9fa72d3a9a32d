"""Look inside a trained model: activation outliers, weight spectral norms, and what
post-training quantization (PTQ) costs in validation loss.

    python tools/analyze_checkpoint.py outputs/checkpoints/step-00000200 --out report/
    python tools/analyze_checkpoint.py model.safetensors --data PREFIX --batches 16 --out report/

SRC: anything tools/convert_checkpoint.py reads (a step-N folder, a .pt/.safetensors file, a
Hugging Face Llama folder). Data: --data PREFIX, else the validation split of the checkpoint's
data.path, else of the embedded default corpus. Writes report.md, report.json and PNG plots
(matplotlib: `pip install matplotlib`, or --no-plots). One process, CPU or GPU.

Losses, all on the same token sample (docs/analysis.md):
- fp32: the model as trained, every Linear in full precision;
- w8: Linear weights of the blocks INT8 per output channel (activations full precision);
- w8a8: w8 plus each Linear's input INT8 per token (dynamic, symmetric);
- w4_g<G>: weights 4-bit symmetric in groups of G along the input dimension;
- fq: the training numerics (FQLinear, fallback tiles) in the forward pass, with the per-layer
  forward fallback ratio (the same `fq/<layer>/fallback_ratio` the trainer logs).
Embedding, LM head and norms stay full precision, as in training.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys

if __package__ in (None, ""):  # `python tools/analyze_checkpoint.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fq  # noqa: E402
from fq.config import FQConfig  # noqa: E402
from train import config as C  # noqa: E402
from train.checkpoint import CheckpointError, check_weights, read_weights  # noqa: E402
from train.data import DataError, IndexedDataset, SampleStream, resolve_val_prefix  # noqa: E402
from train.model import Transformer  # noqa: E402
from train.outliers import OutlierMonitor  # noqa: E402


class AnalysisError(RuntimeError):
    """The input cannot be analysed; the message says why and what to do."""


# ---- quantizers (symmetric, round to nearest; what comes back is dequantized) ----------------
def quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row (last dim): per output channel for a weight, per token for an input."""
    qmax = 2 ** (bits - 1) - 1
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / qmax
    return (x / scale).round().clamp(-qmax, qmax) * scale


def quantize_groups(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """One scale per `group` consecutive input features of each output row (the last group of a
    row may be shorter)."""
    n, k = w.shape
    pad = (-k) % group
    wp = F.pad(w, (0, pad)).view(n, -1, group)
    return quantize_rows(wp, bits).view(n, -1)[:, :k]


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("layers.")]


def ptq_copy(model: nn.Module, weight_fn, act_bits: int | None = None) -> nn.Module:
    """A copy whose block Linear weights went through `weight_fn`, inputs INT`act_bits` per token."""
    q = copy.deepcopy(model)
    with torch.no_grad():
        for _, lin in block_linears(q):
            lin.weight.copy_(weight_fn(lin.weight))
            if act_bits:
                lin.register_forward_pre_hook(lambda _m, args: (quantize_rows(args[0], act_bits), *args[1:]))
    return q


# ---- loading ------------------------------------------------------------------------------
def load_model(src: str, config: str | None = None) -> tuple[Transformer, C.Config | None]:
    """The FP32 model of `src`, and the run config next to it when there is one."""
    weights, model_cfg = read_weights(src)
    run_cfg = None
    if config:
        run_cfg = C.load_config(config)
        model_cfg = run_cfg.model
    elif os.path.isfile(os.path.join(src, "config.toml")):
        run_cfg = C.load_config(os.path.join(src, "config.toml"))
    if model_cfg is None:
        raise AnalysisError(f"'{src}' records no model config; pass --config FILE.toml")
    model = Transformer(model_cfg)
    check_weights(weights, model.state_dict(), f"'{src}'")
    model.load_state_dict({k: v.float() for k, v in weights.items()})
    return model.eval(), run_cfg


def data_prefix(arg: str | None, run_cfg: C.Config | None) -> str:
    if arg:
        return arg
    data = run_cfg.data if run_cfg else C.DataConfig()
    if data.path:
        return resolve_val_prefix(data.path, data.val_path) or data.path
    from train.default_data import ensure_default_dataset

    return ensure_default_dataset(data.default_vocab_size) + "_val"


def sample(prefix: str, seq_len: int, batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    stream = SampleStream(IndexedDataset(prefix), seq_len, seed)
    return [stream.batch(i * batch_size, batch_size) for i in range(batches)]


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> float:
    total = 0.0
    for tokens in batches:
        tokens = tokens.to(device)
        logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).item()
    return total / len(batches)


# ---- the analysis -------------------------------------------------------------------------
@torch.no_grad()
def analyze(model: Transformer, batches: list[torch.Tensor], fq_cfg: FQConfig | None = None,
            group: int = 128, device: str = "cpu") -> dict:
    """Everything the report shows, as plain numbers."""
    dev = torch.device(device)
    model = model.to(dev)
    monitor = OutlierMonitor(model)
    monitor.active = True
    losses = {"fp32": mean_loss(model, batches, dev)}
    activations = monitor.collect()
    monitor.remove()
    losses["w8"] = mean_loss(ptq_copy(model, lambda w: quantize_rows(w, 8)), batches, dev)
    losses["w8a8"] = mean_loss(ptq_copy(model, lambda w: quantize_rows(w, 8), act_bits=8), batches, dev)
    losses[f"w4_g{group}"] = mean_loss(ptq_copy(model, lambda w: quantize_groups(w, 4, group)), batches, dev)
    fallback = {}
    fq_cfg = fq_cfg or FQConfig()
    if fq_cfg.enabled:
        fq_model = fq.convert(copy.deepcopy(model), fq_cfg)
        fq.collect_stats(fq_model, reset=True)
        losses["fq"] = mean_loss(fq_model, batches, dev)
        fallback = {k: v for k, v in fq.collect_stats(fq_model, reset=True).items()
                    if k.endswith("/fallback_ratio") and not k.endswith("grad_fallback_ratio")}
    weights = {}
    for name, lin in [*block_linears(model), ("output", model.output)]:
        w = lin.weight.float()
        weights[name] = {"spectral_norm": torch.linalg.matrix_norm(w, ord=2).item(),
                         "absmax": w.abs().max().item(),
                         "w8_rel_error": ((quantize_rows(w, 8) - w).norm() / w.norm()).item()}
    return {"tokens": sum(b.shape[0] * (b.shape[1] - 1) for b in batches), "loss": losses,
            "activations": activations, "fq_fallback": fallback, "weights": weights}


def _site_rows(activations: dict) -> list[tuple[str, dict]]:
    sites: dict[str, dict] = {}
    for key, v in activations.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[2] in ("gt6", "gt6_features", "adaptive", "seq_share", "absmax"):
            sites.setdefault(parts[1], {})[parts[2]] = v
    return list(sites.items())


def markdown(result: dict, src: str, prefix: str, plots: list[str]) -> str:
    loss = result["loss"]
    fp = loss["fp32"]
    act = result["activations"]
    lines = [f"# Checkpoint analysis: `{src}`", "",
             f"Sample: {result['tokens']:,} tokens of `{prefix}`.", "",
             "## Post-training quantization", "",
             "| numerics | loss | vs fp32 |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.5f} | {v - fp:+.2e} |" for k, v in loss.items()]
    lines += ["", "w8: INT8 weights per output channel; w8a8: plus INT8 inputs per token; "
              "w4_gG: 4-bit weights in groups of G inputs; fq: FQ training numerics (forward).", "",
              "## Activation outliers", "",
              f"Elements with |x| > 6: {act['outliers/gt6']:.0f}; adaptive (|x - mean| > 4 std of "
              f"the token): {act['outliers/adaptive']:.0f}; sequences with a |x| > 6: "
              f"{100 * act['outliers/seq_share']:.1f}%; sites with one: "
              f"{100 * act['outliers/layer_share']:.1f}%.", "",
              "| site | > 6 | features > 6 | adaptive | seq share | absmax |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {name} | {s['gt6']:.0f} | {s['gt6_features']:.0f} | {s['adaptive']:.0f} | "
              f"{s['seq_share']:.3f} | {s['absmax']:.2f} |" for name, s in _site_rows(act)]
    gains = sorted({k.split("/")[1] for k in act if k.endswith("/gain_std")})
    lines += ["", "## RMSNorm gains", "", "| norm | max / median | std |", "|---|---:|---:|"]
    lines += [f"| {n} | {act[f'outliers/{n}/gain_max_over_median']:.2f} | {act[f'outliers/{n}/gain_std']:.4f} |"
              for n in gains]
    lines += ["", "## Weights", "", "| layer | spectral norm | absmax | INT8 rel. error | FQ fallback |",
              "|---|---:|---:|---:|---:|"]
    for name, w in result["weights"].items():
        fb = result["fq_fallback"].get(f"fq/{name}/fallback_ratio")
        lines.append(f"| {name} | {w['spectral_norm']:.3f} | {w['absmax']:.4f} | {w['w8_rel_error']:.2e} | "
                     f"{'' if fb is None else f'{100 * fb:.2f}%'} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(result: dict, out: str) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        raise AnalysisError("PNG plots need matplotlib: pip install matplotlib (or pip install -e '.[dev]'), "
                            "or pass --no-plots") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    rows = _site_rows(result["activations"])
    names = [n for n, _ in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(names)), 7), sharex=True)
    x = range(len(names))
    ax1.bar([i - 0.2 for i in x], [s["gt6"] for _, s in rows], 0.4, label="|x| > 6")
    ax1.bar([i + 0.2 for i in x], [s["adaptive"] for _, s in rows], 0.4, label="|x - mean| > 4 std (per token)")
    ax1.set_yscale("symlog")
    ax1.set_ylabel("outlier elements")
    ax1.legend()
    ax2.bar(list(x), [s["absmax"] for _, s in rows])
    ax2.set_ylabel("max |x|")
    ax2.set_xticks(list(x), names, rotation=90, fontsize=7)
    fig.tight_layout()
    files.append("activations.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    names = list(result["weights"])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(names)), 4))
    ax.bar(range(len(names)), [result["weights"][n]["spectral_norm"] for n in names])
    ax.set_ylabel("spectral norm")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    fig.tight_layout()
    files.append("spectral_norms.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)

    loss = result["loss"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(loss), [v - loss["fp32"] for v in loss.values()])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_ylabel("validation loss - fp32")
    fig.tight_layout()
    files.append("ptq.png")
    fig.savefig(os.path.join(out, files[-1]), dpi=100)
    plt.close(fig)
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="step-N checkpoint folder, .pt/.safetensors file, or Hugging Face folder")
    ap.add_argument("--out", default="analysis", help="folder for report.md, report.json and plots")
    ap.add_argument("--data", help="token data prefix (default: the checkpoint's validation data)")
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, help="default: the checkpoint's data.seq_len")
    ap.add_argument("--seed", type=int, default=0, help="which windows of the data to sample")
    ap.add_argument("--group-size", type=int, default=128, help="inputs per scale of the 4-bit weights")
    ap.add_argument("--config", help="TOML config for the model shape when src records none")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    args = ap.parse_args(argv)
    try:
        if args.batches < 1 or args.batch_size < 1 or args.group_size < 1:
            raise AnalysisError("--batches, --batch-size and --group-size must be >= 1")
        model, run_cfg = load_model(args.src, args.config)
        prefix = data_prefix(args.data, run_cfg)
        seq_len = min(args.seq_len or (run_cfg.data.seq_len if run_cfg else 128), model.cfg.max_seq_len)
        dataset = IndexedDataset(prefix)
        if dataset.vocab_size > model.cfg.vocab_size:
            raise AnalysisError(f"--data '{prefix}' has vocabulary {dataset.vocab_size}, the model "
                                f"{model.cfg.vocab_size}: use the data the model was trained on")
        batches = sample(prefix, seq_len, args.batches, args.batch_size, args.seed)
        result = analyze(model, batches, run_cfg.fq if run_cfg else None, args.group_size, args.device)
        os.makedirs(args.out, exist_ok=True)
        plots = [] if args.no_plots else plot(result, args.out)
    except (AnalysisError, CheckpointError, DataError, C.ConfigError) as e:
        print(f"analyze_checkpoint: error: {e}", file=sys.stderr)
        return 2
    result.update({"checkpoint": args.src, "data": prefix, "seq_len": seq_len})
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result, args.src, prefix, plots))
    loss = result["loss"]
    print("analyze_checkpoint: " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items())
          + f" -> {os.path.join(args.out, 'report.md')}")
    return 0 if all(math.isfinite(v) for v in loss.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
