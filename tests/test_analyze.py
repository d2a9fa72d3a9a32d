"""tools/analyze_checkpoint.py: quantizers, PTQ losses of a model already on the INT8 grid, and
the report of a real (tiny) training checkpoint."""
import json
import os

import pytest
import torch

from tests.test_train import TINY, run_cli
from tools.analyze_checkpoint import main, quantize_groups, quantize_rows
from train.checkpoint import write_weights
from train.config import ModelConfig
from train.model import Transformer


def test_quantizers_keep_grid_values_and_bound_the_error():
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (8, 40)).float()
    q[:, 0] = 127  # every row reaches the grid's end, so its scale is exactly s
    w = q * 2.0 ** -9
    assert torch.equal(quantize_rows(w, 8), w)
    x = torch.randn(16, 300)
    err = (quantize_groups(x, 4, 128) - x).abs()
    # Half a step of each group's scale (absmax / 7); the last group (44 wide) has its own.
    for g in range(3):
        block = slice(128 * g, min(128 * (g + 1), 300))
        assert (err[:, block] <= x[:, block].abs().amax(1, keepdim=True) / 14 + 1e-6).all()
    assert quantize_groups(x, 4, 128).shape == x.shape


def grid_model(vocab: int) -> tuple[Transformer, ModelConfig]:
    """Block weights on the INT8 per-channel grid: integers with a 127 in every row, times a
    power-of-two scale (so absmax / 127 gives the scale back exactly)."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab)
    torch.manual_seed(1)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("layers.") and p.dim() == 2:
                q = (torch.randn_like(p) * 20).round().clamp(-127, 127)
                q[:, 0] = 127
                p.copy_(q * 2.0 ** -10)
    return model, cfg


def test_ptq_of_a_model_on_the_int8_grid_shows_no_w8_degradation(default_cache, tmp_path):
    model, cfg = grid_model(2048)
    path = str(tmp_path / "grid.pt")
    write_weights(path, model.state_dict(), cfg)
    out = tmp_path / "report"
    assert main([path, "--out", str(out), "--data", default_cache["prefix"] + "_val", "--batches", "2",
                 "--batch-size", "4", "--seq-len", "32", "--no-plots"]) == 0
    r = json.loads((out / "report.json").read_text())
    loss = r["loss"]
    assert set(loss) == {"fp32", "w8", "w8a8", "w4_g128", "fq"}
    assert loss["w8"] == loss["fp32"]  # exactly: the weights are already INT8 values
    assert all(w["w8_rel_error"] == 0.0 for n, w in r["weights"].items() if n.startswith("layers."))
    assert loss["w4_g128"] != loss["fp32"]  # 4 bits cannot hold these weights
    assert abs(loss["w8a8"] - loss["fp32"]) < 0.1 and abs(loss["fq"] - loss["fp32"]) < 0.1
    assert r["tokens"] == 2 * 4 * 32
    report = (out / "report.md").read_text()
    assert "| w8 | " in report and "layers.1.mlp_hidden" in report and "## Plots" not in report


def test_report_of_a_training_checkpoint(default_cache, tmp_path):
    ckpt = tmp_path / "ckpt"
    run_cli([*TINY, "--train.steps=4", "--logging.interval=2", "--train.val_interval=0",
             "--logging.tensorboard=false", f"--checkpoint.dir={ckpt}", "--checkpoint.interval=4",
             f"--logging.dir={tmp_path / 'run'}"], default_cache["cache"])
    out = tmp_path / "report"
    args = [str(ckpt / "step-00000004"), "--out", str(out), "--batches", "2", "--batch-size", "4"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        args.append("--no-plots")
    os.environ["FQTRAIN_CACHE"] = default_cache["cache"]
    assert main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["seq_len"] == 32 and r["data"].endswith("_val")  # from the checkpoint's config
    loss = r["loss"]
    assert abs(loss["w8"] - loss["fp32"]) < 0.02
    assert "fq/layers.0.mlp.down_proj/fallback_ratio" in r["fq_fallback"]
    assert r["weights"]["layers.0.attention.qkv_proj"]["spectral_norm"] > 0
    report = (out / "report.md").read_text()
    for section in ("Post-training quantization", "Activation outliers", "RMSNorm gains", "Weights"):
        assert f"## {section}" in report
    if "--no-plots" not in args:
        for png in ("activations.png", "spectral_norms.png", "ptq.png"):
            assert (out / png).stat().st_size > 1000 and f"]({png})" in report


def test_missing_model_config_is_a_clear_error(tmp_path, capsys):
    model, _ = grid_model(64)
    path = str(tmp_path / "bare.pt")
    torch.save(model.state_dict(), path)
    assert main([path, "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    assert "records no model config; pass --config FILE.toml" in capsys.readouterr().err
