"""SwiGLU, silu(gate) * up, that can save its inputs for the backward as INT8 (fq.swiglu_int8).

In a Llama block the gate and up projections' output (tokens x 2 * ffn_hidden, BF16) is the
largest activation kept for the backward: 4 of the ~12 GiB of activations at 1B. With `int8`
it is kept as INT8 with one FP32 scale per 128 consecutive values of a row (absmax / 127, round
to nearest), half the bytes. The forward output is exact; only the SwiGLU backward sees the
rounding, an error of at most half a step (absmax / 254) per value, finer than the 128 x 128
tiles the backward GEMMs already quantize dY with. Pure torch: under torch.compile inductor
fuses the quantization into the kernel that computes silu(gate) * up, and the dequantization
into the backward's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 128


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 digits (x's shape) and FP32 scales (x's shape with the last dim in groups of GROUP,
    the last group zero-padded). A zero group has scale 0 and digits 0; a non-finite value makes
    its group's scale non-finite, so the dequantized group is NaN (never silently finite)."""
    n = x.shape[-1]
    pad = -n % GROUP
    xf = F.pad(x.float(), (0, pad)).unflatten(-1, (-1, GROUP))
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, xf / scale, 0.0).round().clamp(-127, 127).to(torch.int8)
    return q.flatten(-2)[..., :n], scale.squeeze(-1)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n = q.shape[-1]
    qf = F.pad(q.float(), (0, -n % GROUP)).unflatten(-1, (-1, GROUP))
    return (qf * scale.unsqueeze(-1)).flatten(-2)[..., :n]


class _SwiGLUInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(*quantize_groups(gate), *quantize_groups(up))
        ctx.dtypes = gate.dtype, up.dtype
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gq, gs, uq, us = ctx.saved_tensors
        g, u = dequantize_groups(gq, gs), dequantize_groups(uq, us)
        sig = torch.sigmoid(g)
        dyf = dy.float()
        dgate = dyf * u * sig * (1 + g * (1 - sig))  # d silu(g) / dg = sig + g sig (1 - sig)
        dup = dyf * g * sig
        return dgate.to(ctx.dtypes[0]), dup.to(ctx.dtypes[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """silu(gate) * up; `int8`: gate and up are saved for the backward as INT8 (module docstring)."""
    if int8 and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUInt8.apply(gate, up)
    return F.silu(gate) * up
