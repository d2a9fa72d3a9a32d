"""fq.swiglu_int8: SwiGLU saving gate and up as INT8 groups; the quantizer against float64,
the exact forward, the backward's error, what is saved, and a run through the trainer."""
import math

import pytest
import torch
import torch.nn.functional as F

from fq.swiglu import GROUP, dequantize_groups, quantize_groups, swiglu
from tests.test_resume import losses
from tests.test_train import TINY, run_cli


def _groups(x):
    n = x.shape[-1]
    return F.pad(x, (0, -n % GROUP)).unflatten(-1, (-1, GROUP))


@pytest.mark.parametrize("n", [1, 127, 128, 129, 300, 1024])
def test_quantize_groups_error_is_half_a_step_per_group(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)
    x[2, : min(n, 5)] *= 1000.0  # an outlier token: only its own group loses resolution
    x[:, n // 2] *= 300.0        # an outlier channel
    x[4] = 0.0                   # an all-zero row
    q, s = quantize_groups(x.float())
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (7, math.ceil(n / GROUP))
    deq = dequantize_groups(q, s).double()
    half_step = _groups(x).abs().amax(-1, keepdim=True) / 254
    err = _groups(deq - x).abs()
    assert (err <= half_step * (1 + 1e-5) + 1e-30).all()
    assert (deq[4] == 0).all() and torch.isfinite(deq).all()
    if n >= 2 * GROUP:  # the outlier token's other groups keep their own, fine scale
        assert (err[2, 1:] <= _groups(x)[2, 1:].abs().amax(-1, keepdim=True) / 254 * (1 + 1e-5)).all()


def test_nonfinite_values_make_their_group_nonfinite_never_zero():
    x = torch.randn(3, 300)
    x[0, 5], x[1, 200], x[2, 299] = float("nan"), float("inf"), float("-inf")
    deq = dequantize_groups(*quantize_groups(x))
    bad = ~torch.isfinite(deq)
    assert bad[0, :128].all() and bad[1, 128:256].all() and bad[2, 256:].all()
    assert bad.sum() == 128 + 128 + 44  # the other groups are untouched
    assert torch.isfinite(deq[0, 128:]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_is_exact_and_backward_close_to_float64(dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(4, 33, 344, generator=g) * 2).to(dtype)
    up = torch.randn(4, 33, 344, generator=g).to(dtype)
    gate[1, 3, 17] = 40.0  # GLU-like spikes
    up[2, 5, :] *= 50.0
    dy = torch.randn(4, 33, 344, generator=g).to(dtype)

    def grads(fn, cast):
        a, b = (t.detach().to(cast).clone().requires_grad_() for t in (gate, up))
        y = fn(a, b)
        y.backward(dy.to(cast))
        return y, a.grad, b.grad

    y8, dg8, du8 = grads(lambda a, b: swiglu(a, b, int8=True), dtype)
    y, dg, du = grads(lambda a, b: F.silu(a) * b, dtype)
    _, dg64, du64 = grads(lambda a, b: F.silu(a) * b, torch.float64)
    assert torch.equal(y8, y) and dg8.dtype == dtype and du8.dtype == dtype

    def rel(a, ref):
        return ((a.double() - ref).norm() / ref.norm()).item()

    # INT8 groups: 0.7-0.9% of the gradient's norm here; BF16's own rounding is 0.25-0.3%.
    assert rel(dg8, dg64) < 1e-2 and rel(du8, du64) < 1e-2
    assert rel(dg8, dg64) > 1e-4  # the rounding does reach the backward: the test can fail
    if dtype == torch.bfloat16:
        assert rel(dg8, dg64) < 4 * rel(dg, dg64) + 1e-3


def test_saves_half_the_bytes_and_traces_without_graph_break():
    gate = torch.randn(64, 1024, requires_grad=True)
    up = torch.randn(64, 1024, requires_grad=True)

    def saved_bytes(int8):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            swiglu(gate.bfloat16(), up.bfloat16(), int8)
        return sum(t.numel() * t.element_size() for t in saved)

    plain, int8 = saved_bytes(False), saved_bytes(True)
    assert plain >= 2 * 64 * 1024 * 2  # gate and up in BF16 at least
    assert int8 == 2 * 64 * 1024 + 2 * 64 * 8 * 4  # INT8 digits and one FP32 scale per 128 values

    compiled = torch.compile(lambda a, b: swiglu(a, b, True), backend="aot_eager", fullgraph=True)
    a, b = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    compiled(a, b).sum().backward()
    a2, b2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    swiglu(a2, b2, True).sum().backward()
    assert torch.equal(a.grad, a2.grad) and torch.equal(b.grad, b2.grad)


def test_trainer_run_with_swiglu_int8_tracks_the_bf16_saved_run(default_cache, tmp_path):
    args = [*TINY, "--train.steps=20", "--logging.interval=1"]
    run_cli([*args, f"--logging.dir={tmp_path / 'plain'}"], default_cache["cache"])
    proc = run_cli([*args, "--fq.swiglu_int8=true", f"--logging.dir={tmp_path / 'int8'}"], default_cache["cache"])
    assert "fq.swiglu_int8: SwiGLU keeps gate and up for the backward as INT8" in proc.stderr
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "int8")
    assert len(a) == len(b) == 20 and a[1] == b[1]  # same forward: the first loss is exact
    assert a != b  # the backward differs, so the weights do
    assert max(abs(a[s] - b[s]) for s in a) < 0.02 * a[1]
