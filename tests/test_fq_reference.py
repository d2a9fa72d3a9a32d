"""FQ reference numerics: exact integer sums, bounds against float64, outliers, edge cases."""
import pytest
import torch

from fq import reference as R
from fq.config import FQConfig

THR = 12.0


def rel(y, ref):
    return ((y.double() - ref).norm() / ref.norm()).item()


def fq_forward(x, w, tile=64, fallback=True):
    xq = R.quantize_act(x, tile, THR, THR, fallback)
    wq, ws = R.quantize_rows(w)
    return R.gemm_a_fallback(xq, wq, ws, torch.float32), xq


def fq_backward(x, w, dy, tile=64):
    xq = R.quantize_act(x, tile, THR, THR, True, transposed=True)
    dyq = R.quantize_act(dy, tile, THR, THR, True)
    wq_t, ws_t = R.quantize_cols_t(w)
    dx = R.gemm_a_fallback(dyq, wq_t, ws_t, torch.float32)
    dyq_t, dys = R.quantize_cols_t(dy, row_mult=xq.scale_t)
    dw = R.gemm_wgrad(dyq_t, dys, xq.qt, torch.float32)
    return dx, dw


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="fq.tile"):
        FQConfig(tile=48)
    with pytest.raises(ValueError, match="fq.backend"):
        FQConfig(backend="cuda")
    with pytest.raises(ValueError, match="fq.budget"):
        FQConfig(budget=0.0)
    with pytest.raises(ValueError, match="fq.include"):
        FQConfig(include=("",))


def test_int_sums_exact():
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (67, 3000), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (45, 3000), generator=g, dtype=torch.int8)
    assert torch.equal(R.int_sums(a, b), (a.long() @ b.long().t()).to(torch.int32))


