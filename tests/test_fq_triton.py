"""Triton kernels vs the reference: identical flags, digits, scales and INT32 sums; same GEMMs.

Runs on the GPU when there is one, else under TRITON_INTERPRET=1 on CPU (small grids)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")

from fq import FQConfig, FQLinear, collect_stats  # noqa: E402
from fq import reference as R  # noqa: E402
from fq import triton_kernels as T  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
THR = 12.0


def rand(*shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEV)


def with_outliers(m, k, seed):
    x = rand(m, k, seed=seed)
    x[:, 3] *= 1000.0
    x[m // 2] *= 100.0
    return x


def tile_mask(flags, tile, m, k):
    return flags.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:m, :k]


def same(a, b):
    """Equal, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def assert_same_quant(a, b, m, k):
    assert torch.equal(a.flags, b.flags.bool())  # the Triton path keeps them as int8 0/1
    assert torch.equal(a.q, b.q)
    assert same(a.scale, b.scale)
    assert torch.equal(a.c1, b.c1) and torch.equal(a.c2, b.c2)
    fl = tile_mask(a.flags, a.tile, m, k)
    assert torch.equal(a.q2[fl], b.q2[fl])
    assert torch.equal(a.stats, b.stats)
    if b.count is None:  # fallback off: no lists, and the GEMM launches no tail
        assert not a.flags.any()
    else:
        count, order = R.fallback_lists(a.flags)
        assert torch.equal(count, b.count)
        for row, n in enumerate(count.tolist()):  # the GEMM reads each list up to its count
            assert torch.equal(order[row, :n], b.order[row, :n])
    if a.qt is not None:
        assert torch.equal(a.qt, b.qt)
        assert same(a.scale_t, b.scale_t)


@pytest.mark.parametrize("tile,m,k", [(32, 70, 100), (64, 130, 200), (128, 129, 150)])
def test_quantize_matches_reference_bitwise(tile, m, k):
    x = with_outliers(m, k, seed=tile)
    for fallback in (True, False):
        a = R.quantize_act(x, tile, THR, THR, fallback, transposed=True)
        b = T.quantize_act(x, tile, THR, THR, fallback, transposed=True)
        assert_same_quant(a, b, m, k)
        assert (b.count is None) == (not fallback)
    assert a.flags.any() or not fallback


