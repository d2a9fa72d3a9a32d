"""Pure-torch FQ: the oracle the Triton kernels must match bit for bit, and the CPU path.

Format (docs/fq.md): an activation operand A (M x K, K the contraction dim) is cut into square
tiles. A tile in which some row's absmax exceeds `threshold` times that row's median tile absmax
"falls back" (a channel outlier, see `spikes`). Plain tiles use a
K-independent per-row scale s[m] computed without the fallback tiles, so the GEMM can apply
row x column scales once, in the epilogue. A fallback tile is stored relative to that same row
scale, z = a / s[m], as two INT8 digits with their own tile multipliers: z ~ c1*q + c2*q2
(~15 bits). Weights are quantized per output row (forward) or per column (input gradient).
The weight-gradient GEMM contracts over X's rows, so its X is plain row-wise INT8 (the row's
absmax scale, no fallback): folding the smaller fallback-row scales into dY instead loses the
products of exactly the rows fallback was meant to protect (docs/fq.md, "Weight gradient").

Every function here is vectorized torch (no loops over tiles); integer GEMMs run in float32
when K * 127**2 < 2**24 and in float64 otherwise, both exact. A few `bool(...)` checks skip
work when there is no fallback or NaN: fine on CPU, a sync per call on GPU (tests only there).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fq.swiglu import swiglu_backward, swiglu_forward

QMAX = 127.0
# Entries of the stats vector: counts of one quantization, or a layer's running totals.
STAT_FALLBACK, STAT_CRUSHED, STAT_SATURATED, STAT_NONFINITE, STAT_TILES = range(5)
NUM_STATS = 5


@dataclass
class TileQuant:
    """An activation operand quantized along its rows, with fallback tiles."""

    q: torch.Tensor  # (M, K) int8: round(a / s[m]) in plain tiles, q1 in fallback tiles
    q2: torch.Tensor  # (M, K) int8 residual digit; defined in fallback tiles only
    scale: torch.Tensor  # (M,) fp32 row scale s[m]; NaN where the row holds NaN/Inf
    flags: torch.Tensor  # (Mt, Kt) fallback tiles: bool here, int8 0/1 from the Triton path
    c1: torch.Tensor  # (Mt, Kt) fp32 tile multiplier of q (0 in plain tiles)
    c2: torch.Tensor  # (Mt, Kt) fp32 tile multiplier of q2 (0 in plain tiles)
    stats: torch.Tensor  # (5,) int64: fallback tiles, crushed tiles, saturated values, non-finite values, tiles
    tile: int
    qt: torch.Tensor | None = None  # (K, M) int8: round(a / scale_t[m]) transposed, for the weight gradient
    scale_t: torch.Tensor | None = None  # (M,) fp32 absmax(row) / 127 (no fallback); NaN on NaN/Inf rows
    # The Triton GEMM's fallback lists, written by the Triton quantization (as fallback_lists
    # defines them) when fallback is on; the reference GEMM does not need them, so the
    # reference leaves them None.
    count: torch.Tensor | None = None  # (Mt,) int32 fallback tiles per tile row
    order: torch.Tensor | None = None  # (Mt, Kt) int32 their K-tile indices first, ascending


def num_tiles(n: int, tile: int) -> int:
    return (n + tile - 1) // tile


def _tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    """(M, K) -> zero-padded fp32 tiles (Mt, Kt, T, T), contiguous so tile reductions are fast."""
    m, k = x.shape
    mt, kt = num_tiles(m, tile), num_tiles(k, tile)
    xp = torch.zeros(mt * tile, kt * tile, dtype=torch.float32, device=x.device)
    xp[:m, :k] = x
    return xp.view(mt, tile, kt, tile).transpose(1, 2).contiguous()


def _untile(xt: torch.Tensor, m: int, k: int) -> torch.Tensor:
    mt, kt, t, _ = xt.shape
    return xt.transpose(1, 2).reshape(mt * t, kt * t)[:m, :k]


def _per_tile(v: torch.Tensor) -> torch.Tensor:
    """(Mt, Kt) -> broadcastable against (Mt, Kt, T, T)."""
    return v[:, :, None, None]


def _tile_amax(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(2).amax(dim=2)


def _finite_only(v: torch.Tensor) -> torch.Tensor:
    return v if bool(torch.isfinite(v).all()) else torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def _round(z: torch.Tensor, seed: int | torch.Tensor | None) -> torch.Tensor:
    """Round to nearest even, or stochastically (floor(z + u), u ~ U[0, 1)) when a seed is given
    (an int, or a one-element tensor as FQLinear's device counter gives)."""
    if seed is None:
        return torch.round(z)  # ties to even, as the Triton kernels' 1.5 * 2**23 trick
    gen = torch.Generator(device=z.device).manual_seed(int(seed))
    u = torch.rand(z.shape, generator=gen, device=z.device, dtype=torch.float32)
    return torch.floor(z + u)


def _to_int8(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamp rounded values to [-127, 127]; also return how many were clamped."""
    saturated = (r.abs() > QMAX).sum()
    return r.clamp(-QMAX, QMAX).to(torch.int8), saturated


def _div(a, b) -> torch.Tensor:
    """IEEE division like Triton's div_rn. torch turns `t / scalar` on CUDA and `scalar / t`
    everywhere into a reciprocal and a multiply (two roundings), so divide tensor by tensor."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.div(a, b)


def scales_from_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and inverse scale per row from its absmax (inf marks NaN/Inf in the row).

    An all-zero row gets scale 1; a non-finite row gets scale NaN so the GEMM output of that row
    is NaN rather than silently finite."""
    pos = absmax > 0
    scale = torch.where(pos, _div(absmax, QMAX), torch.ones_like(absmax))
    inv = torch.where(pos, _div(QMAX, absmax), torch.ones_like(absmax))
    scale = torch.where(torch.isinf(absmax), torch.full_like(absmax, float("nan")), scale)
    return scale, inv


def spikes(rowmax: torch.Tensor, threshold) -> torch.Tensor:
    """(M, Kt) bool: the row's absmax in that K tile exceeds `threshold` times the row's median
    tile absmax (the lower median over its Kt tiles). A whole large row (a token outlier) has
    none, since its row scale absorbs it; a channel outlier is a spike in every row."""
    kt = rowmax.shape[1]
    med = rowmax.kthvalue((kt - 1) // 2 + 1, dim=1).values
    thr = torch.as_tensor(threshold, dtype=torch.float32, device=rowmax.device)
    return (rowmax > thr * med[:, None]) & (med > 0)[:, None]


def _tile_stats(xt: torch.Tensor, m: int, k: int, tile: int, threshold, base_threshold: float, fallback: bool):
    """Per-(row, K-tile) absmax, fallback flags, and the counts of one pass over x (M, K), given
    cut into tiles (Mt, Kt, T, T). A tile falls back when one of its rows has a spike there
    (`spikes`) and it holds no NaN/Inf (those must reach the row scale).

    Returns rowmax (M, Kt) fp32 (inf where a NaN/Inf sits), flags (Mt, Kt) bool, and stats (5,)
    int64 with the saturated entry still 0 (quantization fills it)."""
    dev = xt.device
    mt, kt = xt.shape[:2]
    ax = xt.abs()
    rowmax = ax.amax(dim=3)  # (Mt, Kt, T)
    tile_nonfinite = torch.zeros(mt, kt, dtype=torch.int64, device=dev)
    if not bool(torch.isfinite(rowmax).all()):
        nonfinite = ~torch.isfinite(xt)
        tile_nonfinite = nonfinite.flatten(2).sum(dim=2)
        rowmax = torch.where(nonfinite.any(dim=3), torch.full_like(rowmax, float("inf")), rowmax)
    rowmax = rowmax.transpose(1, 2).reshape(-1, kt)[:m]  # (M, Kt)
    finite = tile_nonfinite == 0

    def tiles_with_spikes(thr):
        s = torch.zeros(mt * tile, kt, dtype=torch.bool, device=dev)
        s[:m] = spikes(rowmax, thr)
        return s.view(mt, tile, kt).any(dim=1) & finite

    flags = tiles_with_spikes(threshold) if fallback else torch.zeros_like(finite)
    crushed = tiles_with_spikes(base_threshold) & ~flags
    n = flags.sum()
    stats = torch.stack([n, crushed.sum(), torch.zeros_like(n), tile_nonfinite.sum(),
                         torch.full_like(n, flags.numel())]).long()
    return rowmax, flags, stats


# A row's scale is at least absmax(row) / SPREAD, so in its fallback tiles z = a / s[m] stays
# below 127 * SPREAD. Without the floor, a row whose plain tiles are near zero (a token with
# almost no gradient outside one tile) has a huge z there, the tile's multipliers follow it, and
# the tile's other rows round to zero in both digits (docs/fq.md). The price: rows whose
# outliers exceed SPREAD times their plain values quantize those plain values more coarsely.
SPREAD = 1024.0


def row_scales(rowmax: torch.Tensor, flags: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row scale from the plain tiles only (fallback tiles carry their own multipliers), floored
    at absmax(row) / SPREAD."""
    flag_rows = flags.repeat_interleave(tile, dim=0)[: rowmax.shape[0]]
    plain = torch.where(flag_rows, torch.zeros_like(rowmax), rowmax).amax(dim=1)
    return scales_from_absmax(torch.maximum(plain, rowmax.amax(dim=1) / SPREAD))


def quantize_act(x: torch.Tensor, tile: int, threshold: torch.Tensor | float, base_threshold: float,
                 fallback: bool, seed: int | None = None, transposed: bool = False,
                 stats: torch.Tensor | None = None, pre: None = None) -> TileQuant:
    """Quantize an activation operand (M, K) along its rows, with fallback tiles; `transposed`
    also returns the plain row-wise (K, M) digits the weight-gradient GEMM reads. The counts are
    added into `stats` (int64 (5,), e.g. a layer's running totals) when given, else returned fresh.
    `pre` is the Triton path's (x's statistics from its swiglu); the reference's swiglu gives None."""
    xt = _tiles(x, tile)
    rowmax, flags, call_stats = _tile_stats(xt, *x.shape, tile, threshold, base_threshold, fallback)
    a = quantize_with_flags(x, xt, rowmax, flags, call_stats, tile, seed, transposed)
    if stats is not None:
        stats += a.stats
        a.stats = stats
    return a


def quantize_grad(dy: torch.Tensor, tile: int, threshold: torch.Tensor | float, base_threshold: float,
                  fallback: bool, row_mult: torch.Tensor, seed: int | None = None, seed_t: int | None = None,
                  stats: torch.Tensor | None = None, pre: None = None) -> tuple[TileQuant, torch.Tensor, torch.Tensor]:
    """The output gradient for both backward GEMMs: its rows with fallback tiles (input gradient)
    and its columns with X's row scales folded in, transposed (weight gradient). `pre` is the
    Triton path's (statistics computed by its swiglu_grad); the reference's swiglu_grad gives None."""
    return (quantize_act(dy, tile, threshold, base_threshold, fallback, seed=seed, stats=stats),
            *quantize_cols_t(dy, row_mult, seed_t))


def swiglu(y: torch.Tensor, int8: bool, tile: int, with_stats: bool):
    """fq.swiglu.swiglu_forward; the next layer's quantize_act takes h's statistics itself (the
    Triton path computes them here, in the same kernel)."""
    return (*swiglu_forward(y, int8), None)


def swiglu_grad(dh: torch.Tensor, saved: torch.Tensor, scale: torch.Tensor, int8: bool,
                row_mult: torch.Tensor | None, tile: int, stats: torch.Tensor) -> tuple[torch.Tensor, None]:
    """fq.swiglu.swiglu_backward; quantize_grad takes dY's statistics itself (the Triton path
    computes them here, in the same kernel)."""
    return swiglu_backward(dh, saved, scale, int8), None


def fallback_lists(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile row: how many fallback tiles, and their K-tile indices first, ascending (the
    Triton GEMM's tail walks these; entries past the count carry no meaning)."""
    f = flags.to(torch.int8)
    order = torch.sort(f, dim=1, descending=True, stable=True).indices.to(torch.int32)
    return f.sum(dim=1, dtype=torch.int32), order


def quantize_with_flags(x: torch.Tensor, xt: torch.Tensor, rowmax: torch.Tensor, flags: torch.Tensor,
                        stats: torch.Tensor, tile: int, seed: int | None = None, transposed: bool = False) -> TileQuant:
    """quantize_act after the fallback decision, for any flags (tools/fallback_study.py tries
    other tests); xt, rowmax and stats as _tiles and _tile_stats give them."""
    m, k = x.shape
    scale, inv = row_scales(rowmax, flags, tile)
    mt, kt = flags.shape
    inv_p = torch.ones(mt * tile, device=x.device)
    inv_p[:m] = inv
    z = _finite_only(xt * inv_p.view(mt, 1, tile, 1))
    stats = stats.clone()
    if not bool(flags.any()):
        q, stats[STAT_SATURATED] = _to_int8(_round(z, seed))
        zeros = torch.zeros_like(flags, dtype=torch.float32)
        return _with_transposed(TileQuant(_untile(q, m, k).contiguous(), torch.zeros(m, k, dtype=torch.int8,
                                device=x.device), scale, flags, zeros, zeros.clone(), stats, tile), x, rowmax,
                                seed, transposed)
    f = _per_tile(flags)
    az = _tile_amax(z.abs())
    c1 = torch.where(flags, _div(az, QMAX), torch.zeros_like(az))
    inv1 = torch.where(flags & (az > 0), _div(QMAX, az), torch.ones_like(az))
    q, sat = _to_int8(_round(z * _per_tile(inv1), seed))
    resid = z - q.float() * _per_tile(c1)
    ar = _tile_amax(torch.where(f, resid.abs(), torch.zeros_like(resid)))
    c2 = torch.where(flags, _div(ar, QMAX), torch.zeros_like(ar))
    inv2 = torch.where(flags & (ar > 0), _div(QMAX, ar), torch.zeros_like(ar))
    r2 = torch.where(f, _round(resid * _per_tile(inv2), None if seed is None else seed + 1), torch.zeros_like(resid))
    q2, sat2 = _to_int8(r2)
    stats[STAT_SATURATED] = sat + sat2
    return _with_transposed(TileQuant(_untile(q, m, k).contiguous(), _untile(q2, m, k).contiguous(), scale, flags,
                                      c1, c2, stats, tile), x, rowmax, seed, transposed)


def _with_transposed(a: TileQuant, x: torch.Tensor, rowmax: torch.Tensor, seed: int | None,
                     transposed: bool) -> TileQuant:
    """Add the weight gradient's operand: x per row at its absmax scale, transposed (K, M)."""
    if transposed:
        a.scale_t, inv = scales_from_absmax(rowmax.amax(dim=1))
        z = _finite_only(x.float() * inv[:, None])
        a.qt = _to_int8(_round(z, seed))[0].t().contiguous()  # |z| <= 127: nothing saturates
    return a


def _absmax_marking_nonfinite(xf: torch.Tensor, dim: int) -> torch.Tensor:
    """absmax along dim; inf wherever the slice holds a NaN or Inf."""
    absmax = xf.abs().amax(dim=dim)
    if bool(torch.isfinite(absmax).all()):
        return absmax
    return torch.where(torch.isfinite(xf), xf.abs(), torch.full_like(xf, float("inf"))).amax(dim=dim)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row INT8 (weights in the forward GEMM): q (M, K) int8, scale (M,) fp32."""
    xf = x.float()
    scale, inv = scales_from_absmax(_absmax_marking_nonfinite(xf, dim=1))
    return torch.round(_finite_only(xf * inv[:, None])).clamp(-QMAX, QMAX).to(torch.int8), scale


def quantize_rows_t(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows written transposed: qt (K, M) int8, scale (M,). The weight gradient's X
    when a layer quantizes it in the backward (FQLinear.x_int8_in_backward): the same digits and
    scales as quantize_act(x, transposed=True)'s qt and scale_t."""
    q, scale = quantize_rows(x)
    return q.t().contiguous(), scale


def quantize_cols_t(x: torch.Tensor, row_mult: torch.Tensor | None = None,
                    seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column INT8 of (x * row_mult[:, None]), written transposed: q (N, M) int8, scale (N,).

    Weights for the input-gradient GEMM (row_mult None), and the output gradient for the
    weight-gradient GEMM with the activation row scales folded in (row_mult = s_x)."""
    xf = x.float()
    if row_mult is not None:
        xf = xf * row_mult[:, None]
    scale, inv = scales_from_absmax(_absmax_marking_nonfinite(xf, dim=0))
    q, _ = _to_int8(_round(_finite_only(xf * inv[None, :]), seed))
    return q.t().contiguous(), scale


def tail_matrix(a: TileQuant, q: torch.Tensor | None = None, q2: torch.Tensor | None = None) -> torch.Tensor | None:
    """float64 (M, K): what fallback tiles add on top of the plain INT8 product of q (default a.q);
    None if there are none."""
    flags = a.flags.bool()  # also takes the Triton path's int8 flags
    if not bool(flags.any()):
        return None
    q = a.q if q is None else q
    q2 = a.q2 if q2 is None else q2
    m, k = q.shape
    t = a.tile

    def expand(v):
        v = torch.where(flags, v, torch.zeros_like(v))
        return v.repeat_interleave(t, 0).repeat_interleave(t, 1)[:m, :k].double()

    return expand(a.c1 - 1.0) * q.double() + expand(a.c2) * q2.double()


def _exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact product of int8-valued matrices: float32 when every partial sum stays below 2**24
    (as exact as the kernel's INT32, and what its epilogue converts to), else float64."""
    dt = torch.float32 if a.shape[1] * 127 * 127 < 2**24 else torch.float64
    return a.to(dt) @ b.to(dt)


def int_sums(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """Exact INT32 a_q @ b_q^T for int8 (M, K) and (N, K)."""
    return _exact_matmul(a_q, b_q.t()).to(torch.int32)


def gemm_a_fallback(a: TileQuant, b_q: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """C (M, N) = A B^T with fallback tiles on A (M, K); B given as int8 (N, K) + scale (N,).

    Forward (A = X, B = W) and input gradient (A = dY, B = W^T quantized per column)."""
    acc = _exact_matmul(a.q, b_q.t())
    t = tail_matrix(a)
    if t is not None:
        acc = acc.double() + t @ b_q.double().t()
    return (acc * a.scale.to(acc.dtype)[:, None] * b_scale.to(acc.dtype)[None, :]).to(out_dtype)


def gemm_wgrad(a_q: torch.Tensor, a_scale: torch.Tensor, b_qt: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """C (N, K) = A B, A int8 (N, M) + scale (N,), B given as its transposed int8 digits (K, M).

    Weight gradient dW = dY^T X: A is dY per column with X's row scales `scale_t` folded in,
    B is `TileQuant.qt`, so every scale sits outside the contraction over M."""
    return (_exact_matmul(a_q, b_qt.t()) * a_scale.float()[:, None]).to(out_dtype)


def dequantize(a: TileQuant) -> torch.Tensor:
    """float32 (M, K) value the GEMMs see for a quantized activation."""
    t = tail_matrix(a)
    v = a.q.double() if t is None else a.q.double() + t
    return (v * a.scale.double()[:, None]).float()
