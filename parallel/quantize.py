"""INT8 wire format for the FSDP collectives: per-block absmax scales, packed rows of bytes.

A row of n values is cut into nb = ceil(n / block) blocks (the last one zero-padded). Its payload
is one uint8 row of `row_bytes(n, block)` bytes:

    [ int8 q x (nb * block), padded to a multiple of 4 | fp32 scale x nb ]

scale = absmax(block) / 127, q = floor(x / scale + 0.5) clamped to [-127, 127] (or
floor(x / scale + u), u ~ U[0, 1), with stochastic rounding), x ~= q * scale. An all-zero block
has scale 0 and q 0; a NaN or Inf in a block makes the whole block dequantize to NaN, so a bad
gradient stays visible to the trainer instead of being silently clipped.

Two backends, one format: the torch code below (CPU, and the oracle) and the Triton kernels in
`quantize_triton.py` (CUDA). With round-to-nearest both write the same bytes; both sum the
dequantized rows in the same order without fused multiply-adds, so the sums match too.
"""
from __future__ import annotations

import torch

from parallel import quantize_triton

QMAX = 127.0


def num_blocks(n: int, block: int) -> int:
    return -(-n // block)


def _q_bytes(n: int, block: int) -> int:
    return -(-num_blocks(n, block) * block // 4) * 4


def row_bytes(n: int, block: int) -> int:
    """Bytes on the wire for one row of n values (~ n * (1 + 4 / block))."""
    return _q_bytes(n, block) + 4 * num_blocks(n, block)


def _use_triton(t: torch.Tensor, block: int) -> bool:
    return t.is_cuda and quantize_triton.available(block)


def quantize_rows(x: torch.Tensor, block: int, *, stochastic: bool = False,
                  residual: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """x (R, n) float -> payload (R, row_bytes(n, block)) uint8.

    `residual` (R, n) fp32, for error feedback: x + residual is quantized, and residual is
    overwritten with what the quantization lost."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: expected a 2-D (rows, n) tensor, got shape {tuple(x.shape)}")
    x = x.contiguous()
    rows, n = x.shape
    out = torch.empty(rows, row_bytes(n, block), dtype=torch.uint8, device=x.device)
    if rows == 0 or n == 0:
        return out
    if _use_triton(x, block):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()) if stochastic else 0
        quantize_triton.quantize_rows(x, out, block, _q_bytes(n, block), stochastic, residual, seed)
        return out
    nb = num_blocks(n, block)
    xf = x.float()
    if residual is not None:
        xf = xf + residual
    blocks = torch.nn.functional.pad(xf, (0, nb * block - n)).view(rows, nb, block)
    scale = blocks.abs().amax(dim=-1) / QMAX
    v = blocks / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    if stochastic:
        u = torch.rand(v.shape, generator=generator, device=v.device)
        q = torch.floor(v + u)
    else:
        q = torch.floor(v + 0.5)
    q = q.clamp_(-QMAX, QMAX)
    if residual is not None:
        residual.copy_((blocks - q * scale.unsqueeze(-1)).view(rows, -1)[:, :n])
    qb = _q_bytes(n, block)
    out[:, :qb].zero_()
    out[:, :nb * block] = q.to(torch.int8).view(rows, -1).view(torch.uint8)
    out[:, qb:] = scale.contiguous().view(torch.uint8).view(rows, -1)
    return out


def _split(payload: torch.Tensor, n: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    nb, qb = num_blocks(n, block), _q_bytes(n, block)
    q = payload[:, :nb * block].view(torch.int8).view(-1, nb, block)
    scale = payload[:, qb:].contiguous().view(torch.float32)
    return q, scale


def dequantize_rows(payload: torch.Tensor, n: int, block: int, out: torch.Tensor) -> torch.Tensor:
    """payload (R, row_bytes) -> out (R, n) in out's dtype (q * scale in fp32, then cast)."""
    rows = payload.shape[0]
    if rows == 0 or n == 0:
        return out
    if _use_triton(payload, block) and out.is_contiguous():
        quantize_triton.dequantize_rows(payload, out, n, block, _q_bytes(n, block))
        return out
    q, scale = _split(payload, n, block)
    values = (q.float() * scale.unsqueeze(-1)).view(rows, -1)[:, :n]
    out.copy_(values)
    return out


def dequantize_sum(payload: torch.Tensor, n: int, block: int, out: torch.Tensor) -> torch.Tensor:
    """payload (R, row_bytes) -> out (n,) = sum over rows of the dequantized rows, in fp32,
    rows added in order 0, 1, ..., R-1 (the same order on every backend)."""
    rows = payload.shape[0]
    if n == 0:
        return out
    if _use_triton(payload, block) and out.is_contiguous():
        quantize_triton.dequantize_sum(payload, out, n, block, _q_bytes(n, block))
        return out
    q, scale = _split(payload, n, block)
    acc = torch.zeros(num_blocks(n, block), block, dtype=torch.float32, device=payload.device)
    for r in range(rows):
        acc += q[r].float() * scale[r].unsqueeze(-1)
    out.copy_(acc.view(-1)[:n])
    return out
