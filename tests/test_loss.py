"""The chunked LM head + cross-entropy (train/loss.py) against F.cross_entropy on full logits."""
import pytest
import torch
import torch.nn.functional as F

from train.config import ModelConfig
from train.loss import linear_cross_entropy
from train.model import Transformer


def _inputs(dtype, n=(3, 41), dim=24, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*n, dim, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, dim, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, n, generator=g)
    return h, w, t


def _plain(h, w, t):
    return F.cross_entropy((h @ w.t()).float().flatten(0, -2), t.flatten())


def _grads(loss_fn, h, w, t, scale=0.25):
    h.grad = w.grad = None
    loss = loss_fn(h, w, t)
    (loss * scale).backward()  # as the trainer's 1/accumulation steps
    return loss.detach(), h.grad.clone(), w.grad.clone()


@pytest.mark.parametrize("chunk", [1, 7, 41, 123, 1000])
def test_fp32_matches_plain_loss_and_gradients(chunk):
    h, w, t = _inputs(torch.float32)
    ref = _grads(_plain, h, w, t)
    out = _grads(lambda *a: linear_cross_entropy(*a, chunk=chunk), h, w, t)
    for a, b in zip(out, ref):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA path of the FP32 weight-gradient sum"))])
def test_bf16_error_against_float64_is_that_of_the_plain_loss(device):
    h, w, t = _inputs(torch.bfloat16, n=(4, 64), dim=64, vocab=300)
    h, w, t = h.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_(), t.to(device)
    exact = _grads(_plain, *(x.detach().double().requires_grad_() for x in (h, w)), t)
    plain = _grads(_plain, h, w, t)
    chunked = _grads(lambda *a: linear_cross_entropy(*a, chunk=50), h, w, t)
    for p, c, e in zip(plain, chunked, exact):
        assert c.dtype == p.dtype
        err_p = ((p.double() - e).norm() / e.norm()).item()
        err_c = ((c.double() - e).norm() / e.norm()).item()
        # BF16 rounding of h, W and the gradients: ~2^-9 relative. The chunked weight gradient sums
        # its chunks in FP32, so it is no worse than one BF16 GEMM over all tokens.
        assert err_c <= max(2 * err_p, 1e-6) and err_c < 8e-3, (err_p, err_c)


def test_no_grad_gives_the_same_loss_without_gradients():
    h, w, t = _inputs(torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, chunk=10)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, _plain(h, w, t).detach(), rtol=1e-6, atol=0)


def test_no_full_logits_are_kept_for_the_backward():
    h, w, t = _inputs(torch.float32, n=(8, 256), dim=32, vocab=1000)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        linear_cross_entropy(h, w, t, chunk=64)
    assert sum(saved) == h.numel() + w.numel()  # the two gradients, nothing of size tokens x vocab
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        _plain(h, w, t)
    assert max(saved) >= 8 * 256 * 1000  # what the plain loss keeps, so the hook sees it


def test_non_finite_hidden_state_gives_non_finite_loss_and_gradients():
    h, w, t = _inputs(torch.float32)
    with torch.no_grad():
        h[1, 5, 3] = float("nan")
    loss, gh, gw = _grads(lambda *a: linear_cross_entropy(*a, chunk=16), h, w, t)
    assert loss.isnan() and gh.isnan().any() and gw.isnan().any()


def test_cuda_without_triton_says_the_loss_runs_in_torch(monkeypatch, caplog):
    import sys

    import train
    from train import loss
    monkeypatch.setitem(sys.modules, "train.loss_kernel", None)  # the import now fails
    monkeypatch.delattr(train, "loss_kernel", raising=False)
    loss._kernel.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="fqtrain.loss"):
            assert loss._kernel() is None
    finally:
        loss._kernel.cache_clear()
    assert "loss runs in torch" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel runs on CUDA tensors")
def test_cuda_runs_the_triton_kernel():
    from train import loss, loss_kernel
    assert loss._kernel() is loss_kernel.softmax_xent


def test_mismatched_targets_are_refused():
    h, w, t = _inputs(torch.float32)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, t[:, :-1])


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_matches_cross_entropy_of_its_logits(tie):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32,
                      tie_embeddings=tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = torch.randint(0, 97, (3, 20))
    logits = model(tokens[:, :-1])
    ref = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_bench_loss_runs_on_cpu():
    import pathlib
    import subprocess
    import sys
    tool = pathlib.Path(__file__).resolve().parents[1] / "tools" / "bench_loss.py"
    out = subprocess.run([sys.executable, str(tool), "--tokens", "64", "--dim", "16", "--vocab", "300",
                          "--iters", "1", "--device", "cpu"], capture_output=True, text=True, check=True).stdout
    assert "| 64 | plain |" in out and "(default) |" in out