def test_rows_without_plain_tiles_match_reference_at_gradient_scale():
    # Tile row 1 falls back entirely (its rows spike in different tile columns): its rows'
    # scales come from the floor, absmax / SPREAD.
    x = with_outliers(70, 128, seed=7)
    for t in range(4):
        x[32 + t, 32 * t + 9] *= 3000.0
    x = x * 2.0**-20
    a = R.quantize_act(x, 32, THR, THR, True, transposed=True)
    b = T.quantize_act(x, 32, THR, THR, True, transposed=True)
    assert a.flags[1].all()
    assert_same_quant(a, b, 70, 128)
    assert torch.equal(R.dequantize(a), R.dequantize(R.quantize_act(x * 2.0**20, 32, THR, THR, True)) * 2.0**-20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_dtypes_and_columns(dtype):
    x = with_outliers(96, 80, seed=1).to(dtype)
    assert_same_quant(R.quantize_act(x, 32, THR, THR, True), T.quantize_act(x, 32, THR, THR, True), 96, 80)
    w = rand(70, 96, seed=2).to(dtype)
    mult = rand(70, seed=3).abs()
    for rm in (None, mult):
        qa, sa = R.quantize_cols_t(w, rm)
        qb, sb = T.quantize_cols_t(w, rm)
        assert torch.equal(qa, qb) and torch.equal(sa, sb)
    qa, sa = R.quantize_rows(w)
    qb, sb = T.quantize_rows(w)
    assert torch.equal(qa, qb) and torch.equal(sa, sb)


@pytest.mark.parametrize("m,k", [(1, 300), (129, 33), (200, 1), (70, 96)])
def test_weight_quantization_of_odd_shapes_with_zero_nan_and_inf_lines(m, k):
    w = rand(m, k, seed=m + k)
    w[:, 0] = 0.0  # an all-zero column: scale 1, digits 0
    w[0, :] = 0.0
    if m > 2 and k > 2:
        w[1, 2] = float("nan")  # NaN scale for that row and column, the rest of them zero digits
        w[2, 1] = float("inf")
        w[m - 1, k - 1] = -1e4  # a large value: the only +-127 in its row and column
    mult = rand(m, seed=5).abs()
    for x in (w, w.t().contiguous().t()):  # row-major, and a column-major view
        for rm in (None, mult):
            qa, sa = R.quantize_cols_t(x, rm)
            qb, sb = T.quantize_cols_t(x, rm)
            assert torch.equal(qa, qb) and same(sa, sb)
        qa, sa = R.quantize_rows(x)
        qb, sb = T.quantize_rows(x)
        assert torch.equal(qa, qb) and same(sa, sb)
        qa, sa = R.quantize_rows_t(x)
        qb, sb = T.quantize_rows_t(x)
        assert qb.shape == (k, m) and torch.equal(qa, qb) and same(sa, sb)
    qs, _ = T.quantize_cols_t(w, mult, seed=3)  # stochastic: within one step of the nearest digits
    assert (qs.int() - R.quantize_cols_t(w, mult)[0].int()).abs().max() <= 1


@pytest.mark.parametrize("tile,m,n", [(32, 70, 100), (64, 130, 200), (128, 129, 150)])
def test_grad_quantization_reads_once_and_matches_reference(tile, m, n):
    """quantize_grad: dY's rows (fallback tiles) and its columns times X's row scales, from one
    pass, as quantize_act plus quantize_cols_t; stochastic digits as the unfused kernels."""
    dy = with_outliers(m, n, seed=tile + 1)
    dy[5, n - 1], dy[7, 2] = float("nan"), float("inf")
    mult = rand(m, seed=tile + 2).abs() + 0.1
    mult[9] = 0.0
    a, qa, sa = R.quantize_grad(dy, tile, THR, THR, True, mult)
    b, qb, sb = T.quantize_grad(dy, tile, THR, THR, True, mult)
    assert_same_quant(a, b, m, n)
    assert torch.equal(qa, qb) and same(sa, sb)
    c, qc, sc = T.quantize_grad(dy, tile, THR, THR, True, mult, seed=11, seed_t=12)
    d = T.quantize_act(dy, tile, THR, THR, True, seed=11)
    qd, sd = T.quantize_cols_t(dy, mult, seed=12)
    assert torch.equal(c.q, d.q) and torch.equal(qc, qd) and same(sc, sd)
    assert not torch.equal(qc, qb)  # stochastic digits differ from nearest ones somewhere


def test_grad_column_scales_over_many_tile_rows():
    """The scales kernel reduces the column maxima 128 tile rows at a time: 131 tile rows here."""
    m, n = 32 * 130 + 5, 32
    dy = with_outliers(m, n, seed=41)
    dy[4100, 3] = float("inf")  # in the last step of the reduction
    mult = rand(m, seed=42).abs() + 0.1
    a, qa, sa = R.quantize_grad(dy, 32, THR, THR, True, mult)
    b, qb, sb = T.quantize_grad(dy, 32, THR, THR, True, mult)
    assert_same_quant(a, b, m, n)
    assert torch.equal(qa, qb) and same(sa, sb) and sa[3].isnan()


def test_int32_sums_bitwise():
    g = torch.Generator().manual_seed(4)
    a = torch.randint(-127, 128, (70, 300), generator=g, dtype=torch.int8).to(DEV)
    b = torch.randint(-127, 128, (65, 300), generator=g, dtype=torch.int8).to(DEV)
    assert torch.equal(T.int_sums(a, b), R.int_sums(a, b))


# Aligned for TMA, with edges inside every block dimension (interpreter blocks 32, GPU 128 x 256 x 128).
TMA_SHAPES = [(100, 80, 72), (300, 272, 264)] if DEV == "cuda" else [(100, 80, 72)]


@pytest.mark.parametrize("m,k,n", TMA_SHAPES)
def test_tma_and_pointer_gemm_kernels_agree_bitwise(m, k, n):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEV)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    a[:, -1] = 127  # the last column, in the block the copy engine pads with zeros
    b[:, -1] = -127
    assert T._tma_unfit(a, b, torch.empty(m, n, device=DEV)) is None
    assert torch.equal(T.int_sums(a, b, kernel="tma"), R.int_sums(a, b))
    assert torch.equal(T.int_sums(a, b, kernel="pointer"), R.int_sums(a, b))
    sa, sb = rand(m, seed=1).abs(), rand(n, seed=2).abs()
    for dtype in (torch.float32, torch.bfloat16):
        for scale_b in (sb, None):
            tma = T._gemm(a, b, sa, scale_b, dtype, kernel="tma")
            ptr = T._gemm(a, b, sa, scale_b, dtype, kernel="pointer")
            assert tma.dtype == dtype and torch.equal(tma, ptr), (dtype, scale_b is None)


