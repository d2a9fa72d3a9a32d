"""INT8 (and bf16-cast) collectives that FSDP2 calls in place of its own, and a byte counter.

- `Int8AllGather`: quantize the local shard, one uint8 all-gather, dequantize every row, the
  own row too, so every rank holds bitwise identical unsharded weights.
- `Int8ReduceScatter`: quantize the row meant for each destination rank, `all_to_all_single`,
  dequantize and sum in fp32 in rank order (ZeRO++ qgZ style). It only sums: FSDP runs with
  force-sum and divides afterwards. Optional stochastic rounding and error feedback.
- `Int8ReplicaAllReduce`: HSDP's cross-replica (cross-node) gradient all-reduce in INT8:
  an INT8 reduce-scatter as above, then an INT8 all-gather of the summed chunks.
- `Bf16AllGather`: bf16 on the wire when the compute dtype is fp32 (CPU runs).

Wire format: `quantize.py`. FSDP hands these collectives flat buffers whose length is a
multiple of the group size (it pads every parameter's dim 0), so uneven shards, norms and
ranks whose shard is all padding need no special case here.
"""
from __future__ import annotations

import collections
from typing import Sequence

import torch
import torch.distributed as dist

from parallel.fsdp_hooks import AllGather, ReduceScatter
from parallel.quantize import Layout, dequantize_rows, dequantize_sum, quantize_rows

_STATS: collections.Counter = collections.Counter()


def comm_stats() -> dict[str, int]:
    """Bytes this rank handed to the collectives run by parallel/ (INT8 and bf16-cast), and call
    counts, since the last reset: keys `{all_gather,reduce_scatter,replica_all_reduce}_{bytes,calls}`.
    FSDP's own bf16/fp32 collectives are not counted."""
    return dict(_STATS)


def reset_comm_stats() -> None:
    _STATS.clear()


def _count(kind: str, nbytes: int) -> None:
    _STATS[f"{kind}_bytes"] += nbytes
    _STATS[f"{kind}_calls"] += 1


class _PlainAlloc:
    def allocate(self, size: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)


class _Blocks:
    """Block layout of one rank's row: each parameter of the FSDP group starts a new block
    (`segments`: the parameters' padded shard sizes, in FSDP's order). A row that does not add
    up to the segments (e.g. a reduce-scatter without some parameters' gradients) is cut into
    plain blocks."""

    def __init__(self, block: int, segments: list[int] | None):
        self.block = block
        self.segments = segments
        self._layouts: dict[int, Layout] = {}

    def layout(self, n: int) -> Layout:
        if n not in self._layouts:
            self._layouts[n] = Layout(n, self.block, self.segments)
        return self._layouts[n]


class Int8AllGather(_PlainAlloc, _Blocks, AllGather):
    def __init__(self, block: int, segments: list[int] | None = None):
        _Blocks.__init__(self, block, segments)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False):
        if not input_tensor.is_floating_point():
            # FSDP packs parameters of mixed dtypes as raw bytes: nothing to quantize.
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        world, n = group.size(), input_tensor.numel()
        layout = self.layout(n)
        # input_tensor is this rank's slot of output_tensor: quantize it before anything lands.
        # (Pipelining pieces of the row through async all-gathers was measured slower on
        # NVLink: docs/benchmarks.md.)
        send = quantize_rows(input_tensor.view(1, n), self.block, layout=layout)
        recv = torch.empty(world, send.shape[1], dtype=torch.uint8, device=send.device)
        _count("all_gather", send.numel())
        dist.all_gather_into_tensor(recv, send, group=group)
        dequantize_rows(recv, n, self.block, output_tensor.view(world, n), layout)
        return None


class Bf16AllGather(_PlainAlloc, AllGather):
    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False):
        if not input_tensor.is_floating_point():
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        send = input_tensor.to(torch.bfloat16)
        recv = torch.empty(output_tensor.numel(), dtype=torch.bfloat16, device=send.device)
        _count("all_gather", send.numel() * 2)
        dist.all_gather_into_tensor(recv, send, group=group)
        output_tensor.copy_(recv)
        return None


def _sum_only(op) -> bool:
    """True for SUM; False for AVG (the caller divides); anything else is refused."""
    if op == dist.ReduceOp.SUM:
        return True
    if op == dist.ReduceOp.AVG:
        return False
    raise ValueError(f"INT8 reduce-scatter supports SUM and AVG, got {op}; "
                     f"enable FSDP force-sum (parallel.fsdp does) so FSDP divides instead")


class Int8ReduceScatter(_PlainAlloc, _Blocks, ReduceScatter):
    def __init__(self, block: int, stochastic: bool = False, error_feedback: bool = False,
                 segments: list[int] | None = None):
        _Blocks.__init__(self, block, segments)
        self.stochastic = stochastic
        self.error_feedback = error_feedback
        # What quantization lost last time, per element of this rank's unsharded gradient
        # (fp32): the memory cost of error feedback. Saved in checkpoints (parallel.fsdp).
        self.residual: torch.Tensor | None = None

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op=dist.ReduceOp.SUM, async_op: bool = False):
        is_sum = _sum_only(op)
        world, n = group.size(), output_tensor.numel()
        rows = input_tensor.view(world, n)
        residual = None
        if self.error_feedback:
            if self.residual is None or self.residual.shape != rows.shape or self.residual.device != rows.device:
                self.residual = torch.zeros(rows.shape, dtype=torch.float32, device=rows.device)
            residual = self.residual
        layout = self.layout(n)
        send = quantize_rows(rows, self.block, layout=layout, stochastic=self.stochastic, residual=residual)
        recv = torch.empty_like(send)
        _count("reduce_scatter", send.numel())
        dist.all_to_all_single(recv, send, group=group)
        dequantize_sum(recv, n, self.block, output_tensor, layout)
        if not is_sum:
            output_tensor.div_(world)
        return None


class Int8ReplicaAllReduce(_Blocks):
    """In-place sum of a flat fp32 tensor across `group` (the replicas of HSDP), INT8 on the wire.

    Every replica ends with bitwise the same result (each dequantizes all chunks, its own too),
    so replicated parameters never drift apart. The row is first spread out so that every
    parameter starts a block, then cut into one chunk of whole blocks per replica."""

    def __init__(self, group: dist.ProcessGroup, block: int, stochastic: bool = False,
                 segments: list[int] | None = None):
        _Blocks.__init__(self, block, segments)
        self.group = group
        self.stochastic = stochastic

    def __call__(self, tensor: torch.Tensor) -> None:
        world, n = self.group.size(), tensor.numel()
        if world == 1 or n == 0:
            return
        layout = self.layout(n)
        chunk = -(-layout.nb // world) * self.block
        flat = torch.zeros(world * chunk, dtype=torch.float32, device=tensor.device)
        spread = layout.pad(tensor.view(1, n).float())[0]
        flat[:spread.numel()] = spread
        send = quantize_rows(flat.view(world, chunk), self.block, stochastic=self.stochastic)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        partial = dequantize_sum(recv, chunk, self.block, torch.empty(chunk, dtype=torch.float32, device=tensor.device))
        send2 = quantize_rows(partial.view(1, chunk), self.block)
        recv2 = torch.empty(world, send2.shape[1], dtype=torch.uint8, device=tensor.device)
        dist.all_gather_into_tensor(recv2, send2, group=self.group)
        dequantize_rows(recv2, chunk, self.block, flat.view(world, chunk))
        tensor.view(-1).copy_(layout.unpad(flat[:spread.numel()].view(1, -1))[0])
        _count("replica_all_reduce", send.numel() + send2.numel())
