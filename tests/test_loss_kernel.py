"""train/loss_kernel.py's Triton cross-entropy against its torch reference (train/loss.py).

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 on CPU."""
import pytest
import torch

pytest.importorskip("triton")

from train.loss import softmax_xent_torch  # noqa: E402
from train.loss_kernel import BLOCK, softmax_xent  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Tolerances per logits dtype: the gradient is written in that dtype, so about one of its ulps.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-7), torch.bfloat16: dict(rtol=8e-3, atol=1e-6),
       torch.float16: dict(rtol=1e-3, atol=1e-7)}


def _logits(n, v, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g) * scale
    x[:, v // 3] += 40.0  # an outlier column, as a frequent token's logit
    x[n // 2] *= 10.0  # a confident token: its softmax is near one-hot
    t = torch.randint(0, v, (n,), generator=g)
    return x.to(dtype).to(DEV), t.to(DEV)


def _both(x, t, grad):
    ref_loss, ref_g = softmax_xent_torch(x.clone(), t, grad)
    loss, g = softmax_xent(x.clone(), t, grad)
    return loss, g, ref_loss, ref_g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("v", [1, 127, BLOCK + 1, 3 * BLOCK - 5])
def test_matches_the_torch_reference(dtype, v):
    x, t = _logits(5, v, dtype, seed=v)
    loss, g, ref_loss, ref_g = _both(x, t, grad=True)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, **TOL[dtype])
    # Each row of softmax - one_hot sums to zero; -1 + p at the target.
    assert g.float().sum(1).abs().max() < 1e-2


def test_gradient_overwrites_the_logits_and_no_grad_leaves_them():
    x, t = _logits(3, 300, torch.float32, seed=1)
    kept = x.clone()
    loss, g = softmax_xent(x, t, grad=False)
    assert g is None and torch.equal(x, kept)
    loss2, g = softmax_xent(x, t, grad=True)
    assert g.data_ptr() == x.data_ptr() and torch.equal(loss, loss2)


def test_rows_with_a_stride_and_no_rows():
    x, t = _logits(4, 700, torch.float32, seed=2)
    wide = torch.zeros(4, 1000, device=DEV)
    wide[:, :700] = x
    loss, g = softmax_xent(wide[:, :700], t, grad=True)
    ref_loss, ref_g = softmax_xent_torch(x, t, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
    assert (wide[:, 700:] == 0).all()  # nothing written past the row
    empty, _ = softmax_xent(x[:0], t[:0], grad=True)
    assert empty.shape == (0,)


def test_non_finite_logits_and_bad_targets_give_nan_never_a_number():
    v = BLOCK + 100
    x, t = _logits(6, v, torch.float32, seed=3)
    x[0, 7] = float("nan")
    x[1, 9] = float("inf")
    x[2, :] = float("-inf")  # no finite logit at all
    x[3, :BLOCK] = float("-inf")  # a first block of -inf logits: probability 0, as in torch
    t[3] = BLOCK + 7
    t[4] = v  # out of the vocabulary
    t[5] = -1
    loss, g, ref_loss, ref_g = _both(x[:4], t[:4], grad=True)
    assert loss[:3].isnan().all() and g[:3].isnan().any(1).all()
    assert ref_loss[:3].isnan().all()
    torch.testing.assert_close(loss[3], ref_loss[3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g[3], ref_g[3], rtol=1e-5, atol=1e-7)
    bad, _ = softmax_xent(x[4:].clone(), t[4:], grad=True)
    assert bad.isnan().all()


def test_refuses_rows_that_are_not_contiguous():
    x, t = _logits(4, 10, torch.float32, seed=4)
    with pytest.raises(ValueError, match="contiguous"):
        softmax_xent(x.t(), t[:4].clamp(max=3), grad=False)
