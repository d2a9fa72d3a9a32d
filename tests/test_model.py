import torch

from train.config import ModelConfig, ffn_hidden
from train.model import RMSNorm, Transformer, apply_rope, flops_per_token, num_params, rope_tables

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


def test_projection_shapes_with_gqa():
    # GQA: 4 q heads and 2 k/v heads of 16, so the k/v rows of qkv_proj are half of q's.
    model = Transformer(CFG)
    assert model.layers[0].attention.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.layers[0].mlp.gate_up_proj.weight.shape == (2 * ffn_hidden(CFG), 64)


def test_gqa_attention_matches_explicitly_repeated_heads():
    # The model lets SDPA share k/v heads (enable_gqa); the reference repeats them per q head.
    torch.manual_seed(0)
    model = Transformer(CFG)
    attn, x = model.layers[0].attention, torch.randn(2, 11, 64, requires_grad=True)
    cos, sin = model.rope_cos, model.rope_sin

    def repeated(x):
        q, k, v = attn.qkv_proj(x).view(2, 11, -1, 16).split([4, 2, 2], dim=2)
        q, k, v = ((apply_rope(t, cos, sin) if i < 2 else t).transpose(1, 2) for i, t in enumerate((q, k, v)))
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return attn.o_proj(y.transpose(1, 2).reshape(2, 11, -1))

    out, ref = attn(x, cos, sin), repeated(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gr,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gr, rtol=1e-5, atol=1e-6)


def test_rmsnorm_in_bf16_is_float64_math_rounded_once():
    # bf16 activations and gain, as under FSDP's mixed precision: each output is float64's
    # x / rms(x) * g within half a bf16 step (rounding x / rms(x) first would exceed it), and the
    # gradients of x and g are float64's within bf16's precision.
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 3)
    x = (torch.randn(9, 64) * torch.logspace(-3, 3, 9)[:, None]).bfloat16().requires_grad_()
    y = norm(x)
    assert y.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    g64 = norm.weight.detach().bfloat16().double().requires_grad_()
    ref = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-5) * g64
    assert ((y.double() - ref).abs() <= ref.abs() * 2.0**-8 * 1.0001).all()
    dy = torch.randn(9, 64)
    y.backward(dy.bfloat16())
    ref.backward(dy.bfloat16().double())
    for got, want in ((x.grad, x64.grad), (norm.weight.grad, g64.grad)):
        assert ((got.double() - want).norm() / want.norm()) < 1e-2


def test_rope_rotates_each_pair_by_position_times_frequency():
    # (batch, seq, heads, head_dim): pair j of position p turns by p * theta^(-2j / head_dim),
    # the same for every head and batch row; as complex numbers, a product with e^(i angle).
    x = torch.randn(2, 7, 3, 8, dtype=torch.float64)
    cos, sin = rope_tables(8, 16, 10000.0)
    out = apply_rope(x, cos.double(), sin.double())
    inv = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    turn = torch.polar(torch.ones(7, 4, dtype=torch.float64), torch.arange(7.0, dtype=torch.float64)[:, None] * inv)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 7, 3, 4, 2)) * turn[:, None]).reshape(2, 7, 3, 8)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


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
