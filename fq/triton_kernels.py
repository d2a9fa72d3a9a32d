"""Triton kernels for FQ: the GPU path. Same format and results as fq/reference.py.

- `_act_stats_kernel`, `_scales_kernel`, `_act_quant_kernel`, `_fallback_quant_kernel`: an
  activation in four launches. One program per tile finds per-row absmax; one per tile row
  takes the fallback flags (spikes over the row's median tile absmax) and the row scales over
  the plain tiles from that small (M, Kt) array, with the tile row's list of fallback tiles for
  the GEMM; one program per tile then writes the plain tiles' INT8 digits, and a few programs
  per tile row the fallback tiles' digits and multipliers, from the lists.
  Counts go by atomics straight into the caller's running totals (no extra launch).
- `_swiglu_kernel`: under a fused SwiGLU (FQLinear's `swiglu`), silu(gate) * up of the gate/up
  projection's output, what its backward keeps (INT8 groups under fq.swiglu_int8), and the
  statistics of the stats kernel for the down projection's quantization, in one pass.
- `_swiglu_grad_kernel`: under a fused SwiGLU, the gate/up projection's
  output gradient from the gradient of silu(gate) * up, with the statistics of the stats kernel
  in the same pass, so quantize_grad starts at the scales kernel.
- `_row_quant_kernel`: a weight's per-row INT8 in one launch; each program owns whole rows and
  reads them twice.
- `_col_absmax_kernel`, `_col_quant_kernel`: per-column INT8, written transposed (a weight for the
  input gradient; dY for the weight gradient only when the input-gradient GEMM is not quantized,
  else `quantize_grad` writes it): column maxima by atomics, then digits, block by block. On the
  view X^T, stored untransposed, the same two give `quantize_rows_t` (X for the weight gradient
  of a layer that quantizes it in the backward).
- `_fq_gemm_tma_kernel`: INT8 tl.dot into one INT32 accumulator, row x column scales in the
  epilogue, over every tile's first digit (the weight-gradient GEMM, plain row-wise X, is only
  this); persistent, operands through TMA descriptors (sm_90+, 16-byte aligned rows). On Hopper
  with a 16-bit C, fq/gluon_gemm.py's warp-specialized kernel computes the same bits faster.
  `_fq_gemm_kernel` computes the same with pointer loads, autotuned, for all other operands.
- `_fallback_tail_kernel`: then adds the fallback tiles' remainder into C in float32, visiting
  only the tile rows that have any (from their per-row lists). Inside the bulk GEMM this tail
  held a second accumulator, which cost the GEMM 10-25% at 0% fallback on the H100.

Each wrapper mirrors the reference function of the same name. Rounding: ties to even through the
1.5 * 2**23 trick (exact IEEE float32 adds); divisions are div_rn; products that feed a rounding or
a residual are mul_rn, which is never fused into an FMA, so digits and residuals match torch bit
for bit whoever compiles the kernel (torch.compile does, with FMA contraction on).

Inside the ops of fq/ops.py every launch goes through `torch.library.wrap_triton`, so
torch.compile traces it and its generated code launches the kernel; in eager mode the wrappers
launch the kernels directly.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch.library import wrap_triton

from fq import gluon_gemm
from fq.reference import NUM_STATS, SPREAD, TileQuant, num_tiles
from fq.swiglu import GROUP, swiglu_backward, swiglu_forward

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
log = logging.getLogger("fqtrain.fq")


_TRACEABLE = [False]


@contextlib.contextmanager
def traceable_launches():
    """Launch through `torch.library.wrap_triton` inside (fq/ops.py's op bodies), so torch.compile
    can trace the launches; outside, launch the kernels directly (wrap_triton would add host time)."""
    before, _TRACEABLE[0] = _TRACEABLE[0], True
    try:
        yield
    finally:
        _TRACEABLE[0] = before


def _traceable(kernel):
    # The interpreter's kernels are not JITFunctions, and nothing compiles them anyway. Wrapped
    # afresh each time: a wrapper holds an index into dynamo's kernel table, which
    # torch._dynamo.reset() clears.
    if INTERPRET or not _TRACEABLE[0]:
        return kernel
    return wrap_triton(kernel)


if INTERPRET:  # numpy float32 products are single roundings already; libdevice has no interpreter
    @triton.jit
    def _mul(a, b):
        return a * b
else:
    @triton.jit
    def _mul(a, b):
        return libdevice.mul_rn(a, b)


@triton.jit
def _rint(z):
    # Round to nearest, ties to even, for |z| < 2**22: IEEE float32 add does the rounding.
    return (z + 12582912.0) - 12582912.0


@triton.jit
def _round(z, seed, offs, STOCHASTIC: tl.constexpr):
    if STOCHASTIC:
        return tl.floor(z + tl.rand(seed, offs))
    else:
        return _rint(z)


@triton.jit
def _act_stats_kernel(x_ptr, s_xm, s_xk, M, K, KT, rowmax_ptr, stats_ptr, mult_ptr, colmax_ptr, TILE: tl.constexpr,
                      ROWS: tl.constexpr, COLS: tl.constexpr, STAGES: tl.constexpr):
    """Per tile, ROWS rows at a time: each row's absmax (inf where a NaN/Inf sits) and the
    non-finite count; COLS: also each column's absmax of x * mult[row] over the tile's rows (MT,
    K), for per-column digits in the same pass as the row digits (quantize_grad)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_k * TILE + tl.arange(0, TILE)
    cmax = tl.zeros((ROWS, TILE), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)
    for r in tl.range(0, TILE, ROWS, num_stages=STAGES):
        rows = pid_m * TILE + r + tl.arange(0, ROWS)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        bad += _row_stats(x, rows, M, KT, pid_k, rowmax_ptr)
        if COLS:
            cmax = _col_absmax(cmax, x, mult_ptr, rows, M)
    if COLS:
        tl.store(colmax_ptr + pid_m * K + cols, tl.max(cmax, axis=0), mask=cols < K)
    _count_stats(bad, stats_ptr, (pid_m == 0) & (pid_k == 0), tl.cdiv(M, TILE) * KT)


@triton.jit
def _max_into(ptrs, v, mask):
    """Atomic max of v, non-negative floats or +inf, into float32 memory: as integers on their
    bits, which order as such floats do, so the result is exact whatever the order."""
    tl.atomic_max(ptrs.to(tl.pointer_type(tl.int32)), v.to(tl.int32, bitcast=True), mask=mask, sem="relaxed")


@triton.jit
def _row_stats(x, rows, M, KT, pid_k, rowmax_ptr):
    """Row absmax of rows x (one K tile) into rowmax[:, pid_k] (masked values zero, inf where a
    NaN/Inf sits); returns the count of non-finite values."""
    ax = tl.where(x != x, float("inf"), tl.abs(x))
    tl.store(rowmax_ptr + rows * KT + pid_k, tl.max(ax, axis=1), mask=rows < M)
    return tl.sum(tl.sum((ax == float("inf")).to(tl.int32), axis=1), axis=0)


@triton.jit
def _col_absmax(cmax, x, mult_ptr, rows, M):
    """cmax maxed elementwise with |x * mult[row]| (inf for NaN). Reduced over rows once, after
    a tile's last rows: a reduction (or an atomic) per row block cost the dY stats pass 1.3x on
    the H100 (2026-11-24)."""
    y = _mul(x, tl.load(mult_ptr + rows, mask=rows < M, other=1.0)[:, None])
    return tl.maximum(cmax, tl.where(y != y, float("inf"), tl.abs(y)))


@triton.jit
def _count_stats(bad, stats_ptr, first, tiles):
    """A program's non-finite count into the running totals; the first program adds the call's
    tile count."""
    if bad > 0:
        tl.atomic_add(stats_ptr + 3, bad.to(tl.int64))
    if first:
        tl.atomic_add(stats_ptr + 4, tl.full((), 0, tl.int64) + tiles)


@triton.jit
def _swiglu_kernel(y_ptr, s_ym, s_yk, h_ptr, q_ptr, qs_ptr, M, F, G, KT, TILES, rowmax_ptr, stats_ptr,
                   TILE: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr, INT8: tl.constexpr,
                   STATS: tl.constexpr):
    """h = silu(gate) * up of a gate/up projection's output y = [gate | up] (M, 2F), computed in
    float32 and rounded once (as inductor computes it); program (k, r) takes ROWS rows of GROUP
    columns k of gate and of up. INT8: also what fq.swiglu.swiglu_forward keeps of y for the
    backward, digits (M, 2F) and one scale per row and GROUP columns (M, 2, G). STATS: what
    _act_stats_kernel would take of h (its row absmax per TILE columns, non-finite values,
    TILES tiles), for the next layer's quantize_act."""
    pid_k = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    j = pid_k * GROUP + tl.arange(0, GROUP)
    rmask = rows < M
    mask = rmask[:, None] & (j < F)[None, :]
    yr = y_ptr + rows[:, None] * s_ym + j[None, :] * s_yk
    g = tl.load(yr, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(yr + F * s_yk, mask=mask, other=0.0).to(tl.float32)
    h = (g * tl.sigmoid(g) * u).to(h_ptr.dtype.element_ty)
    # h's statistics before the INT8 saves, which then no longer hold h in registers: on the H100
    # (2026-11-25, M = 32768, F = 8192) INT8 with statistics took 850 us instead of 955.
    if STATS:
        hf = h.to(tl.float32)
        ah = tl.where(hf != hf, float("inf"), tl.abs(hf))
        rowmax = tl.max(tl.reshape(ah, (ROWS, GROUP // TILE, TILE)), axis=2)
        kt = pid_k * (GROUP // TILE) + tl.arange(0, GROUP // TILE)
        tl.store(rowmax_ptr + rows[:, None] * KT + kt[None, :], rowmax, mask=rmask[:, None] & (kt < KT)[None, :])
        bad = tl.sum(tl.sum((ah == float("inf")).to(tl.int32), axis=1), axis=0)
        if bad > 0:
            tl.atomic_add(stats_ptr + 3, bad.to(tl.int64))
        if (pid_k == 0) & (tl.program_id(1) == 0):
            tl.atomic_add(stats_ptr + 4, tl.full((), 0, tl.int64) + TILES)
    tl.store(h_ptr + rows[:, None] * F + j[None, :], h, mask=mask)
    if INT8:
        _swiglu_save_int8(g, rows, j, M, F, G, pid_k, mask, q_ptr, qs_ptr)
        _swiglu_save_int8(u, rows, F + j, M, F, G, G + pid_k, mask, q_ptr, qs_ptr)


@triton.jit
def _swiglu_save_int8(v, rows, cols, M, F, G, group, mask, q_ptr, qs_ptr):
    """fq.swiglu._quantize of one GROUP of v's rows: scale absmax / 127 (NaN where a NaN sits, as
    torch's amax gives, Inf where an Inf does), digits round(v / scale), ties to even, 0 in an
    all-zero group."""
    nan = tl.max((v != v).to(tl.int32), axis=1) > 0
    scale = tl.math.div_rn(tl.max(tl.where(v != v, 0.0, tl.abs(v)), axis=1), 127.0)
    scale = tl.where(nan, float("nan"), scale)
    z = tl.where(scale[:, None] > 0, tl.math.div_rn(v, scale[:, None]), 0.0)
    q = tl.minimum(tl.maximum(_rint(z), -127.0), 127.0)
    tl.store(q_ptr + rows[:, None] * (2 * F) + cols[None, :], q.to(tl.int8), mask=mask)
    tl.store(qs_ptr + rows * (2 * G) + group, scale, mask=rows < M)


@triton.jit
def _swiglu_grad_kernel(dh_ptr, s_hm, s_hk, y_ptr, s_ym, ys_ptr, dy_ptr, M, F, G, KT, TILES, rowmax_ptr, stats_ptr,
                        mult_ptr, colmax_ptr, TILE: tl.constexpr, ROWS: tl.constexpr, GROUP: tl.constexpr,
                        INT8: tl.constexpr, STATS: tl.constexpr, STAGES: tl.constexpr):
    """dY = [dgate | dup], the gradient of a gate/up projection's output y = [gate | up] (M, 2F),
    from dh, the gradient of silu(gate) * up, and y as swiglu_forward kept it (INT8: digits and
    per-GROUP scales (M, 2, G)). F is a multiple of TILE, and GROUP of TILE: program (k, r) takes
    tile row r of gate tile k and of up tile k + F / TILE, which read the same dh, gate and up,
    ROWS rows at a time. STATS: also what _act_stats_kernel (COLS) gives for those dY tiles
    (TILES: dY's tile count)."""
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    j = pid_k * TILE + tl.arange(0, TILE)
    gmax = tl.zeros((ROWS, TILE), dtype=tl.float32)
    umax = tl.zeros((ROWS, TILE), dtype=tl.float32)
    bad = tl.zeros((), dtype=tl.int32)
    for r in tl.range(0, TILE, ROWS, num_stages=STAGES):
        rows = pid_m * TILE + r + tl.arange(0, ROWS)
        rmask = rows < M
        mask = rmask[:, None] & (j < F)[None, :]
        dh = tl.load(dh_ptr + rows[:, None] * s_hm + j[None, :] * s_hk, mask=mask, other=0.0).to(tl.float32)
        yr = y_ptr + rows[:, None] * s_ym + j[None, :]
        g = tl.load(yr, mask=mask, other=0).to(tl.float32)
        u = tl.load(yr + F, mask=mask, other=0).to(tl.float32)
        if INT8:  # the tile's columns lie in one group: one scale per row for gate (ys[:, 0]), one for up
            sr = ys_ptr + rows * (2 * G) + (pid_k * TILE) // GROUP
            g = g * tl.load(sr, mask=rmask, other=0.0)[:, None]
            u = u * tl.load(sr + G, mask=rmask, other=0.0)[:, None]
        sig = tl.sigmoid(g)
        dg = (dh * u * sig * (1 + g * (1 - sig))).to(dy_ptr.dtype.element_ty)
        du = (dh * g * sig).to(dy_ptr.dtype.element_ty)
        out = dy_ptr + rows[:, None] * (2 * F) + j[None, :]
        tl.store(out, dg, mask=mask)
        tl.store(out + F, du, mask=mask)
        if STATS:
            bad += _row_stats(dg.to(tl.float32), rows, M, KT, pid_k, rowmax_ptr)
            bad += _row_stats(du.to(tl.float32), rows, M, KT, pid_k + F // TILE, rowmax_ptr)
            gmax = _col_absmax(gmax, dg.to(tl.float32), mult_ptr, rows, M)
            umax = _col_absmax(umax, du.to(tl.float32), mult_ptr, rows, M)
    if STATS:
        tl.store(colmax_ptr + pid_m * (2 * F) + j, tl.max(gmax, axis=0), mask=j < F)
        tl.store(colmax_ptr + pid_m * (2 * F) + F + j, tl.max(umax, axis=0), mask=j < F)
        _count_stats(bad, stats_ptr, (pid_k == 0) & (pid_m == 0), TILES)


@triton.jit
def _tiles_with_spikes(v, med, thr, mask, finite):
    """reference.spikes, reduced to K tiles: some row of the tile row spikes there."""
    spike = (v > thr * med[:, None]) & (med > 0)[:, None] & mask
    return (tl.max(spike.to(tl.int32), axis=0) > 0) & finite


@triton.jit
def _scales_kernel(rowmax_ptr, thr_ptr, base_thr, flags_ptr, scale_ptr, inv_ptr, scale_all_ptr, inv_all_ptr,
                   count_ptr, order_ptr, stats_ptr, colmax_ptr, scale_c_ptr, inv_c_ptr, M, K, KT, MT,
                   FALLBACK: tl.constexpr, WRITE_ALL: tl.constexpr, TILE: tl.constexpr, BLOCK_T: tl.constexpr,
                   SPREAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """Programs below MT: one per tile row, from its (TILE, Kt) row absmax, the fallback flags (a
    spike over threshold x the row's median tile absmax, as reference.spikes), the row scales
    over the plain tiles, floored at absmax(row) / SPREAD, as reference.row_scales (WRITE_ALL:
    also the whole rows' scales, the weight gradient's X), and the GEMM's fallback list (the
    count, then the flagged K tiles in order; entries past the count are unused). Programs from
    MT on (quantize_grad only): column scales from the stats kernel's (MT, K) column maxima."""
    pid = tl.program_id(0)
    if pid < MT:
        rows = pid * TILE + tl.arange(0, TILE)
        ks = tl.arange(0, BLOCK_T)
        rmask = rows < M
        kmask = ks < KT
        mask = rmask[:, None] & kmask[None, :]
        v = tl.load(rowmax_ptr + rows[:, None] * KT + ks[None, :], mask=mask, other=0.0)
        srt = tl.sort(tl.where(kmask[None, :], v, float("inf")), dim=1)
        med = tl.sum(tl.where(ks[None, :] == (KT - 1) // 2, srt, 0.0), axis=1)  # the lower median
        finite = (tl.max((mask & (v == float("inf"))).to(tl.int32), axis=0) == 0) & kmask
        flag = _tiles_with_spikes(v, med, tl.load(thr_ptr).to(tl.float32), mask, finite)
        if not FALLBACK:
            flag = flag & False
        crushed = _tiles_with_spikes(v, med, base_thr, mask, finite) & (~flag)
        tl.store(flags_ptr + pid * KT + ks, flag.to(tl.int8), mask=kmask)
        tl.atomic_add(stats_ptr + 0, tl.sum(flag.to(tl.int32), axis=0).to(tl.int64))
        tl.atomic_add(stats_ptr + 1, tl.sum(crushed.to(tl.int32), axis=0).to(tl.int64))
        am_all = tl.max(v, axis=1)
        am = tl.maximum(tl.max(tl.where(flag[None, :], 0.0, v), axis=1), am_all / SPREAD)
        if WRITE_ALL:
            _store_scales(am_all, scale_all_ptr, inv_all_ptr, rows, rmask)
        _store_scales(am, scale_ptr, inv_ptr, rows, rmask)
        f = flag.to(tl.int32)
        tl.store(order_ptr + pid * KT + tl.cumsum(f, axis=0) - 1, ks, mask=f != 0)
        tl.store(count_ptr + pid, tl.sum(f, axis=0))
    else:
        cs = (pid - MT) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cs < K
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for i in range(0, MT, BLOCK_R):
            r = i + tl.arange(0, BLOCK_R)
            valid = (r < MT)[:, None] & cmask[None, :]
            acc = tl.maximum(acc, tl.load(colmax_ptr + r[:, None] * K + cs[None, :], mask=valid, other=0.0))
        _store_scales(tl.max(acc, axis=0), scale_c_ptr, inv_c_ptr, cs, cmask)


@triton.jit
def _store_scales(am, scale_ptr, inv_ptr, rows, rmask):
    pos = am > 0
    scale = tl.where(pos, tl.math.div_rn(am, 127.0), 1.0)
    inv = tl.where(pos, tl.math.div_rn(127.0, am), 1.0)
    scale = tl.where(am == float("inf"), float("nan"), scale)
    tl.store(scale_ptr + rows, scale, mask=rmask)
    tl.store(inv_ptr + rows, inv, mask=rmask)


@triton.jit
def _act_quant_kernel(x_ptr, s_xm, s_xk, M, K, KT, inv_ptr, flags_ptr, q_ptr, qt_ptr, inv_t_ptr, inv_c_ptr,
                      c1_ptr, c2_ptr, stats_ptr, seed_ptr, seed_t_ptr, TILE: tl.constexpr,
                      STOCHASTIC: tl.constexpr, TRANSPOSED: tl.constexpr, COLS: tl.constexpr):
    """Row digits of the plain tiles (fallback tiles are `_fallback_quant_kernel`'s); TRANSPOSED
    also writes (K, M) digits of x * inv_t[row] (X for the weight gradient: its whole rows'
    inverse scales), and with COLS times inv_c[col] (dY for the weight gradient: X's row scales
    times dY's inverse column scales). The fallback tiles' code is kept out of this kernel: its
    registers, reserved in every program, cost the plain tiles 1.2-1.5x of their time on the H100."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if tl.load(flags_ptr + pid_m * KT + pid_k) == 0:
        rows = pid_m * TILE + tl.arange(0, TILE)
        cols = pid_k * TILE + tl.arange(0, TILE)
        _quant_plain_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr, q_ptr, qt_ptr, inv_t_ptr, inv_c_ptr,
                          c1_ptr + pid_m * KT + pid_k, c2_ptr + pid_m * KT + pid_k, stats_ptr,
                          _seed(seed_ptr, STOCHASTIC), _seed(seed_t_ptr, STOCHASTIC), STOCHASTIC, TRANSPOSED, COLS)


@triton.jit
def _fallback_quant_kernel(x_ptr, s_xm, s_xk, M, K, KT, inv_ptr, count_ptr, order_ptr, q_ptr, q2_ptr, qt_ptr,
                           inv_t_ptr, inv_c_ptr, c1_ptr, c2_ptr, stats_ptr, seed_ptr, seed_t_ptr, TILE: tl.constexpr,
                           SPLIT: tl.constexpr, STOCHASTIC: tl.constexpr, TRANSPOSED: tl.constexpr,
                           COLS: tl.constexpr):
    """`_act_quant_kernel`'s output for the fallback tiles: program (r, s) takes every SPLIT-th
    entry of tile row r's fallback list (the scales kernel's), so a call launches a few programs
    per tile row instead of one per tile."""
    pid_m = tl.program_id(0)
    rows = pid_m * TILE + tl.arange(0, TILE)
    seed, seed_t = _seed(seed_ptr, STOCHASTIC), _seed(seed_t_ptr, STOCHASTIC)
    for i in range(tl.program_id(1), tl.load(count_ptr + pid_m), SPLIT):
        pid_k = tl.load(order_ptr + pid_m * KT + i)
        cols = pid_k * TILE + tl.arange(0, TILE)
        _quant_fallback_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr, q_ptr, q2_ptr, qt_ptr, inv_t_ptr,
                             inv_c_ptr, c1_ptr + pid_m * KT + pid_k, c2_ptr + pid_m * KT + pid_k, stats_ptr, seed,
                             seed_t, STOCHASTIC, TRANSPOSED, COLS)


# Programs per tile row of `_fallback_quant_kernel`: a trained model flags ~20% of tiles, ~25 per
# tile row at K = 16384, shared by four programs.
FALLBACK_SPLIT = 4


@triton.jit
def _seed(seed_ptr, STOCHASTIC: tl.constexpr):
    """A stochastic-rounding seed, from device memory: under torch.compile it comes from a
    counter on the device, so a graph does not freeze it (philox draws the same numbers from
    an int64 seed as from an int32 argument of the same value)."""
    if STOCHASTIC:
        return tl.load(seed_ptr)
    else:
        return 0


@triton.jit
def _scaled_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr):
    """The tile's values over their row scales, non-finite ones zeroed, and its mask."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    z = _mul(x, tl.load(inv_ptr + rows, mask=rows < M, other=1.0)[:, None])
    return x, tl.where((z == z) & (tl.abs(z) < float("inf")), z, 0.0), mask


@triton.jit
def _store_transposed(x, rows, cols, M, K, mask, qt_ptr, inv_t_ptr, inv_c_ptr, seed_t, STOCHASTIC: tl.constexpr,
                      COLS: tl.constexpr):
    zt = _mul(x, tl.load(inv_t_ptr + rows, mask=rows < M, other=1.0)[:, None])
    if COLS:
        zt = _mul(zt, tl.load(inv_c_ptr + cols, mask=cols < K, other=1.0)[None, :])
    zt = tl.where((zt == zt) & (tl.abs(zt) < float("inf")), zt, 0.0)
    offs_t = cols[None, :] * M + rows[:, None]  # the stream _col_quant_kernel uses
    qt = tl.minimum(tl.maximum(_round(zt, seed_t, offs_t, STOCHASTIC), -127.0), 127.0)
    tl.store(qt_ptr + offs_t, qt.to(tl.int8), mask=mask)


@triton.jit
def _saturated(q, stats_ptr):
    """Count digits that stochastic rounding pushed past 127 (round-to-nearest of |z| <= 127 cannot)."""
    tl.atomic_add(stats_ptr + 2, tl.sum(tl.sum((tl.abs(q) > 127.0).to(tl.int32), axis=1), axis=0).to(tl.int64))


@triton.jit
def _quant_plain_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr, q_ptr, qt_ptr, inv_t_ptr, inv_c_ptr, c1_ptr,
                      c2_ptr, stats_ptr, seed, seed_t, STOCHASTIC: tl.constexpr, TRANSPOSED: tl.constexpr,
                      COLS: tl.constexpr):
    x, z, mask = _scaled_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr)
    offs = rows[:, None] * K + cols[None, :]
    q = _round(z, seed, offs, STOCHASTIC)
    if STOCHASTIC:
        _saturated(q, stats_ptr)
    tl.store(q_ptr + offs, tl.minimum(tl.maximum(q, -127.0), 127.0).to(tl.int8), mask=mask)
    if TRANSPOSED:
        _store_transposed(x, rows, cols, M, K, mask, qt_ptr, inv_t_ptr, inv_c_ptr, seed_t, STOCHASTIC, COLS)
    tl.store(c1_ptr, 0.0)
    tl.store(c2_ptr, 0.0)


@triton.jit
def _quant_fallback_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr, q_ptr, q2_ptr, qt_ptr, inv_t_ptr, inv_c_ptr,
                         c1_ptr, c2_ptr, stats_ptr, seed, seed_t, STOCHASTIC: tl.constexpr,
                         TRANSPOSED: tl.constexpr, COLS: tl.constexpr):
    """Two digits with the tile's own multipliers: z ~ c1 * q + c2 * q2."""
    x, z, mask = _scaled_tile(x_ptr, s_xm, s_xk, M, K, rows, cols, inv_ptr)
    offs = rows[:, None] * K + cols[None, :]
    az = tl.max(tl.max(tl.abs(z), axis=1), axis=0)
    c1 = tl.math.div_rn(az, 127.0)
    q = _round(_mul(z, tl.where(az > 0, tl.math.div_rn(127.0, az), 1.0)), seed, offs, STOCHASTIC)
    if STOCHASTIC:
        _saturated(q, stats_ptr)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    if TRANSPOSED:
        _store_transposed(x, rows, cols, M, K, mask, qt_ptr, inv_t_ptr, inv_c_ptr, seed_t, STOCHASTIC, COLS)
    resid = z - _mul(q, c1)
    ar = tl.max(tl.max(tl.abs(resid), axis=1), axis=0)
    c2 = tl.math.div_rn(ar, 127.0)
    r2 = _round(_mul(resid, tl.where(ar > 0, tl.math.div_rn(127.0, ar), 0.0)), seed + 1, offs, STOCHASTIC)
    if STOCHASTIC:
        _saturated(r2, stats_ptr)
    tl.store(q2_ptr + offs, tl.minimum(tl.maximum(r2, -127.0), 127.0).to(tl.int8), mask=mask)
    tl.store(c1_ptr, c1)
    tl.store(c2_ptr, c2)


@triton.jit
def _row_quant_kernel(x_ptr, s_xm, s_xk, M, K, q_ptr, scale_ptr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row INT8 of x (M, K), a weight in the forward: a program owns BLOCK_L whole rows and
    makes two passes over them (absmax, then digits), the second from the cache."""
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    ds = tl.arange(0, BLOCK_D)
    rmask = rows < M
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, K, BLOCK_D):
        mask = rmask[:, None] & (d0 + ds[None, :] < K)
        y = tl.load(x_ptr + rows[:, None] * s_xm + (d0 + ds)[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        ay = tl.abs(y)
        acc = tl.maximum(acc, tl.where((y != y) | (ay == float("inf")), float("inf"), ay))
    am = tl.max(acc, axis=1)
    pos = am > 0
    scale = tl.where(pos, tl.math.div_rn(am, 127.0), 1.0)
    inv = tl.where(pos, tl.math.div_rn(127.0, am), 1.0)
    tl.store(scale_ptr + rows, tl.where(am == float("inf"), float("nan"), scale), mask=rmask)
    for d0 in range(0, K, BLOCK_D):
        mask = rmask[:, None] & (d0 + ds[None, :] < K)
        y = tl.load(x_ptr + rows[:, None] * s_xm + (d0 + ds)[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
        z = _mul(y, inv[:, None])
        z = tl.where((z == z) & (tl.abs(z) < float("inf")), z, 0.0)
        q = tl.minimum(tl.maximum(_rint(z), -127.0), 127.0).to(tl.int8)
        tl.store(q_ptr + rows[:, None] * K + (d0 + ds)[None, :], q, mask=mask)


@triton.jit
def _col_absmax_kernel(x_ptr, s_xm, s_xk, M, K, mult_ptr, amax_ptr, HAS_MULT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """quantize_cols_t's first pass: the absmax of x * mult[row] over BLOCK_M rows of BLOCK_K
    columns (inf where a NaN/Inf sits), maxed into amax (K,), zeroed."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    y = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULT:
        y = _mul(y, tl.load(mult_ptr + rows, mask=rows < M, other=1.0)[:, None])
    ay = tl.abs(y)
    am = tl.max(tl.where((y != y) | (ay == float("inf")), float("inf"), ay), axis=0)
    _max_into(amax_ptr + cols, am, cols < K)


@triton.jit
def _col_quant_kernel(x_ptr, s_xm, s_xk, M, K, mult_ptr, amax_ptr, q_ptr, scale_ptr, seed_ptr,
                      HAS_MULT: tl.constexpr, STOCHASTIC: tl.constexpr, TRANSPOSED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """quantize_cols_t's second pass: one (BLOCK_M, BLOCK_K) block of x * mult[row] at its
    columns' scales, stored transposed into q (K, M), or (not TRANSPOSED: quantize_rows_t, x
    being X^T) as x is, into q (M, K). Blocks, not whole columns, per program: a weight's column
    is strided, and a program reading a few whole columns used a fraction of each memory sector
    it touched."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    mask = (rows[:, None] < M) & cmask[None, :]
    am = tl.load(amax_ptr + cols, mask=cmask, other=0.0)
    pos = am > 0
    inv = tl.where(pos, tl.math.div_rn(127.0, am), 1.0)
    if pid_m == 0:
        scale = tl.where(pos, tl.math.div_rn(am, 127.0), 1.0)
        tl.store(scale_ptr + cols, tl.where(am == float("inf"), float("nan"), scale), mask=cmask)
    seed = _seed(seed_ptr, STOCHASTIC)
    y = tl.load(x_ptr + rows[:, None] * s_xm + cols[None, :] * s_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_MULT:
        y = _mul(y, tl.load(mult_ptr + rows, mask=rows < M, other=1.0)[:, None])
    z = _mul(y, inv[None, :])
    z = tl.where((z == z) & (tl.abs(z) < float("inf")), z, 0.0)
    if TRANSPOSED:
        offs = cols[None, :] * M + rows[:, None]  # as _store_transposed's: the same random bits
    else:
        offs = rows[:, None] * K + cols[None, :]
    q = tl.minimum(tl.maximum(_round(z, seed, offs, STOCHASTIC), -127.0), 127.0).to(tl.int8)
    tl.store(q_ptr + offs, q, mask=mask)


@triton.jit
def _tile_of(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Output block `pid` in grouped order: GROUP_M block rows share each B panel while in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    group = GROUP_M * tl.cdiv(N, BLOCK_N)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def _fq_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, s_cm, s_cn,
                    HAS_SB: tl.constexpr, RAW: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = (A B) * sa[:, None] * sb[None, :] with INT8 A (M, K), B (K, N); RAW: the INT32 sums."""
    pid_m, pid_n = _tile_of(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & (rn[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
    if RAW:
        tl.store(c_ptrs, acc, mask=cmask)
    else:
        tl.store(c_ptrs, _scaled(acc, sa_ptr, sb_ptr, rm, rn, M, N, HAS_SB).to(c_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scaled(acc, sa_ptr, sb_ptr, rm, rn, M, N, HAS_SB: tl.constexpr):
    out = acc.to(tl.float32) * tl.load(sa_ptr + rm, mask=rm < M, other=0.0)[:, None]
    if HAS_SB:
        out = out * tl.load(sb_ptr + rn, mask=rn < N, other=0.0)[None, :]
    return out


@triton.jit
def _fq_gemm_tma_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_bn, s_cm,
                        HAS_SB: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr):
    """_fq_gemm_kernel's result through TMA descriptors (A (M, K), B (N, K), C (M, N), rows
    contiguous; the copy engine fills blocks past an edge with zeros and clips stores),
    persistent: PROGRAMS programs, one per SM, walk the output blocks in the same grouped order.
    The descriptors are built on the device (in scratch memory from triton's allocator): under
    torch.compile the launch then takes plain tensors."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[s_am, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[s_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[s_cm, 1], block_shape=[BLOCK_M, BLOCK_N])
    blocks = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for pid in tl.range(tl.program_id(0), blocks, PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_of(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(a_desc.load([om, k0]), b_desc.load([on, k0]).T, acc, out_dtype=tl.int32)
        if RAW:
            c_desc.store([om, on], acc)
        else:
            rm = om + tl.arange(0, BLOCK_M)
            rn = on + tl.arange(0, BLOCK_N)
            c_desc.store([om, on], _scaled(acc, sa_ptr, sb_ptr, rm, rn, M, N, HAS_SB).to(c_ptr.dtype.element_ty))


@triton.jit
def _fallback_tail_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, r_ptr, count_ptr, order_ptr, c1_ptr, c2_ptr,
                          M, N, K, MT, s_am, s_ak, s_bk, s_bn, s_cm, s_cn, s_r0, s_r1, s_o0, s_o1, s_f0, s_f1,
                          TILE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_MT: tl.constexpr):
    """C += (sum over A's fallback tiles of (c1 - 1) q.b + c2 r.b) * sa * sb: what the bulk GEMM,
    which took each fallback tile's q with weight 1, left out. Persistent: every program reads
    the tile rows' fallback counts at once and walks the (BLOCK_M, BLOCK_N) blocks of only the
    tile rows that have any, so a call without fallback tiles costs a few microseconds instead
    of one empty program per block. Kept out of the bulk GEMM, whose registers its second
    accumulator would crowd. One whole tile deep per step, so the loop over a tile row's list is
    the one the compiler pipelines."""
    rows_t = tl.arange(0, BLOCK_MT)
    active = (tl.load(count_ptr + rows_t, mask=rows_t < MT, other=0) > 0).to(tl.int32)
    rank = tl.cumsum(active, axis=0)  # the n-th active tile row has rank n + 1
    blocks_m = TILE // BLOCK_M
    blocks_n = tl.cdiv(N, BLOCK_N)
    n_m = tl.sum(active, axis=0) * blocks_m  # row blocks to visit
    rk = tl.arange(0, TILE)
    for w in tl.range(tl.program_id(0), n_m * blocks_n, tl.num_programs(0)):
        wm = w % n_m  # row blocks fastest: programs running together share B's columns
        wn = w // n_m
        own = tl.sum(tl.where((active > 0) & (rank == wm // blocks_m + 1), rows_t, 0), axis=0)
        rm = (own * blocks_m + wm % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = wn * BLOCK_N + tl.arange(0, BLOCK_N)
        out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for i in range(0, tl.load(count_ptr + own)):
            kt = tl.load(order_ptr + own * s_o0 + i * s_o1)
            fi = own * s_f0 + kt * s_f1
            m1 = tl.load(c1_ptr + fi) - 1.0
            m2 = tl.load(c2_ptr + fi)
            ks = kt * TILE + rk
            amask = (rm[:, None] < M) & (ks[None, :] < K)
            bmask = (ks[:, None] < K) & (rn[None, :] < N)
            a = tl.load(a_ptr + rm[:, None] * s_am + ks[None, :] * s_ak, mask=amask, other=0)
            b = tl.load(b_ptr + ks[:, None] * s_bk + rn[None, :] * s_bn, mask=bmask, other=0)
            r = tl.load(r_ptr + rm[:, None] * s_r0 + ks[None, :] * s_r1, mask=amask, other=0)
            out += (m1 * tl.dot(a, b, out_dtype=tl.int32).to(tl.float32)
                    + m2 * tl.dot(r, b, out_dtype=tl.int32).to(tl.float32))
        out = _scaled(out, sa_ptr, sb_ptr, rm, rn, M, N, True)
        cmask = (rm[:, None] < M) & (rn[None, :] < N)
        c_ptrs = c_ptr + rm[:, None] * s_cm + rn[None, :] * s_cn
        c = tl.load(c_ptrs, mask=cmask, other=0.0).to(tl.float32)
        tl.store(c_ptrs, (c + out).to(c_ptr.dtype.element_ty), mask=cmask)


def _gemm_configs() -> list:
    """H100 candidates (swept with tools/bench_gemm.py --diag)."""
    shapes = [(128, 256, 128, 3, 8), (256, 128, 128, 3, 8), (128, 128, 128, 3, 8), (128, 128, 64, 4, 8),
              (64, 256, 128, 3, 8)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


_TUNED: list = []


def _gemm_launcher():
    if INTERPRET:
        return _fq_gemm_kernel, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
    if os.environ.get("FQ_NO_AUTOTUNE") == "1":  # quick GPU test runs: one fixed config
        return _fq_gemm_kernel, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8,
                                 "num_stages": 3, "num_warps": 4}
    if not _TUNED:
        _TUNED.append(triton.autotune(_gemm_configs(), key=["M", "N", "K", "HAS_SB", "RAW"])(_fq_gemm_kernel))
    return _TUNED[0], {}


# The TMA kernel's configuration, from an H100 sweep (2026-11-23; docs/fq.md, "GEMM kernels"):
# persistent 128 x 256 x 128 blocks, 3 stages, 8 warps led at every Llama shape tried but two,
# where it trailed the autotuned pointer kernel by 2-3%. A 4-byte C block (float32, int32) would
# take the shared memory past the H100's 227 KiB beside 3 stages, so those get 128 x 128.
_TMA_META = {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "num_stages": 3, "num_warps": 8}
_TMA_META_WIDE_C = dict(_TMA_META, BLOCK_N=128)
_TMA_META_INTERPRET = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
_NOTED: set = set()


@functools.cache
def _props(device: torch.device):
    """The device's properties, read once: the GEMM wrapper asks on every eager call."""
    return torch.cuda.get_device_properties(device)


def _tma_unfit(*tensors: torch.Tensor) -> str | None:
    """Why the TMA kernel cannot take these 2-D operands (None: it can). TMA needs sm_90+ and
    rows that start 16-byte aligned; allocations are, so a storage offset and the row stride
    decide (no data_ptr: under torch.compile these are fake tensors)."""
    dev = tensors[0].device
    if dev.type == "cuda" and not INTERPRET and _props(dev).major < 9:
        return f"sm_{_props(dev).major}{_props(dev).minor} has no TMA"
    for t in tensors:
        size = t.element_size()
        if t.stride(1) != 1 or (t.stride(0) * size) % 16 or (t.storage_offset() * size) % 16:
            return f"rows of a {t.dtype} {tuple(t.shape)} operand are not 16-byte aligned"
    return None


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _programs(device: torch.device) -> int:
    # In the interpreter 2 are enough to exercise the persistent loop's stride.
    return 2 if INTERPRET else _props(device).multi_processor_count


def _gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor | None, out_dtype: torch.dtype,
          config: dict | None = None, kernel: str | None = None):
    """C = (a @ b.T) * sa[:, None] (* sb[None, :]) for INT8 a (M, K) and b (N, K), both K-major
    (INT8 tensor cores want that); out_dtype int32: the raw sums. The first kernel that can run,
    of: the warp-specialized Gluon kernel (fq/gluon_gemm.py: Hopper, 16-bit C), Triton's
    persistent TMA kernel, the autotuned pointer kernel; the log names once per reason why a
    GEMM did not get the first. All give the same bits. `kernel` ("gluon", "tma", "pointer")
    forces one, for tests and benchmarks. With `config` (block sizes, num_warps, num_stages) the
    pointer kernel runs it untuned and (C, compiled kernel) comes back, for benchmarks."""
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    flags = {"HAS_SB": sb is not None, "RAW": out_dtype == torch.int32}
    kernel = "pointer" if config else kernel
    why_not_tma = "forced by the caller" if kernel == "pointer" else _tma_unfit(a, b, c)
    why_not_gluon = why_not_tma or ("forced by the caller" if kernel == "tma" else _gluon_unfit(a, b, c))
    chosen = "gluon" if why_not_gluon is None else "tma" if why_not_tma is None else "pointer"
    if kernel and kernel != chosen:
        raise ValueError(f"_gemm: the {kernel} kernel cannot run: {why_not_gluon if kernel == 'gluon' else why_not_tma}")
    if kernel is None and chosen != "gluon" and (chosen, why_not_gluon) not in _NOTED:
        _NOTED.add((chosen, why_not_gluon))
        log.info("fq: %s, so that GEMM (and any like it) runs the %s kernel, not the warp-specialized one",
                 why_not_gluon, "pointer-based" if chosen == "pointer" else "Triton TMA")
    if chosen != "pointer":
        # The descriptors' scratch (128 B each). Under torch.compile inductor sets its own
        # allocator before each launch; this one serves eager launches. Set per call: triton
        # keeps it per thread, and the backward runs in autograd's threads.
        triton.set_allocator(_scratch)
    if chosen == "gluon":
        if _TRACEABLE[0]:  # inductor cannot trace a Gluon kernel: an opaque op launches it
            return torch.ops.fq.gemm_ws(a, b, sa, sb, out_dtype, _programs(a.device))
        return gluon_gemm.gemm(a, b, sa, sb, c, _programs(a.device))
    sb = sb if sb is not None else sa
    if chosen == "tma":
        meta = _TMA_META_INTERPRET if INTERPRET else _TMA_META if c.element_size() <= 2 else _TMA_META_WIDE_C
        programs = min(_programs(a.device), triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]))
        _traceable(_fq_gemm_tma_kernel)[(programs,)](a, b, c, sa, sb, m, n, k, a.stride(0), b.stride(0), c.stride(0),
                                                     PROGRAMS=programs, **flags, **meta)
        return c
    launcher, meta = (_fq_gemm_kernel, config) if config else _gemm_launcher()
    launcher = launcher if config else _traceable(launcher)
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    compiled = launcher[grid](a, b, c, sa, sb, m, n, k, a.stride(0), a.stride(1), b.stride(1), b.stride(0),
                              c.stride(0), c.stride(1), **flags, **meta)
    return (c, compiled) if config else c


def _gluon_unfit(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> str | None:
    return "Triton's interpreter runs no Gluon kernel" if INTERPRET else gluon_gemm.unfit(a, b, c)


def _add_fallback_tail(c: torch.Tensor, a: TileQuant, b_q: torch.Tensor, b_scale: torch.Tensor) -> None:
    m, k = a.q.shape
    n = b_q.shape[0]
    mt = a.count.shape[0]
    # 64 x 128 blocks, 4 warps, 2 stages: swept on the H100 (2026-11-23) against 128 x 64 to
    # 128 x 256 blocks with 4-8 warps, it ran 1.05-1.37x faster than the earlier 64-deep nested
    # loop at 5-20% fallback, e.g. 1717 -> 1363 us at 16384 x 4096 x 14336 with 20%.
    block_m = min(a.tile, 64)
    block_n = 32 if INTERPRET else 128
    # 12 programs per SM (four times what fits at once): swept on the H100 (2026-11-23) against
    # 3 and 48, and against one program per block (before): a call without fallback tiles takes
    # ~4 us instead of up to 27, one with 0.2% 1.0-1.9x less; at 5-20% the tail is 0.90-1.01x
    # as fast as with one program per block.
    programs = min(12 * _programs(a.q.device), mt * (a.tile // block_m) * triton.cdiv(n, block_n))
    _traceable(_fallback_tail_kernel)[(programs,)](
        a.q, b_q, c, a.scale, b_scale, a.q2, a.count, a.order, a.c1, a.c2, m, n, k, mt,
        a.q.stride(0), a.q.stride(1), b_q.stride(1), b_q.stride(0), c.stride(0), c.stride(1),
        a.q2.stride(0), a.q2.stride(1), a.order.stride(0), a.order.stride(1), a.c1.stride(0), a.c1.stride(1),
        TILE=a.tile, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_MT=max(triton.next_power_of_2(mt), 16),
        **({} if INTERPRET else {"num_warps": 4, "num_stages": 2}))


def gemm_a_fallback(a: TileQuant, b_q: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The bulk GEMM over every tile's q, then the fallback tiles' remainder added into C. C is
    rounded to out_dtype twice in tile rows with fallback tiles (bf16: one more half-ulp there)."""
    c = _gemm(a.q, b_q, a.scale, b_scale, out_dtype)
    if a.count is not None:  # None under fq.fallback=none: no tile can fall back
        _add_fallback_tail(c, a, b_q, b_scale)
    return c


def gemm_wgrad(a_q: torch.Tensor, a_scale: torch.Tensor, b_qt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """B is read from its transposed digits (K, M): INT8 tensor cores want both operands K-major."""
    return _gemm(a_q, b_qt, a_scale, None, out_dtype)


def gemm_rowwise(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Plain row-wise INT8 GEMM without fallback, C = (A B^T) * sa * sb: the peer in benchmarks."""
    return _gemm(a_q, b_q, a_scale, b_scale, out_dtype)


def int_sums(a_q: torch.Tensor, b_q: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
    """Exact INT32 a_q @ b_q^T through a GEMM kernel's INT32 accumulator (for tests; `kernel` as
    in _gemm)."""
    ones = torch.ones(a_q.shape[0], dtype=torch.float32, device=a_q.device)
    return _gemm(a_q, b_q, ones, None, torch.int32, kernel=kernel)


# A stochastic-rounding seed: a host int, or a one-element int64 device tensor (fq/ops.py's op,
# whose seeds come from a counter on the device); None rounds to nearest.
Seed = int | torch.Tensor | None


def _seed_arg(seed: Seed, device: torch.device) -> torch.Tensor:
    """The seed as the kernels read it: a one-element int64 tensor (a placeholder for None,
    which they never read)."""
    if isinstance(seed, torch.Tensor):
        return seed
    if seed is None:  # no fill: a launch on every call would cost host time
        return torch.empty(1, dtype=torch.int64, device=device)
    return torch.full((1,), seed, dtype=torch.int64, device=device)


def quantize_act(x: torch.Tensor, tile: int, threshold: torch.Tensor | float, base_threshold: float,
                 fallback: bool, seed: Seed = None, transposed: bool = False,
                 stats: torch.Tensor | None = None, pre=None) -> TileQuant:
    """Four launches: row absmax per tile, flags and row scales (+ the GEMM's fallback lists),
    plain tiles' digits, fallback tiles' digits (none under fq.fallback=none). `pre`: x's
    statistics from `swiglu` (rowmax, counts), whose counts are added to `stats`, and no
    statistics pass."""
    return _quantize_act(x, tile, threshold, base_threshold, fallback, seed, transposed, stats, pre=pre)[0]


def quantize_grad(dy: torch.Tensor, tile: int, threshold: torch.Tensor | float, base_threshold: float,
                  fallback: bool, row_mult: torch.Tensor, seed: Seed = None, seed_t: Seed = None,
                  stats: torch.Tensor | None = None, pre=None) -> tuple[TileQuant, torch.Tensor, torch.Tensor]:
    """quantize_act(dy) and quantize_cols_t(dy, row_mult) in the same launches: dY is read twice
    instead of four times; once with `pre`, dY's statistics from `swiglu_grad` (rowmax,
    colmax), which has also counted its tiles and non-finite values into `stats`."""
    if (seed is None) != (seed_t is None):
        raise ValueError("quantize_grad: stochastic rounding needs both seeds or neither")
    return _quantize_act(dy, tile, threshold, base_threshold, fallback, seed, True, stats, row_mult, seed_t, pre)


# Each program of _swiglu_grad_kernel takes a 128-row tile row, this many rows at a time (rows,
# warps, pipeline stages) with BF16 and INT8 saves. H100 sweep (2026-11-24, M = 32768, 2F =
# 16384, statistics on): 938 us BF16 and 897 us INT8, against 1055 and 1281 us for the earlier
# 16-row programs that maxed their column maxima into memory by atomics; 8 to 32 rows, 1 to 4
# warps, 1 to 3 stages swept. Inductor's SwiGLU backward alone takes ~910 us in BF16.
SWIGLU_GRAD_BLOCK = {False: (16, 2, 3), True: (8, 4, 3)}
# The stats pass's programs take a tile, this many rows at a time (rows, warps, stages), without
# and with column maxima. H100 (2026-11-24, M = 32768): X at 2.9 TB/s in one 128-row step; dY
# 57 / 82 us at K = 2048 / 3072 with 16 rows, 1 warp, 3 stages, against 73 / 108 us for 16-row
# programs maxing their column maxima into memory by atomics (8 to 32 rows, 1 to 8 warps swept).
STATS_BLOCK = {False: (128, 8, 1), True: (16, 1, 3)}


def _unused(dev: torch.device) -> torch.Tensor:
    """A fresh tensor for a kernel argument a launch does not use: never one a kernel may write
    through another argument, since torch.compile's functionalization of a kernel cannot tell
    aliased arguments apart."""
    return torch.empty(1, dtype=torch.float32, device=dev)


def swiglu(y: torch.Tensor, int8: bool, tile: int, with_stats: bool):
    """fq.swiglu.swiglu_forward (h, saved, scale) in one launch, and with_stats h's statistics as
    quantize_act's `pre` would take them (rowmax, counts), else None. A width that is not a
    multiple of GROUP runs swiglu_forward in torch, without statistics (and says so, once)."""
    m, k = y.shape
    n = k // 2
    if n % GROUP:
        why = f"the SwiGLU width {n} is not a multiple of {GROUP}"
        if why not in _NOTED:
            _NOTED.add(why)
            log.info("fq: %s, so SwiGLU's forward runs in torch and the next layer's statistics take their own "
                     "pass", why)
        return (*swiglu_forward(y, int8), None)
    dev = y.device
    h = torch.empty(m, n, dtype=y.dtype, device=dev)
    g = n // GROUP

    q = torch.empty(m, k, dtype=torch.int8, device=dev) if int8 else _unused(dev)
    qs = torch.empty(m, 2, g, dtype=torch.float32, device=dev) if int8 else _unused(dev)
    kt = num_tiles(n, tile)
    rowmax = torch.empty(m, kt, dtype=torch.float32, device=dev) if with_stats else _unused(dev)
    counts = torch.zeros(NUM_STATS, dtype=torch.int64, device=dev) if with_stats else _unused(dev)
    # 16 rows, 4 warps, as _swiglu_grad_kernel: on the H100 (2026-11-24, M = 32768, F = 8192) 530 us
    # without statistics and 542 with them, against 526 for inductor's SwiGLU; INT8 984 against 1062
    # (850 since 2026-11-25; 8 rows and 2 warps 840, 32 and 8 948: kept at 16 and 4 for BF16).
    rows = 16
    yk = _in_place(y)  # y itself is what the bf16 backward keeps: an op may not return a view
    _traceable(_swiglu_kernel)[(g, triton.cdiv(m, rows))](
        yk, yk.stride(0), yk.stride(1), h, q, qs, m, n, g, kt, num_tiles(m, tile) * kt, rowmax, counts, TILE=tile,
        ROWS=rows, GROUP=GROUP, INT8=int8, STATS=with_stats, num_warps=4)
    saved, scale = (q, qs) if int8 else (y, y.new_empty(0))
    return h, saved, scale, ((rowmax, counts) if with_stats else None)


def swiglu_grad(dh: torch.Tensor, saved: torch.Tensor, scale: torch.Tensor, int8: bool,
                row_mult: torch.Tensor | None, tile: int, stats: torch.Tensor):
    """fq.swiglu.swiglu_backward, and with row_mult (quantize_grad's) dY's statistics in the
    same launch: (dY, (rowmax, colmax)) for quantize_grad's `pre`, else (dY, None). A width
    that is not a multiple of the tile runs swiglu_backward in torch (and says so, once)."""
    m, n = dh.shape
    if n % tile:
        why = f"the SwiGLU width {n} is not a multiple of fq.tile={tile}"
        if why not in _NOTED:
            _NOTED.add(why)
            log.info("fq: %s, so SwiGLU's backward runs in torch and dY's statistics take their own pass", why)
        return swiglu_backward(dh, saved, scale, int8), None
    dh = _in_place(dh)
    saved = saved if saved.stride(1) == 1 else saved.contiguous()
    k = 2 * n
    dev = dh.device
    dy = torch.empty(m, k, dtype=dh.dtype, device=dev)
    mt, kt = num_tiles(m, tile), num_tiles(k, tile)
    rows, warps, stages = SWIGLU_GRAD_BLOCK[int8]
    with_stats = row_mult is not None

    rowmax = torch.empty(m, kt, dtype=torch.float32, device=dev) if with_stats else _unused(dev)
    colmax = torch.empty(mt, k, dtype=torch.float32, device=dev) if with_stats else _unused(dev)
    _traceable(_swiglu_grad_kernel)[(n // tile, mt)](
        dh, dh.stride(0), dh.stride(1), saved, saved.stride(0), scale.contiguous() if int8 else _unused(dev), dy, m, n,
        scale.shape[-1] if int8 else 1, kt, mt * kt, rowmax, stats, row_mult if with_stats else _unused(dev), colmax,
        TILE=tile, ROWS=min(rows, tile), GROUP=GROUP, INT8=int8, STATS=with_stats, STAGES=stages, num_warps=warps)
    if not with_stats:
        return dy, None
    return dy, (rowmax, colmax)


def _in_place(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels of an op body read it. Under torch.compile inductor gives each Triton kernel
    in the op its own copy of an input that a fused producer has not yet written to memory (to
    keep the strides the kernel was traced with), and the copies ride in the producer as extra
    stores: at 1B, SwiGLU wrote its output three times for the three kernels that quantize it
    (0.90 instead of 0.52 ms per layer and micro-batch on the H100). inductor lowers as_strided by
    writing the producer's output to memory, once, and viewing it with these strides, which
    every kernel then reads as it is. Eager launches need no view (host time)."""
    return torch.as_strided(x, x.shape, x.stride()) if _TRACEABLE[0] else x


def _quantize_act(x, tile, threshold, base_threshold, fallback, seed, transposed, stats, row_mult=None, seed_t=None,
                  pre=None):
    """quantize_act; with row_mult, the transposed digits are per column of x * row_mult[:, None]
    (returned with their scales) instead of per row; with `pre` (quantize_act's or
    quantize_grad's), no statistics pass."""
    x = _in_place(x)
    m, k = x.shape
    dev = x.device
    mt, kt = num_tiles(m, tile), num_tiles(k, tile)
    cols = row_mult is not None

    if stats is None:
        stats = torch.zeros(NUM_STATS, dtype=torch.int64, device=dev)
    warps = 8 if tile == 128 else 4
    if pre is not None and cols:
        rowmax, colmax = pre
    elif pre is not None:
        rowmax, colmax = pre[0], _unused(dev)
        stats.add_(pre[1])
    else:
        rows, stats_warps, stages = STATS_BLOCK[cols]
        rowmax = torch.empty(m, kt, dtype=torch.float32, device=dev)
        colmax = torch.empty(mt, k, dtype=torch.float32, device=dev) if cols else _unused(dev)
        _traceable(_act_stats_kernel)[(mt, kt)](
            x, x.stride(0), x.stride(1), m, k, kt, rowmax, stats, row_mult if cols else _unused(dev), colmax, TILE=tile,
            ROWS=min(rows, tile), COLS=cols, STAGES=stages, num_warps=stats_warps if tile == 128 else min(stats_warps, 4))
    if isinstance(threshold, torch.Tensor):
        thr = threshold.reshape(1)
    else:  # a fill on the device, not a host-to-device copy
        thr = torch.full((1,), float(threshold), dtype=torch.float32, device=dev)
    flags = torch.empty(mt, kt, dtype=torch.int8, device=dev)
    # Two tensors, not two views of one: torch.compile cannot write a kernel's output into one
    # view while the other is live, so it would add copies (three launches per call).
    scale, inv = (torch.empty(m, dtype=torch.float32, device=dev) for _ in range(2))
    # Whole rows' scales (X for the weight gradient) or columns' (dY for it), only if transposed;
    # their own tensors, since they leave the op (fq/ops.py) and an op's outputs may not be views.
    scale_t, inv_t = ((torch.empty(k if cols else m, dtype=torch.float32, device=dev) for _ in range(2))
                      if transposed else (_unused(dev), _unused(dev)))
    spare = (_unused(dev), _unused(dev))
    rows_t, cols_t = (spare, (scale_t, inv_t)) if cols else ((scale_t, inv_t), spare)
    count = torch.empty(mt, dtype=torch.int32, device=dev)
    order = torch.empty(mt, kt, dtype=torch.int32, device=dev)
    block_t = max(triton.next_power_of_2(kt), 16)
    # Column scales: 16 columns a program, 128 tile rows a step. H100 (2026-11-24, M = 32768, K =
    # 2048 and 3072): 2.8-3.0 us, against 14-17 us for a whole launch whose 256-column programs
    # stepped one tile row at a time (16 to 128 columns, 16 to 128 rows, 2 to 8 warps swept).
    block_c = 16
    # 8 warps from 128 x 16 tile maxima on: on the H100 (2026-11-23, M = 8192) 4 warps took 28 us
    # at K = 3072 (128 x 32) against 10 us with 8, and 6.1 vs 5.7 us at K = 2048.
    _traceable(_scales_kernel)[(mt + (triton.cdiv(k, block_c) if cols else 0),)](
        rowmax, thr, float(base_threshold), flags, scale, inv, *rows_t, count, order, stats, colmax, *cols_t, m, k,
        kt, mt, FALLBACK=fallback, WRITE_ALL=transposed and not cols, TILE=tile, BLOCK_T=block_t, SPREAD=SPREAD,
        BLOCK_C=block_c, BLOCK_R=128, num_warps=8 if tile * block_t >= 2048 else 4)
    q = torch.empty(m, k, dtype=torch.int8, device=dev)
    q2 = torch.empty(m, k, dtype=torch.int8, device=dev)
    c1 = torch.empty(mt, kt, dtype=torch.float32, device=dev)
    c2 = torch.empty(mt, kt, dtype=torch.float32, device=dev)
    qt = torch.empty(k, m, dtype=torch.int8, device=dev) if transposed else _unused(dev)
    seeds = _seed_arg(seed, dev), _seed_arg(seed_t if cols else seed, dev)
    mult_t = row_mult if cols else inv_t
    # 8 warps: on the H100 (2026-11-24) 1.01-1.04x of 4 at M = 8192 and 32768, K = 2048-16384.
    _traceable(_act_quant_kernel)[(mt, kt)](
        x, x.stride(0), x.stride(1), m, k, kt, inv, flags, q, qt, mult_t, cols_t[1], c1, c2, stats, *seeds,
        TILE=tile, STOCHASTIC=seed is not None, TRANSPOSED=transposed, COLS=cols, num_warps=warps)
    if fallback:
        _traceable(_fallback_quant_kernel)[(mt, FALLBACK_SPLIT)](
            x, x.stride(0), x.stride(1), m, k, kt, inv, count, order, q, q2, qt, mult_t, cols_t[1], c1, c2, stats,
            *seeds, TILE=tile, SPLIT=FALLBACK_SPLIT, STOCHASTIC=seed is not None, TRANSPOSED=transposed, COLS=cols,
            num_warps=warps)
    else:  # no fallback lists: gemm_a_fallback then skips the tail's launch
        count = order = None
    if cols:
        return TileQuant(q, q2, scale, flags, c1, c2, stats, tile, count=count, order=order), qt, scale_t
    return TileQuant(q, q2, scale, flags, c1, c2, stats, tile, qt if transposed else None,
                     scale_t if transposed else None, count, order), None, None


# quantize_cols_t's blocks (rows, columns, warps). H100 sweep (2026-11-24) at the 1B model's four
# weights, both passes: 64 x 64 with 4 warps 124 us per block, 128 x 64 127, 64 x 128 131,
# 128 x 128 with 8 warps 136, 32 x 256 168; the earlier whole-column programs 156.
BLOCK_COLS = (64, 64, 4)


def quantize_cols_t(x: torch.Tensor, row_mult: torch.Tensor | None = None,
                    seed: Seed = None, transposed: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    x = _in_place(x)
    m, k = x.shape
    dev = x.device
    q = torch.empty((k, m) if transposed else (m, k), dtype=torch.int8, device=dev)
    scale = torch.empty(k, dtype=torch.float32, device=dev)
    amax = torch.zeros(k, dtype=torch.float32, device=dev)
    mult = row_mult if row_mult is not None else scale
    bm, bk, warps = (16, 16, 4) if INTERPRET else BLOCK_COLS
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    flags = {"HAS_MULT": row_mult is not None, "BLOCK_M": bm, "BLOCK_K": bk, "num_warps": warps}
    _traceable(_col_absmax_kernel)[grid](x, x.stride(0), x.stride(1), m, k, mult, amax, **flags)
    _traceable(_col_quant_kernel)[grid](x, x.stride(0), x.stride(1), m, k, mult, amax, q, scale,
                                        _seed_arg(seed, dev), STOCHASTIC=seed is not None, TRANSPOSED=transposed,
                                        **flags)
    return q, scale


def quantize_rows_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row digits of x (M, K) written as (K, M): the per-column ones of the view x.t(),
    stored as that view is laid out, by quantize_cols_t's two passes."""
    return quantize_cols_t(x.t(), transposed=False)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    # One row of 1024-wide chunks per program, 4 warps: on the H100 (2026-11-24) 1.10-1.22x of
    # two rows of 512 at the 1B model's weights (1.85-2.19 TB/s before, at 3 bytes per element).
    bl, bd, warps = (16, 64, 4) if INTERPRET else (1, 1024, 4)
    _traceable(_row_quant_kernel)[(triton.cdiv(m, bl),)](x, x.stride(0), x.stride(1), m, k, q, scale,
                                                         BLOCK_L=bl, BLOCK_D=bd, num_warps=warps)
    return q, scale
