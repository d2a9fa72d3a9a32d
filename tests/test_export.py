"""tools/convert_checkpoint.py: DCP -> torch / safetensors / Hugging Face Llama and back, bitwise;
the HF model computes our logits (transformers, when installed); a run starts from an HF folder
with `checkpoint.init_from`; weights saved with q/k/v and gate/up apart load fused."""
import json
import os
import shutil

import pytest
import torch

from tests.test_resume import train
from tools.convert_checkpoint import convert, main
from train import config as C
from train.checkpoint import (MANIFEST, CheckpointError, Checkpointer, _file_record, check_weights, consolidate,
                              from_hf, has_split_projections, read_weights, split_projections, to_hf, write_hf)
from train.model import Transformer

pytest.importorskip("safetensors")


@pytest.fixture(scope="module")
def source(default_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    train(default_cache["cache"], tmp / "run", "--train.steps=2", "--checkpoint.interval=2",
          "--model.tie_embeddings=true", f"--checkpoint.dir={tmp / 'ck'}")
    path = str(tmp / "ck" / "step-00000002")
    return {"path": path, "weights": read_weights(path)[0], "cache": default_cache["cache"], "tmp": tmp}


def assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tied_embedding_is_stored_once(source):
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(source["path"]).read_metadata().state_dict_metadata
    assert "model.tok_embeddings.weight" in keys and "model.output.weight" not in keys
    assert "output.weight" not in consolidate(source["path"])
    assert source["weights"]["output.weight"] is source["weights"]["tok_embeddings.weight"]


def test_round_trips_are_bitwise(source, tmp_path):
    ref, src = source["weights"], source["path"]
    assert main([src, str(tmp_path / "m.pt")]) == 0
    convert(src, str(tmp_path / "m.safetensors"))
    convert(src, str(tmp_path / "hf"), to="hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "back.safetensors"))
    convert(str(tmp_path / "back.safetensors"), str(tmp_path / "back.pt"))
    for name in ("m.pt", "m.safetensors", "hf", "back.safetensors", "back.pt"):
        weights, cfg = read_weights(str(tmp_path / name))
        assert_equal(weights, ref)
        assert cfg.dim == 64 and cfg.n_layers == 2 and cfg.vocab_size == 2048, name
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_key_value_heads"] == 2
    assert torch.load(tmp_path / "m.pt", weights_only=True)["step"] == 2
    # Wrong destinations are refused with the fix named.
    assert main([src, str(tmp_path / "m.bin")]) == 2


def gqa_model(tie: bool = True) -> tuple[Transformer, C.ModelConfig]:
    cfg = C.ModelConfig(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=300, max_seq_len=64,
                        tie_embeddings=tie, rope_theta=500000.0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model, cfg


def test_tied_embeddings_round_trip_through_hf(tmp_path):
    model, cfg = gqa_model()
    weights = model.state_dict()
    hf, hf_config = to_hf(weights, cfg)
    assert "lm_head.weight" not in hf and hf_config["tie_word_embeddings"]
    back, cfg2 = from_hf(hf, hf_config)
    assert_equal(back, weights)
    assert cfg2.n_heads == 8 and cfg2.n_kv_heads == 2 and cfg2.rope_theta == 500000.0 and cfg2.tie_embeddings


def test_mismatched_weights_are_named():
    model, cfg = gqa_model()
    weights = dict(model.state_dict())
    weights["layers.0.mlp.gate_up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match="layers.0.mlp.gate_up_proj.weight"):
        check_weights(weights, model.state_dict(), "checkpoint.init_from='x'")
    del weights["norm.weight"]
    with pytest.raises(CheckpointError, match="norm.weight"):
        check_weights(weights, model.state_dict(), "checkpoint.init_from='x'")


def test_hf_layout_splits_q_k_v_and_gate_up():
    model, cfg = gqa_model()
    hf, _ = to_hf(model.state_dict(), cfg)
    fused = model.layers[1].attention.qkv_proj.weight
    q, k, v = (hf[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv")
    assert q.shape == (64, 64) and k.shape == v.shape == (16, 64)  # 8 query heads, 2 kv heads of 8
    assert torch.equal(v, fused[80:])  # v is not RoPE-permuted
    gate_up = model.layers[1].mlp.gate_up_proj.weight
    assert torch.equal(torch.cat([hf["model.layers.1.mlp.gate_proj.weight"],
                                  hf["model.layers.1.mlp.up_proj.weight"]]), gate_up)


def write_split_checkpoint(src: str, dst: str, cfg: C.ModelConfig) -> None:
    """A step folder as fqtrain wrote it before q/k/v and gate/up were fused (weights only)."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": split_projections(consolidate(src), cfg)}, checkpoint_id=dst)
    for name in ("config.toml", "train_state.json"):
        shutil.copy(os.path.join(src, name), dst)
    files = {n: _file_record(os.path.join(dst, n)) for n in sorted(os.listdir(dst))}
    with open(os.path.join(dst, MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"files": files, "world_size": 1}, f)


def test_weights_saved_apart_load_fused(source, tmp_path):
    cfg = read_weights(source["path"])[1]
    split = split_projections(source["weights"], cfg)
    assert "layers.0.attention.k_proj.weight" in split and "layers.0.mlp.up_proj.weight" in split
    torch.save(split, tmp_path / "old.pt")
    assert_equal(read_weights(str(tmp_path / "old.pt"))[0], source["weights"])
    old = str(tmp_path / "step-00000002")
    write_split_checkpoint(source["path"], old, cfg)
    assert has_split_projections(old) and not has_split_projections(source["path"])
    assert_equal(read_weights(old)[0], source["weights"])  # what checkpoint.init_from reads
    run = C.Config()
    run.model = cfg
    with pytest.raises(CheckpointError, match="separate weights.*checkpoint.init_from"):
        Checkpointer(run, str(tmp_path), rank=0, world_size=1).load(old, None, None, None)


def hf_logits(folder, tokens):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(tokens).logits


def test_transformers_computes_the_same_logits(source, tmp_path):
    pytest.importorskip("transformers")
    # The trained checkpoint (tied, GQA 4/2) and an untied GQA 8/2 model with another rope_theta.
    weights, cfg = read_weights(source["path"])
    ours = Transformer(cfg)
    ours.load_state_dict(weights)
    untied, untied_cfg = gqa_model(tie=False)
    for model, m, name in ((ours, cfg, "trained"), (untied, untied_cfg, "untied")):
        write_hf(str(tmp_path / name), model.state_dict(), m)
        tokens = torch.randint(0, m.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = model.eval()(tokens)
        got = hf_logits(tmp_path / name, tokens)
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (name, (got - want).abs().max())


@pytest.mark.slow
def test_init_from_hf_folder_starts_a_run_with_those_weights(source, tmp_path):
    convert(source["path"], str(tmp_path / "hf"), to="hf")
    # A learning rate so small that one step leaves the weights as loaded (to fp32 rounding).
    res = train(source["cache"], tmp_path / "run", "--train.steps=1", "--checkpoint.interval=1",
                "--optim.lr=1e-12", f"--checkpoint.init_from={tmp_path / 'hf'}",
                f"--checkpoint.dir={tmp_path / 'ck'}")
    assert f"weights from {tmp_path / 'hf'}" in res.stderr
    got = consolidate(str(tmp_path / "ck" / "step-00000001"))
    for k, v in source["weights"].items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-9), k