@pytest.mark.parametrize("m", [1, 127, 129, 3000])
def test_three_gemms_match_float64(m):
    g = torch.Generator().manual_seed(m)
    k, n = 129, 127
    x = torch.randn(m, k, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    dy = torch.randn(m, n, generator=g)
    y, _ = fq_forward(x, w)
    dx, dw = fq_backward(x, w, dy)
    xd, wd, dyd = x.double(), w.double(), dy.double()
    # Row-scaled INT8 on both operands: ~1% relative error for Gaussian data (BF16: ~0.3%).
    assert rel(y, xd @ wd.t()) < 0.02
    assert rel(dx, dyd @ wd) < 0.02
    assert rel(dw, dyd.t() @ xd) < 0.02


def glu_like(m=256, k=512, seed=0):
    """Gaussian activations with two channels at 1000x and one token at 100x (SwiGLU-like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    channels, token = [37, 300], 5
    x[:, channels] *= 1000.0
    x[token] *= 100.0
    return x, channels, token


def test_fallback_tiles_sit_exactly_on_outliers():
    # The two channel outliers flag their tile column in every tile row; the 100x token does
    # not fall back: its own row scale absorbs it.
    tile = 64
    x, channels, token = glu_like()
    xq = R.quantize_act(x, tile, THR, THR, True)
    expected = torch.zeros_like(xq.flags)
    expected[:, [c // tile for c in channels]] = True
    assert torch.equal(xq.flags, expected)
    assert int(xq.stats[R.STAT_FALLBACK]) == int(expected.sum())
    w = torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(1))
    y, _ = fq_forward(x, w)
    assert rel(y[token], x[token].double() @ w.double().t()) < 0.02


def test_spikes_are_relative_to_the_rows_median_tile():
    rowmax = torch.tensor([[1.0, 2.0, 30.0, 1.5],  # one tile 20x the median (1.5): a spike
                           [5.0, 100.0, 100.0, 100.0],  # median 100: the small tile is no spike
                           [0.0, 0.0, 3.0, 0.0],  # median 0: nothing to protect, no spike
                           [1.0, 1.0, float("inf"), 9.0]])  # NaN/Inf marks: handled by the caller
    expected = torch.tensor([[False, False, True, False],
                             [False, False, False, False],
                             [False, False, False, False],
                             [False, False, True, True]])
    assert torch.equal(R.spikes(rowmax, 8.0), expected)


def test_outlier_error_with_and_without_fallback():
    x, channels, token = glu_like()
    g = torch.Generator().manual_seed(3)
    w = torch.randn(192, x.shape[1], generator=g) * 0.05
    wd = w.double().t()
    ref = x.double() @ wd
    y_fb, xq = fq_forward(x, w, fallback=True)
    y_none, xq_none = fq_forward(x, w, fallback=False)
    err_bf16 = rel(x.bfloat16().double() @ w.bfloat16().double().t(), ref)
    # Activation side alone (exact weights): fallback tiles carry ~15 bits, so the outliers cost
    # nothing and the error is below BF16's; without fallback the ordinary channels behind the
    # outliers round to zero.
    err_act_fb = rel(R.dequantize(xq).double() @ wd, ref)
    err_act_none = rel(R.dequantize(xq_none).double() @ wd, ref)
    assert err_act_fb < err_bf16
    assert err_act_none > 20 * err_act_fb
    # The whole GEMM (INT8 weights too) stays at the INT8 level of outlier-free data (~4x BF16).
    clean = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    err_clean = rel(fq_forward(clean, w)[0], clean.double() @ wd)
    err_fb, err_none = rel(y_fb, ref), rel(y_none, ref)
    assert err_fb < 1.2 * err_clean
    assert err_fb < 6 * err_bf16
    assert err_none > 1.8 * err_fb
    assert int(xq_none.stats[R.STAT_CRUSHED]) == int(xq.flags.sum())
    x_hat = R.dequantize(xq)
    assert ((x_hat - x)[:, channels].norm() / x[:, channels].norm()).item() < 1e-4


def test_small_magnitudes_quantize_like_large_ones():
    # Scaling by a power of two is exact, so the quantized digits and the GEMM's relative error
    # must not change. Gradients are ~1e-6: rows whose tiles all fall back (tile row 0 here,
    # whose rows spike in different tile columns) once got scale 1 and tile multipliers ~1e-8,
    # and the (c1 - 1) tail lost every digit.
    x, _, _ = glu_like()
    for t in range(x.shape[1] // 64):
        x[t, 64 * t + 5] *= 1000.0
    w = torch.randn(96, x.shape[1], generator=torch.Generator().manual_seed(5))
    xq, xq_small = R.quantize_act(x, 64, THR, THR, True), R.quantize_act(x * 2.0**-20, 64, THR, THR, True)
    assert xq.flags[0].all()
    assert torch.equal(xq.q, xq_small.q) and torch.equal(xq.flags, xq_small.flags)
    assert torch.equal(R.dequantize(xq_small), R.dequantize(xq) * 2.0**-20)
    ref = x.double() @ w.double().t()
    err, err_small = rel(fq_forward(x, w)[0], ref), rel(fq_forward(x * 2.0**-20, w)[0], ref * 2.0**-20)
    assert err < 0.02 and abs(err_small - err) < 1e-3 * err


def test_fallback_never_worse_than_none_when_row_scales_spread():
    # Seen in v_proj gradients of a trained Llama: a token with ~0 gradient in its plain tiles
    # but not in a fallback tile. Unfloored, its z = x / s was ~1e9, c1 followed, and the other
    # rows' values in that tile rounded to zero in both digits (65% error vs 1.4% without fallback).
    g = torch.Generator().manual_seed(6)
    x = torch.randn(256, 256, generator=g)
    x[:, 130] *= 1000.0  # a channel outlier: tile column 1 falls back
    x[7, :128] *= 1e-9  # one token with ~0 in its plain tile
    w = torch.randn(64, 256, generator=g)
    ref = x.double() @ w.double().t()
    y_fb, xq = fq_forward(x, w, tile=128)
    assert xq.flags[0, 1]
    assert rel(y_fb, ref) <= rel(fq_forward(x, w, tile=128, fallback=False)[0], ref)


def test_weight_gradient_keeps_the_rows_fallback_protects():
    # dW = dY^T X contracts over X's rows. Tokens whose plain tiles are ~1000x below an outlier
    # tile (down_proj inputs in training) got fallback row scales ~1000x below their absmax;
    # folded into dY before its per-column quantization, their entries rounded away while their
    # X digits were large: dW error up to 13x the no-fallback error (docs/fq.md). X for dW is now
    # plain row-wise at the absmax scale, so fallback in forward cannot hurt the weight gradient.
    g = torch.Generator().manual_seed(8)
    m, k, n = 512, 256, 96
    x = torch.randn(m, k, generator=g)
    x[::4, 130] *= 10.0  # every 4th token: one outlier channel, its tile column falls back
    x[::4, :128] *= 1e-2  # and little elsewhere: its fallback row scale is ~1000x below absmax
    dy = torch.randn(m, n, generator=g)
    ref = dy.double().t() @ x.double()
    xq = R.quantize_act(x, 128, THR, THR, True, transposed=True)
    assert xq.flags[:, 1].all() and not xq.flags[:, 0].any()
    dq, ds = R.quantize_cols_t(dy, row_mult=xq.scale_t)
    err = rel(R.gemm_wgrad(dq, ds, xq.qt, torch.float32), ref)
    assert err < 0.05, err  # measured 3.1% (BF16 0.23%): plain row-wise X, as with fallback off
    # The folding this replaced (fallback row scales into dY, fallback digits in X): 35%.
    dq_old, ds_old = R.quantize_cols_t(dy, row_mult=xq.scale)
    old = (R._exact_matmul(dq_old, R.dequantize(xq).double() / xq.scale.double()[:, None]) * ds_old.double()[:, None])
    assert rel(old, ref) > 5 * err


def test_row_scale_floor_costs_little_below_spread():
    # The floor (absmax(row) / SPREAD) leaves rows alone while their outliers stay below SPREAD
    # times their plain values; beyond it, their plain tiles quantize more coarsely (docs/fq.md).
    def plain_tile_error(outlier):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 512, generator=g)
        x[:, [37, 300]] *= outlier
        plain = torch.ones(512, dtype=torch.bool)
        plain[0:64] = plain[256:320] = False  # the two tile columns that fall back
        xq = R.quantize_act(x, 64, THR, THR, True)
        assert xq.flags[:, [0, 4]].all() and not xq.flags[:, plain[::64]].any()
        return rel(R.dequantize(xq)[:, plain], x[:, plain].double())
    e100, e300, e10000 = plain_tile_error(100.0), plain_tile_error(300.0), plain_tile_error(10000.0)
    assert e300 == e100 < 0.01  # outlier / plain ratios stay below SPREAD: the floor never binds
    assert e10000 < 5 * e100, (e100, e10000)  # measured 3.8x at 10000x outliers


def test_all_zero_tiles_give_zero_without_nan():
    x = torch.zeros(130, 200)
    x[:64, :64] = torch.randn(64, 64)  # one live tile, the rest zero
    w = torch.randn(70, 200)
    y, xq = fq_forward(x, w)
    assert torch.isfinite(y).all()
    assert torch.equal(y[64:], torch.zeros_like(y[64:]))
    assert not xq.flags.any()
    dx, dw = fq_backward(torch.zeros(130, 200), w, torch.zeros(130, 70))
    assert torch.equal(dx, torch.zeros_like(dx)) and torch.equal(dw, torch.zeros_like(dw))


def test_nan_and_inf_propagate_and_are_counted():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 96, generator=g)
    w = torch.randn(40, 96, generator=g)
    x[3, 7] = float("nan")
    x[50, 90] = float("inf")
    x[70, 0:64] *= 1000.0  # an outlier tile in another row stays finite
    y, xq = fq_forward(x, w)
    bad = torch.zeros(100, dtype=torch.bool)
    bad[[3, 50]] = True
    assert torch.isnan(y[bad]).all()
    assert torch.isfinite(y[~bad]).all()
    assert int(xq.stats[R.STAT_NONFINITE]) == 2
    dy = torch.randn(100, 40, generator=g)
    dy[10, 5] = float("nan")
    dx, dw = fq_backward(torch.randn(100, 96, generator=g), w, dy)
    assert torch.isnan(dx[10]).all() and torch.isfinite(dx[torch.arange(100) != 10]).all()
    assert torch.isnan(dw[5]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_input_dtypes(dtype):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(96, 160, generator=g).to(dtype)
    w = (torch.randn(80, 160, generator=g) * 0.05).to(dtype)
    xq = R.quantize_act(x, 32, THR, THR, True)
    wq, ws = R.quantize_rows(w)
    y = R.gemm_a_fallback(xq, wq, ws, dtype)
    assert y.dtype == dtype
    assert rel(y, x.double() @ w.double().t()) < 0.02


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 64, generator=g)
    mean = torch.stack([R.dequantize(R.quantize_act(x, 64, THR, THR, True, seed=s)) for s in range(200)]).mean(0)
    nearest = R.dequantize(R.quantize_act(x, 64, THR, THR, True))
    step = R.quantize_act(x, 64, THR, THR, True).scale[:, None]
    # Averages of stochastic roundings approach x far closer than one step (nearest: ~step/3.5).
    assert ((mean - x).abs() / step).mean() < 0.06
    assert ((nearest - x).abs() / step).mean() > 0.2