def hopper():
    return DEV == "cuda" and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(not hopper(), reason="the Gluon GEMM runs on Hopper only")
@pytest.mark.parametrize("m,k,n,programs", [(300, 272, 264, 132), (1000, 384, 520, 3), (1000, 384, 520, 4),
                                            (129, 2064, 1032, 1), (4096, 1024, 2048, 132)])
def test_gluon_gemm_matches_tma_kernel_bitwise(m, k, n, programs):
    """Few programs walk many 128 x 128 blocks each (odd and even counts, so both consumers and
    their hand-over run many rounds); edges in M, N and K; NaN and Inf scales; 16-bit C."""
    from fq import gluon_gemm
    g = torch.Generator().manual_seed(m + programs)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEV)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    a[:, -1] = 127
    b[-1, :] = -127
    sa, sb = rand(m, seed=1).abs() / 100, rand(n, seed=2).abs() / 100
    sa[5], sa[-1], sb[3] = float("nan"), float("inf"), 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for scale_b in (sb, None):
            want = T._gemm(a, b, sa, scale_b, dtype, kernel="tma")
            c = torch.full((m, n), 7.0, dtype=dtype, device=DEV)  # every element must be written
            got = gluon_gemm.gemm(a, b, sa, scale_b, c, programs)
            assert same(got.float(), want.float()), (dtype, scale_b is None)
            assert same(T._gemm(a, b, sa, scale_b, dtype).float(), want.float())  # the default choice
            assert same(T._gemm(a, b, sa, scale_b, dtype, kernel="gluon").float(), want.float())
    assert gluon_gemm.unfit(a, b, torch.empty(m, n, device=DEV)) is not None  # float32 C: the TMA kernel
    with pytest.raises(ValueError, match="gluon kernel cannot run"):
        T._gemm(a, b, sa, sb, torch.float32, kernel="gluon")


