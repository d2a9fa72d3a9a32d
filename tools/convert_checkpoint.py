"""Convert model weights between a DCP checkpoint, one consolidated file and a Hugging Face folder.

    python tools/convert_checkpoint.py outputs/checkpoints/step-00001000 model.safetensors
    python tools/convert_checkpoint.py outputs/checkpoints/step-00001000 model.pt
    python tools/convert_checkpoint.py outputs/checkpoints/step-00001000 hf-model/ --to hf
    python tools/convert_checkpoint.py hf-model/ model.safetensors        # and back

SRC: a step-N checkpoint folder, a .pt/.safetensors file written by this tool, or a Hugging Face
Llama folder (config.json + *.safetensors). DST: a .pt or .safetensors file (this model's
parameter names, FP32, with the model config inside), or with `--to hf` a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads. Runs in one process, no GPU.

A run starts from any of these with `--checkpoint.init_from=PATH` (weights only; the optimizer
starts fresh). Only the weights travel: optimizer state stays in the DCP checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # `python tools/convert_checkpoint.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import config as C  # noqa: E402
from train.checkpoint import CheckpointError, read_weights, write_hf, write_weights  # noqa: E402


def convert(src: str, dst: str, to: str | None = None, config: str | None = None) -> str:
    """Convert `src` to `dst`; `to` is torch | safetensors | hf (default: from dst's suffix).
    Returns the format written."""
    by_suffix = ("safetensors" if dst.endswith(".safetensors") else
                 "torch" if dst.endswith((".pt", ".pth")) else None)
    to = to or by_suffix
    if to is None or (to != "hf" and to != by_suffix):
        raise CheckpointError(f"destination '{dst}': name a .pt or .safetensors file, or pass --to hf "
                              f"for a Hugging Face folder")
    weights, model_cfg = read_weights(src)
    if config:
        model_cfg = C.load_config(config).model
    step = None
    if os.path.isfile(os.path.join(src, "train_state.json")):
        with open(os.path.join(src, "train_state.json"), encoding="utf-8") as f:
            step = json.load(f)["step"]
    if to == "hf":
        if model_cfg is None:
            raise CheckpointError(f"'{src}' records no model config; pass --config FILE.toml")
        write_hf(dst, weights, model_cfg)
    else:
        if os.path.dirname(dst):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        write_weights(dst, weights, model_cfg, step)
    return to


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="step-N checkpoint folder, .pt/.safetensors file, or Hugging Face folder")
    ap.add_argument("dst", help=".pt or .safetensors file, or a folder with --to hf")
    ap.add_argument("--to", choices=("torch", "safetensors", "hf"),
                    help="output format (default: from dst's suffix)")
    ap.add_argument("--config", help="TOML config for the model shape when src records none")
    args = ap.parse_args(argv)
    try:
        to = convert(args.src, args.dst, args.to, args.config)
    except (CheckpointError, C.ConfigError) as e:
        print(f"convert_checkpoint: error: {e}", file=sys.stderr)
        return 2
    print(f"convert_checkpoint: wrote {args.dst} ({to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
