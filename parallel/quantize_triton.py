"""Triton kernels for the INT8 wire format of `quantize.py` (CUDA path; the format is documented
there). One program handles GROUP blocks of one row: a single pass over the input writes the
packed int8 values and the fp32 scales straight into the payload that goes on the wire.

Bit-exactness with the torch path: divisions are correctly rounded (`div_rn`, as torch divides),
and the dequantizing kernels are launched with fused multiply-adds off.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with CUDA torch wheels
    triton = None

# Blocks per program: 8 x 256 values keeps each program's loads wide and the grid large.
GROUP_ELEMENTS = 2048


def available(block: int) -> bool:
    """Kernels need a power-of-two block (tl.arange) of at least 4 bytes (aligned scales)."""
    return triton is not None and block >= 4 and block & (block - 1) == 0


def _group(block: int) -> int:
    return max(1, GROUP_ELEMENTS // block)


if triton is not None:

    @triton.jit
    def _block_columns(starts_ptr, lengths_ptr, nb, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        """This program's GROUP blocks: payload columns, input columns, and which are real."""
        blk = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
        in_row = blk < nb
        start = tl.load(starts_ptr + blk, mask=in_row, other=0)
        length = tl.load(lengths_ptr + blk, mask=in_row, other=0)
        j = tl.arange(0, BLOCK)[None, :]
        pcol = blk[:, None].to(tl.int64) * BLOCK + j
        col = start[:, None] + j
        return blk, in_row, pcol, col, j < length[:, None]

    @triton.jit
    def _quantize_kernel(x_ptr, res_ptr, q_ptr, s_ptr, starts_ptr, lengths_ptr, x_stride, res_stride,
                         nb, row_bytes, q_bytes, seed, BLOCK: tl.constexpr, GROUP: tl.constexpr,
                         STOCHASTIC: tl.constexpr, FEEDBACK: tl.constexpr):
        row = tl.program_id(1).to(tl.int64)
        blk, in_row, pcol, col, mask = _block_columns(starts_ptr, lengths_ptr, nb, BLOCK, GROUP)
        x = tl.load(x_ptr + row * x_stride + col, mask=mask, other=0.0).to(tl.float32)
        if FEEDBACK:
            x = x + tl.load(res_ptr + row * res_stride + col, mask=mask, other=0.0)
        scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)
        safe = tl.where(scale > 0, scale, 1.0)
        v = tl.math.div_rn(x, safe[:, None])
        if STOCHASTIC:
            u = tl.rand(seed, (row * nb * BLOCK + pcol).to(tl.uint32))
            q = tl.floor(v + u)
        else:
            q = tl.floor(v + 0.5)
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        if FEEDBACK:
            tl.store(res_ptr + row * res_stride + col, x - q * scale[:, None], mask=mask)
        q8 = q.to(tl.int8).to(tl.uint8, bitcast=True)
        tl.store(q_ptr + row * row_bytes + pcol, q8, mask=in_row[:, None])
        tl.store(s_ptr + (row * row_bytes + q_bytes) // 4 + blk, scale, mask=in_row)

    @triton.jit
    def _dequantize_kernel(q_ptr, s_ptr, out_ptr, starts_ptr, lengths_ptr, out_stride, nb, row_bytes, q_bytes,
                           BLOCK: tl.constexpr, GROUP: tl.constexpr):
        row = tl.program_id(1).to(tl.int64)
        blk, in_row, pcol, col, mask = _block_columns(starts_ptr, lengths_ptr, nb, BLOCK, GROUP)
        q = tl.load(q_ptr + row * row_bytes + pcol, mask=mask, other=0)
        q = q.to(tl.int8, bitcast=True).to(tl.float32)
        s = tl.load(s_ptr + (row * row_bytes + q_bytes) // 4 + blk, mask=in_row, other=0.0)
        tl.store(out_ptr + row * out_stride + col, (q * s[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize_sum_kernel(q_ptr, s_ptr, out_ptr, starts_ptr, lengths_ptr, nb, row_bytes,
                               q_bytes, ROWS: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr):
        blk, in_row, pcol, col, mask = _block_columns(starts_ptr, lengths_ptr, nb, BLOCK, GROUP)
        acc = tl.zeros((GROUP, BLOCK), dtype=tl.float32)
        # Pointers advance row by row: 64-bit arithmetic however large the payload.
        q_row = q_ptr
        s_row = s_ptr + q_bytes // 4
        # ROWS (the group size) is a compile-time constant: one kernel per group size.
        for _ in tl.static_range(ROWS):
            q = tl.load(q_row + pcol, mask=mask, other=0)
            q = q.to(tl.int8, bitcast=True).to(tl.float32)
            s = tl.load(s_row + blk, mask=in_row, other=0.0)
            acc = acc + q * s[:, None]
            q_row += row_bytes
            s_row += row_bytes // 4
        tl.store(out_ptr + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(nb: int, block: int, rows: int = 1):
    return (triton.cdiv(nb, _group(block)), rows)


def quantize_rows(x: torch.Tensor, out: torch.Tensor, tables, block: int, q_bytes: int,
                  stochastic: bool, residual: torch.Tensor | None, seed: int) -> None:
    """x and residual: (R, n) with unit stride along n (any row stride)."""
    starts, lengths = tables
    nb = starts.numel()
    res = residual if residual is not None else x
    _quantize_kernel[_grid(nb, block, x.shape[0])](
        x, res, out, out.view(torch.float32), starts, lengths, x.stride(0), res.stride(0),
        nb, out.shape[1], q_bytes, seed,
        BLOCK=block, GROUP=_group(block), STOCHASTIC=stochastic, FEEDBACK=residual is not None,
        enable_fp_fusion=False)


def dequantize_rows(payload: torch.Tensor, out: torch.Tensor, tables, block: int, q_bytes: int) -> None:
    """out: (R, n) with unit stride along n (any row stride)."""
    starts, lengths = tables
    nb = starts.numel()
    _dequantize_kernel[_grid(nb, block, payload.shape[0])](
        payload, payload.view(torch.float32), out, starts, lengths, out.stride(0), nb, payload.shape[1],
        q_bytes, BLOCK=block, GROUP=_group(block), enable_fp_fusion=False)


def dequantize_sum(payload: torch.Tensor, out: torch.Tensor, tables, block: int, q_bytes: int) -> None:
    starts, lengths = tables
    nb = starts.numel()
    _dequantize_sum_kernel[_grid(nb, block)](
        payload, payload.view(torch.float32), out, starts, lengths, nb, payload.shape[1], q_bytes,
        ROWS=payload.shape[0], BLOCK=block, GROUP=_group(block), enable_fp_fusion=False)
