"""INT8 wire format for the FSDP collectives: per-block absmax scales, packed rows of bytes.

A row of n values is cut into blocks of `block` values. The row may be made of segments (the
parameters FSDP concatenated into one flat buffer): every segment then starts a new block, so a
norm weight near 1.0 never shares a scale with the 0.02-sized weights of the next matrix. The last
block of each segment is zero-padded. With nb blocks in all, the payload of a row is one uint8 row
of `row_bytes(n, block, layout)` bytes:

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


class Layout:
    """How one row of n values is cut into blocks: each segment (default: the whole row) starts
    a new block. The same on every rank, so it is never sent."""

    def __init__(self, n: int, block: int, segments: list[int] | None = None):
        if segments is None or sum(segments) != n or any(s < 0 for s in segments):
            segments = [n]
        self.n, self.block = n, block
        self.segments = [s for s in segments if s > 0]
        self.nb = sum(-(-s // block) for s in self.segments)
        self.uniform = len(self.segments) <= 1
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(block start offsets int64, block lengths int32) on `device`, built once."""
        if device not in self._tables:
            starts, lengths, offset = [], [], 0
            for seg in self.segments:
                b = torch.arange(0, seg, self.block, dtype=torch.int64)
                starts.append(b + offset)
                lengths.append((seg - b).clamp_(max=self.block).to(torch.int32))
                offset += seg
            empty = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.int32)]
            self._tables[device] = (torch.cat(starts or empty[0]).to(device),
                                    torch.cat(lengths or empty[1]).to(device))
        return self._tables[device]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(R, n) -> (R, nb * block): every segment zero-padded to whole blocks."""
        if self.uniform:
            return torch.nn.functional.pad(x, (0, self.nb * self.block - self.n))
        parts = [torch.nn.functional.pad(p, (0, -(-p.shape[1] // self.block) * self.block - p.shape[1]))
                 for p in x.split(self.segments, dim=1)]
        return torch.cat(parts, dim=1)

    def unpad(self, xp: torch.Tensor) -> torch.Tensor:
        """(R, nb * block) -> (R, n), the inverse of `pad`."""
        if self.uniform:
            return xp[:, :self.n]
        padded = [-(-s // self.block) * self.block for s in self.segments]
        return torch.cat([p[:, :s] for p, s in zip(xp.split(padded, dim=1), self.segments)], dim=1)


def _layout(n: int, block: int, layout: Layout | None) -> Layout:
    if layout is None:
        return Layout(n, block)
    if layout.n != n or layout.block != block:
        raise ValueError(f"layout for {layout.n} values in blocks of {layout.block} used for {n} in {block}")
    return layout


def _q_bytes(nb: int, block: int) -> int:
    return -(-nb * block // 4) * 4


def row_bytes(n: int, block: int, layout: Layout | None = None) -> int:
    """Bytes on the wire for one row of n values (~ n * (1 + 4 / block))."""
    nb = _layout(n, block, layout).nb
    return _q_bytes(nb, block) + 4 * nb


def _use_triton(t: torch.Tensor, block: int) -> bool:
    return t.is_cuda and quantize_triton.available(block)


def quantize_rows(x: torch.Tensor, block: int, *, layout: Layout | None = None,
                  stochastic: bool = False, residual: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """x (R, n) float -> payload (R, row_bytes(n, block, layout)) uint8.

    `residual` (R, n) fp32, for error feedback: x + residual is quantized, and residual is
    overwritten with what the quantization lost."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: expected a 2-D (rows, n) tensor, got shape {tuple(x.shape)}")
    rows, n = x.shape
    lay = _layout(n, block, layout)
    nb, qb = lay.nb, _q_bytes(lay.nb, block)
    out = torch.empty(rows, qb + 4 * nb, dtype=torch.uint8, device=x.device)
    if rows == 0 or nb == 0:
        return out
    if _use_triton(x, block) and x.stride(1) == 1 and (residual is None or residual.stride(1) == 1):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item()) if stochastic else 0
        quantize_triton.quantize_rows(x, out, lay.tables(x.device), block, qb, stochastic, residual, seed)
        return out
    xf = x.float()
    if residual is not None:
        xf = xf + residual
    blocks = lay.pad(xf).reshape(rows, nb, block)
    scale = blocks.abs().amax(dim=-1) / QMAX
    v = blocks / torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(-1)
    if stochastic:
        u = torch.rand(v.shape, generator=generator, device=v.device)
        q = torch.floor(v + u)
    else:
        q = torch.floor(v + 0.5)
    q = q.clamp_(-QMAX, QMAX)
    if residual is not None:
        residual.copy_(lay.unpad((blocks - q * scale.unsqueeze(-1)).view(rows, -1)))
    out[:, :qb].zero_()
    out[:, :nb * block] = q.to(torch.int8).view(rows, -1).view(torch.uint8)
    out[:, qb:] = scale.contiguous().view(torch.uint8).view(rows, -1)
    return out


def _split(payload: torch.Tensor, lay: Layout) -> tuple[torch.Tensor, torch.Tensor]:
    nb, block = lay.nb, lay.block
    q = payload[:, :nb * block].view(torch.int8).view(-1, nb, block)
    scale = payload[:, _q_bytes(nb, block):].contiguous().view(torch.float32)
    return q, scale


def dequantize_rows(payload: torch.Tensor, n: int, block: int, out: torch.Tensor,
                    layout: Layout | None = None) -> torch.Tensor:
    """payload (R, row_bytes) -> out (R, n) in out's dtype (q * scale in fp32, then cast)."""
    lay = _layout(n, block, layout)
    rows = payload.shape[0]
    if rows == 0 or lay.nb == 0:
        return out
    if _use_triton(payload, block) and out.stride(1) == 1:
        quantize_triton.dequantize_rows(payload, out, lay.tables(payload.device), block, _q_bytes(lay.nb, block))
        return out
    q, scale = _split(payload, lay)
    out.copy_(lay.unpad((q.float() * scale.unsqueeze(-1)).view(rows, -1)))
    return out


def dequantize_sum(payload: torch.Tensor, n: int, block: int, out: torch.Tensor,
                   layout: Layout | None = None) -> torch.Tensor:
    """payload (R, row_bytes) -> out (n,) = sum over rows of the dequantized rows, in fp32,
    rows added in order 0, 1, ..., R-1 (the same order on every backend)."""
    lay = _layout(n, block, layout)
    if lay.nb == 0:
        return out
    if _use_triton(payload, block) and out.is_contiguous():
        quantize_triton.dequantize_sum(payload, out, lay.tables(payload.device), block, _q_bytes(lay.nb, block))
        return out
    q, scale = _split(payload, lay)
    acc = torch.zeros(lay.nb, block, dtype=torch.float32, device=payload.device)
    for r in range(payload.shape[0]):
        acc += q[r].float() * scale[r].unsqueeze(-1)
    out.copy_(lay.unpad(acc.view(1, -1))[0])
    return out