def test_gemm_kernel_choice_is_logged_once(caplog):
    a = torch.zeros(64, 100, dtype=torch.int8, device=DEV)  # 100-byte rows: no TMA
    b = torch.zeros(32, 100, dtype=torch.int8, device=DEV)
    why = T._tma_unfit(a, b)
    assert why is not None and "16-byte" in why
    assert T._tma_unfit(a[:, :96].contiguous(), b[:, :96].contiguous()) is None
    base = torch.zeros(64, 96, dtype=torch.int8, device=DEV)
    assert T._tma_unfit(base[1:]) is None and T._tma_unfit(base[:, 8:]) is not None  # rows start 96 / 8 B in
    with pytest.raises(ValueError, match="tma kernel cannot run"):
        T._gemm(a, b, torch.ones(64, device=DEV), None, torch.float32, kernel="tma")
    T._NOTED.discard(("pointer", why))
    with caplog.at_level("INFO", logger="fqtrain.fq"):
        for _ in range(2):
            T.int_sums(a, b)
    assert sum("pointer-based kernel" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("tile,m,k,n", [(32, 100, 96, 70), (64, 129, 200, 65), (128, 150, 260, 140),
                                        (32, 96, 64, 48)])  # the last: every GEMM on the TMA kernel
def test_three_gemms_match_reference(tile, m, k, n):
    x = with_outliers(m, k, seed=5)
    w = rand(n, k, seed=6, scale=0.05)
    dy = rand(m, n, seed=7)
    dy[:, 1] *= 500.0
    xq = T.quantize_act(x, tile, THR, THR, True, transposed=True)
    wq, ws = T.quantize_rows(w)
    assert xq.flags.any()
    y_ref = R.gemm_a_fallback(xq, wq, ws, torch.float32)
    y = T.gemm_a_fallback(xq, wq, ws, torch.float32)
    assert ((y - y_ref).norm() / y_ref.norm()) < 1e-6
    dyq = T.quantize_act(dy, tile, THR, THR, True)
    wq_t, ws_t = T.quantize_cols_t(w)
    dx_ref = R.gemm_a_fallback(dyq, wq_t, ws_t, torch.float32)
    dx = T.gemm_a_fallback(dyq, wq_t, ws_t, torch.float32)
    assert ((dx - dx_ref).norm() / dx_ref.norm()) < 1e-6
    dq_t, ds = T.quantize_cols_t(dy, row_mult=xq.scale_t)
    dw_ref = R.gemm_wgrad(dq_t, ds, xq.qt, torch.float32)
    dw = T.gemm_wgrad(dq_t, ds, xq.qt, torch.float32)
    assert ((dw - dw_ref).norm() / dw_ref.norm()) < 1e-6


@pytest.mark.parametrize("m", [1, 127, 3000])
def test_odd_row_counts(m):
    x = rand(m, 129, seed=m)
    x[:, 100] *= 500.0
    w = rand(127, 129, seed=15, scale=0.05)
    a = R.quantize_act(x, 64, THR, THR, True, transposed=True)
    b = T.quantize_act(x, 64, THR, THR, True, transposed=True)
    assert_same_quant(a, b, m, 129)
    wq, ws = T.quantize_rows(w)
    assert torch.equal(T.int_sums(b.q, wq), R.int_sums(a.q, wq))
    y_ref = R.gemm_a_fallback(a, wq, ws, torch.float32)
    assert ((T.gemm_a_fallback(b, wq, ws, torch.float32) - y_ref).norm() / y_ref.norm()) < 1e-6


def test_single_fallback_tile_skips_other_blocks():
    x = rand(200, 160, seed=12)
    x[70, 40] = 3000.0  # one fallback tile, (1, 1) at tile 64: other row/column blocks skip the tail
    w = rand(90, 160, seed=13, scale=0.05)
    dy = rand(200, 90, seed=14)
    xq = T.quantize_act(x, 64, THR, THR, True, transposed=True)
    assert int(xq.flags.sum()) == 1 and bool(xq.flags[1, 0])
    wq, ws = T.quantize_rows(w)
    y_ref = R.gemm_a_fallback(xq, wq, ws, torch.float32)
    assert ((T.gemm_a_fallback(xq, wq, ws, torch.float32) - y_ref).norm() / y_ref.norm()) < 1e-6
    dq_t, ds = T.quantize_cols_t(dy, row_mult=xq.scale_t)
    dw_ref = R.gemm_wgrad(dq_t, ds, xq.qt, torch.float32)
    assert ((T.gemm_wgrad(dq_t, ds, xq.qt, torch.float32) - dw_ref).norm() / dw_ref.norm()) < 1e-6


def test_nonfinite_and_zero_inputs():
    x = rand(70, 64, seed=8)
    x[5, 3] = float("nan")
    x[40, 60] = float("-inf")
    x[64:] = 0.0
    w = rand(33, 64, seed=9)
    a, b = R.quantize_act(x, 32, THR, THR, True), T.quantize_act(x, 32, THR, THR, True)
    assert torch.equal(a.stats, b.stats) and int(b.stats[R.STAT_NONFINITE]) == 2
    assert torch.equal(a.q, b.q) and torch.equal(a.scale.isnan(), b.scale.isnan())
    wq, ws = T.quantize_rows(w)
    y = T.gemm_a_fallback(b, wq, ws, torch.float32)
    bad = torch.zeros(70, dtype=torch.bool, device=DEV)
    bad[[5, 40]] = True
    assert torch.isnan(y[bad]).all() and torch.isfinite(y[~bad]).all()
    assert torch.equal(y[64:], torch.zeros_like(y[64:]))


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("tile,m,n", [(32, 70, 96), (64, 130, 192), (128, 129, 384)])
def test_swiglu_grad_gives_dy_and_the_statistics_of_the_stats_kernel(tile, m, n, int8):
    """The fused SwiGLU backward: dY = [dgate | dup] as fq.swiglu computes it (to a bf16 rounding),
    and statistics from which quantize_grad gives exactly what its own stats pass gives, counts
    included."""
    from fq.swiglu import swiglu_backward, swiglu_forward
    y = (rand(m, 2 * n, seed=tile + 3, scale=2.0)).to(torch.bfloat16)
    dh = with_outliers(m, n, seed=tile + 4).to(torch.bfloat16)
    dh[5, n - 1], dh[7, 2] = float("nan"), float("inf")
    mult = rand(m, seed=tile + 5).abs() + 0.1
    _, saved, scale = swiglu_forward(y, int8)
    want = swiglu_backward(dh, saved, scale, int8)
    counts = torch.zeros(R.NUM_STATS, dtype=torch.int64, device=DEV)
    dy, pre = T.swiglu_grad(dh, saved, scale, int8, mult, tile, counts)
    assert dy.dtype == torch.bfloat16 and dy.isnan().any()
    torch.testing.assert_close(dy.float(), want.float(), rtol=2**-7, atol=1e-30, equal_nan=True)
    assert int(counts[R.STAT_NONFINITE]) > 0
    a, qa, sa = T.quantize_grad(dy, tile, THR, THR, True, mult, stats=counts, pre=pre)
    b, qb, sb = T.quantize_grad(dy, tile, THR, THR, True, mult)
    a.flags = a.flags.bool()  # compared as the reference's
    assert_same_quant(a, b, m, 2 * n)
    assert torch.equal(qa, qb) and same(sa, sb)
    assert a.flags.any()
    alone, none = T.swiglu_grad(dh, saved, scale, int8, None, tile, counts)  # no statistics asked for
    assert none is None and same(alone.float(), dy.float())


def test_swiglu_grad_of_a_width_off_the_tile_runs_in_torch_and_says_so(caplog):
    from fq.swiglu import swiglu_backward, swiglu_forward
    y, dh = rand(40, 96, seed=30), rand(40, 48, seed=31)
    _, saved, scale = swiglu_forward(y, False)
    counts = torch.zeros(R.NUM_STATS, dtype=torch.int64, device=DEV)
    with caplog.at_level("INFO", logger="fqtrain.fq"):
        dy, pre = T.swiglu_grad(dh, saved, scale, False, rand(40, seed=32).abs(), 32, counts)
    assert pre is None and torch.equal(dy, swiglu_backward(dh, saved, scale, False))
    assert "not a multiple of fq.tile=32" in caplog.text


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("tile,m,n", [(32, 70, 128), (64, 130, 256), (128, 129, 384)])
def test_swiglu_gives_h_the_saved_pair_and_the_statistics_of_the_stats_kernel(tile, m, n, int8):
    """The SwiGLU forward kernel: h = silu(gate) * up in float32, rounded once to bf16 (as inductor
    computes it; eager torch rounds silu first), what fq.swiglu.swiglu_forward keeps for the
    backward (INT8: scales to a float32 rounding, NaN where a NaN sits, digits within one step),
    and statistics from which the next layer's quantize_act gives exactly what its own stats pass
    gives, counts included."""
    from fq.swiglu import swiglu_forward
    y = with_outliers(m, 2 * n, seed=tile + 6).to(torch.bfloat16)
    y[:, 3], y[:, n + 3] = y[:, 3].abs(), 1.0  # gate's outlier channel, large in h too (silu(-1000) ~ 0)
    y[9, :] = 0.0  # all-zero groups: scale 0, digits 0
    y[5, n - 1], y[7, n + 2] = float("nan"), float("inf")
    _, want_saved, want_scale = swiglu_forward(y, int8)
    want_h = torch.nn.functional.silu(y[:, :n].float()) * y[:, n:].float()
    h, saved, scale, pre = T.swiglu(y, int8, tile, True)
    assert h.dtype == torch.bfloat16 and h.isnan().any()
    torch.testing.assert_close(h.float(), want_h, rtol=2**-7, atol=1e-30, equal_nan=True)
    if int8:
        assert same(scale, want_scale) or torch.testing.assert_close(scale, want_scale, rtol=2**-23, atol=0,
                                                                      equal_nan=True) is None
        rows = torch.isfinite(want_scale).flatten(1).all(1)  # digits of non-finite groups are undefined
        assert rows[9] and not rows[5] and not rows[7]
        assert (saved[rows].int() - want_saved[rows].int()).abs().max() <= 1
        assert torch.equal(saved[9], torch.zeros_like(saved[9])) and torch.equal(scale[9], torch.zeros_like(scale[9]))
    else:
        assert saved is y and scale.numel() == 0  # the bf16 backward keeps y itself
    counts = torch.zeros(R.NUM_STATS, dtype=torch.int64, device=DEV)
    a = T.quantize_act(h, tile, THR, THR, True, transposed=True, stats=counts, pre=pre)
    b = T.quantize_act(h, tile, THR, THR, True, transposed=True)
    a.flags = a.flags.bool()  # compared as the reference's
    assert_same_quant(a, b, m, n)
    assert a.flags.any() and int(counts[R.STAT_NONFINITE]) > 0
    alone = T.swiglu(y, int8, tile, False)  # no statistics asked for
    assert alone[3] is None and same(alone[0].float(), h.float())


def test_swiglu_of_a_width_off_the_group_runs_in_torch_and_says_so(caplog):
    from fq.swiglu import swiglu_forward
    y = rand(40, 192, seed=33).to(torch.bfloat16)
    with caplog.at_level("INFO", logger="fqtrain.fq"):
        h, saved, scale, pre = T.swiglu(y, True, 32, True)
    want = swiglu_forward(y, True)
    assert pre is None and torch.equal(h, want[0]) and torch.equal(saved, want[1]) and torch.equal(scale, want[2])
    assert "SwiGLU width 96 is not a multiple of 128" in caplog.text


@pytest.mark.parametrize("swiglu", ["bf16", "int8"])
def test_fqlinear_with_fused_swiglu_matches_the_reference_and_the_unfused_layer(swiglu):
    from fq.swiglu import swiglu as swiglu_unfused
    cfg = FQConfig(tile=32)
    ref = FQLinear(64, 256, bias=False, config=cfg, backend="reference").to(DEV)
    tri = FQLinear.from_linear(ref, cfg, "tri", "triton")
    x = with_outliers(70, 64, seed=20)
    g = rand(70, 128, seed=21)
    outs = {}
    for name, fn in [("ref", lambda x: ref(x, swiglu=swiglu)), ("tri", lambda x: tri(x, swiglu=swiglu)),
                     ("unfused", lambda x: swiglu_unfused(*tri(x).chunk(2, dim=-1), swiglu == "int8"))]:
        xi = x.clone().requires_grad_(True)
        h = fn(xi)
        outs[name] = (h, *torch.autograd.grad(h, (xi, tri.weight if name != "ref" else ref.weight), g))
    for other in ("ref", "unfused"):
        for a, b in zip(outs[other], outs["tri"]):
            assert ((a - b).norm() / a.norm()) < 1e-6, other
    assert collect_stats(ref)["fallback_ratio"] > 0
    with pytest.raises(ValueError, match="swiglu"):
        tri(x, swiglu="fp8")


@pytest.mark.parametrize("swiglu", ["bf16", "int8"])
def test_down_proj_takes_the_statistics_of_h_from_the_gate_up_layer(swiglu):
    """An MLP's pair of FQ layers: gate/up hands down_proj the statistics of h it took in its
    SwiGLU kernel, and down_proj skips its stats pass; the outputs, gradients and both layers'
    telemetry are the same as when down_proj takes its own. A `pre` from a layer of another tile
    size is refused."""
    cfg = FQConfig(tile=32)
    up = FQLinear(64, 256, bias=False, config=cfg, name="up", backend="triton").to(DEV)
    down = FQLinear(128, 64, bias=False, config=cfg, name="down", backend="triton").to(DEV)
    up2, down2 = FQLinear.from_linear(up, cfg, "up", "triton"), FQLinear.from_linear(down, cfg, "down", "triton")
    assert down.takes_stats_from(up)
    x = with_outliers(70, 64, seed=40).reshape(2, 35, 64)
    x[1, 3, 5] = float("nan")  # counted once, in down_proj's forward counts, either way
    g = rand(2, 35, 64, seed=41)
    res = []
    for u, d, stats in ((up, down, True), (up2, down2, False)):
        xi = x.clone().requires_grad_(True)
        if stats:
            h, pre = u(xi, swiglu=swiglu, return_stats=True)
            assert pre is not None and pre[0].shape == (70, 4)
            out = d(h, pre=pre)
        else:
            out = d(u(xi, swiglu=swiglu))
        res.append((out, *torch.autograd.grad(out, (xi, u.weight, d.weight), g)))
    for a, b in zip(*res):
        assert same(a, b)
    assert torch.equal(up.fq_stats, up2.fq_stats) and torch.equal(down.fq_stats, down2.fq_stats)
    assert int(down.fq_stats[0, R.STAT_NONFINITE]) > 0
    other = FQLinear(128, 64, bias=False, config=FQConfig(tile=64), backend="triton").to(DEV)
    assert not other.takes_stats_from(up)
    with pytest.raises(ValueError, match="same fq.tile"):
        other(h, pre=pre)
    with pytest.raises(ValueError, match="return_stats"):
        up(x, return_stats=True)


@pytest.mark.parametrize("tile,m,k", [(32, 70, 100), (128, 300, 129)])
def test_backward_quantization_of_x_gives_the_forwards_digits(tile, m, k):
    """x_int8_in_backward: quantize_rows_t in the backward stands for quantize_act's transposed
    output in the forward, bit for bit, outliers, NaN and zero rows included."""
    x = with_outliers(m, k, seed=m)
    x[5] = 0.0
    x[7, 3] = float("nan")
    xq = T.quantize_act(x, tile, THR, 4.0, True, transposed=True)
    qt, scale_t = T.quantize_rows_t(x)
    assert torch.equal(qt, xq.qt) and same(scale_t, xq.scale_t)


@pytest.mark.parametrize("through_op", [False, True])
def test_layer_quantizing_x_in_the_backward_matches_the_default_layer(through_op):
    """Same outputs and gradients, bit for bit, through the eager path and through fq/ops.py's op
    (what torch.compile traces, run eagerly here); it keeps x itself for the backward, and no
    INT8 copy of it."""
    from fq import ops
    cfg = FQConfig(tile=32)
    a = FQLinear(64, 96, bias=False, config=cfg, backend="triton").to(DEV)
    b = FQLinear.from_linear(a, cfg, "b", "triton")
    b.x_int8_in_backward = True
    x = with_outliers(70, 64, seed=14)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        yb = ops.fq_linear(xb, b.weight, b, torch.float32)[0] if through_op else b(xb)
    assert any(t.data_ptr() == xb.data_ptr() for t in saved)
    assert not any(t.dtype == torch.int8 and t.numel() == x.numel() for t in saved)
    ya = a(xa)
    assert torch.equal(ya, yb)
    g = rand(*ya.shape, seed=15)
    for u, v in zip(torch.autograd.grad(ya, (xa, a.weight), g), torch.autograd.grad(yb, (xb, b.weight), g)):
        assert torch.equal(u, v)


def test_fqlinear_triton_path_matches_reference_path():
    torch.manual_seed(0)
    cfg = FQConfig(tile=32)
    ref = FQLinear(64, 40, bias=True, config=cfg, backend="reference").to(DEV)
    tri = FQLinear.from_linear(ref, cfg, "tri", "triton")
    x = with_outliers(70, 64, seed=10)
    xr, xt = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr, yt = ref(xr), tri(xt)
    assert tri.last_backend == "triton"
    assert ((yt - yr).norm() / yr.norm()) < 1e-6
    g = rand(70, 40, seed=11)
    gr = torch.autograd.grad(yr, (xr, ref.weight), g)
    gt = torch.autograd.grad(yt, (xt, tri.weight), g)
    for a, b in zip(gr, gt):
        assert ((a - b).norm() / a.norm()) < 1e-6
    # The kernels add their counts straight into the layer's totals: same telemetry as the reference.
    sr, st = collect_stats(ref), collect_stats(tri)
    for key in ("fallback_ratio", "fq/saturated", "fq/nonfinite", "fq/crushed_tiles"):
        assert sr[key] == st[key], key
    assert sr["fallback_ratio"] > 0


@pytest.mark.parametrize("swiglu", ["", "int8"])
def test_compile_op_matches_eager_path(swiglu):
    """fq/ops.py's op, which torch.compile traces (here run eagerly), computes what the eager
    path computes: outputs, gradients, telemetry and budget thresholds; with a fused SwiGLU too,
    and the statistics of its output it hands the next layer."""
    from fq import ops
    cfg = FQConfig(tile=32, fallback="budget", budget=0.2)
    a = FQLinear(64, 256, bias=False, config=cfg, backend="triton").to(DEV)
    b = FQLinear.from_linear(a, cfg, "b", "triton")  # same weight, its own totals and thresholds
    x = with_outliers(70, 64, seed=12)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    emit = bool(swiglu)
    ya = a(xa, swiglu=swiglu, return_stats=emit)
    yb = ops.fq_linear(xb, b.weight, b, torch.float32, swiglu, emit)
    if emit:
        (ya, (rowmax, counts)), (yb, *pre_b) = ya, (yb[0], *yb[1:])
        assert torch.equal(rowmax, pre_b[0]) and torch.equal(counts, pre_b[1]) and rowmax.shape == (70, 4)
    else:
        yb = yb[0]
    assert a.last_backend == "triton" and torch.equal(ya, yb)
    g = rand(*ya.shape, seed=13)
    for u, v in zip(torch.autograd.grad(ya, (xa, a.weight), g), torch.autograd.grad(yb, (xb, b.weight), g)):
        assert torch.equal(u, v)
    assert torch.equal(a.fq_stats, b.fq_stats) and torch.equal(a.fq_thr, b.fq_thr)
    assert int(a.fq_stats[:, R.STAT_FALLBACK].sum()) > 0 and float(a.fq_thr.max()) > cfg.threshold


def test_ops_carry_a_hash_of_the_fq_source(tmp_path):
    """Both ops take a hash of fq's source as an argument: inductor's caches key a compiled graph
    on the op calls in it, not on what the op bodies run, so without it a run after an fq change
    got graphs compiled from the old code back from the cache."""
    from fq import ops
    assert ops.CODE == ops.source_hash()
    for op in (torch.ops.fq.linear, torch.ops.fq.linear_backward):
        assert "str code" in str(op.default._schema)
    src = tmp_path / "kernels.py"
    src.write_text("SCALE = 1\n")
    before = ops.source_hash([src])
    src.write_text("SCALE = 2\n")
    assert ops.source_hash([src]) != before
