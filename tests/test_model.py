import torch

from train.config import ModelConfig, ffn_hidden
from train.model import Transformer, flops_per_token, num_params

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)


def test_shapes_and_dtype():
    torch.manual_seed(0)
    model = Transformer(CFG)
    logits = model(torch.randint(0, 97, (3, 17)))
    assert logits.shape == (3, 17, 97) and logits.dtype == torch.float32


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    model = Transformer(CFG)
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, b = model(x), model(y)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_gqa_matches_explicit_heads():
    # With n_kv_heads == n_heads the repeat is a no-op; with GQA the k/v projections are smaller.
    model = Transformer(CFG)
    assert model.layers[0].attention.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.layers[0].mlp.gate_up_proj.weight.shape == (2 * ffn_hidden(CFG), 64)


def test_tied_embeddings_share_storage():
    model = Transformer(ModelConfig(**{**CFG.__dict__, "tie_embeddings": True}))
    assert model.output.weight is model.tok_embeddings.weight


def test_depth_scaled_init():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**CFG.__dict__, "n_layers": 8, "dim": 256, "n_heads": 8, "n_kv_heads": 8}))
    q = model.layers[0].attention.qkv_proj.weight.std().item()
    o = model.layers[0].attention.o_proj.weight.std().item()
    assert abs(q - 0.02) < 0.002 and abs(o - 0.02 / 4) < 0.001


def test_too_long_sequence_is_refused():
    model = Transformer(CFG)
    try:
        model(torch.zeros(1, 33, dtype=torch.long))
    except ValueError as e:
        assert "max_seq_len" in str(e)
    else:
        raise AssertionError("no error")


def test_flops_count_every_matmul_weight():
    model = Transformer(CFG)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert flops_per_token(CFG, 10) == 6 * linear + 12 * CFG.n_layers * CFG.dim * 10
    assert num_params(model) == sum(p.numel() for p in model.parameters()) - 97 * 64
