"""SwiGLU, silu(gate) * up, that can save its inputs for the backward as INT8 (fq.swiglu_int8).

In a Llama block the gate and up projections' output (tokens x 2 * ffn_hidden, BF16) is the
largest activation kept for the backward: 4 of the ~12 GiB of activations at 1B. With `int8`
it is kept as INT8 with one FP32 scale per 128 consecutive values of a row (absmax / 127, round
to nearest), half the bytes. The forward output is exact; only the SwiGLU backward sees the
rounding, an error of at most half a step (absmax / 254) per value, finer than the 128 x 128
tiles the backward GEMMs already quantize dY with. Pure torch: under torch.compile inductor
computes silu(gate) * up and both quantizations in one kernel, and fuses the dequantization
into the backward's.

Under FQ the gate/up projection computes SwiGLU itself (`FQLinear(x, swiglu=...)`, with
`swiglu_forward` / `swiglu_backward` below): its backward then takes the gradient of
silu(gate) * up, and the Triton path computes the projection's own gradient in the same kernel
as the statistics its quantization needs (fq/triton_kernels.py, `swiglu_grad`). Its forward
(`swiglu`) likewise takes, as it writes h, the statistics the down projection's quantization of
h starts from.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GROUP = 128


def _groups(x: torch.Tensor) -> torch.Tensor:
    """x's last dim zero-padded to a multiple of GROUP and split: (..., groups, GROUP)."""
    return F.pad(x, (0, -x.shape[-1] % GROUP)).unflatten(-1, (-1, GROUP))


def _ungroup(xg: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `_groups` for a last dim of n."""
    return xg.flatten(-2)[..., :n]


def _quantize(xg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = xg.float()
    scale = xf.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, xf / scale, 0.0).round().clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(-1)


def quantize_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """INT8 digits (x's shape) and FP32 scales (x's shape with the last dim in groups of GROUP,
    the last group zero-padded). A zero group has scale 0 and digits 0; a non-finite value makes
    its group's scale non-finite, so the dequantized group is NaN (never silently finite)."""
    q, scale = _quantize(_groups(x))
    return _ungroup(q, x.shape[-1]), scale


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _ungroup(_groups(q.float()) * scale.unsqueeze(-1), q.shape[-1])


def _grads(dyf: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dgate and d/dup of silu(g) * u, in float32 (fq/triton_kernels.py computes the same
    products in the same order)."""
    sig = torch.sigmoid(g)
    return dyf * u * sig * (1 + g * (1 - sig)), dyf * g * sig  # d silu(g) / dg = sig + g sig (1 - sig)


def swiglu_forward(y: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """silu(gate) * up of a gate/up projection's output y = [gate | up] (..., 2n), and what the
    backward keeps: y itself and an empty tensor, or (int8) y's digits (..., 2n) and scales
    (..., 2, groups), gate and up grouped apart as `swiglu(int8=True)` groups them."""
    if not int8:
        # The plain product, as `swiglu` computes it. On the grouped view below, a compiled tiny
        # model (tests/test_fq_linear.py) gave a NaN validation loss on the H100 in this mode;
        # the cause was not pinned down.
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up, y, y.new_empty(0)
    n = y.shape[-1] // 2
    yg = _groups(y.unflatten(-1, (2, n)))  # (..., 2, groups, GROUP)
    # silu and both quantizations on one grouped view: one kernel under inductor (see below)
    h = _ungroup(F.silu(yg[..., 0, :, :]) * yg[..., 1, :, :], n)
    q, scale = _quantize(yg)
    return h, _ungroup(q, n).flatten(-2), scale


def swiglu_backward(dh: torch.Tensor, saved: torch.Tensor, scale: torch.Tensor, int8: bool) -> torch.Tensor:
    """The projection's output gradient [dgate | dup] (dh's dtype) from dh, the gradient of
    silu(gate) * up, and what `swiglu_forward` kept."""
    n = dh.shape[-1]
    y = saved.unflatten(-1, (2, n))
    y = dequantize_groups(y, scale) if int8 else y.float()
    dgate, dup = _grads(dh.float(), y[..., 0, :], y[..., 1, :])
    return torch.cat([dgate, dup], dim=-1).to(dh.dtype)


class _SwiGLUInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        n = gate.shape[-1]
        g, u = _groups(gate), _groups(up)
        (gq, gs), (uq, us) = _quantize(g), _quantize(u)
        ctx.save_for_backward(_ungroup(gq, n), gs, _ungroup(uq, n), us)
        ctx.dtypes = gate.dtype, up.dtype
        # silu(gate) * up on the same grouped view as the quantization, so that inductor computes
        # all three in one kernel (two before: 0.34 -> 0.24 ms for 8192 x 2 x 8192 on the H100);
        # elementwise, so the same bits as on the flat tensors.
        return _ungroup(F.silu(g) * u, n)

    @staticmethod
    def backward(ctx, dy):
        gq, gs, uq, us = ctx.saved_tensors
        g, u = dequantize_groups(gq, gs), dequantize_groups(uq, us)
        dgate, dup = _grads(dy.float(), g, u)
        return dgate.to(ctx.dtypes[0]), dup.to(ctx.dtypes[1])


def swiglu(gate: torch.Tensor, up: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """silu(gate) * up; `int8`: gate and up are saved for the backward as INT8 (module docstring)."""
    if int8 and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLUInt8.apply(gate, up)
    return F.silu(gate) * up
