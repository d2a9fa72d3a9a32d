"""The Triton path of FQLinear as torch.library ops, so torch.compile traces through FQ layers.

`fq::linear` (forward) and `fq::linear_backward` are `triton_op`s: under torch.compile inductor
traces their bodies (fq/triton_kernels.py's wrappers, launching through wrap_triton) and
launches the kernels from its generated code, with no graph break around the layer and no
Python per launch. Eager mode does not use them (FQLinear calls the same math directly; the op
dispatch would only add host time). Both ops are functional: they return this call's counts,
and the layer's running totals and budget thresholds are updated outside them (`account`), in
the forward and in the autograd formula; that is what lets the forward op have one.
Stochastic rounding draws its seeds in the autograd formula from the layer's counter on the
device (`next_seeds`), so a compiled backward takes new seeds at every call, the same ones as
eager mode.
"""
from __future__ import annotations

import hashlib
import pathlib

import torch
from torch.library import triton_op

from fq import triton_kernels
from fq.linear import FORWARD, GRAD, account, linear_backward, linear_forward, next_seeds
from fq.reference import NUM_STATS


def source_hash(paths=None) -> str:
    """sha256 of the fq package's source (or of `paths`), in file-name order."""
    h = hashlib.sha256()
    for path in sorted(paths or pathlib.Path(__file__).parent.glob("*.py")):
        h.update(pathlib.Path(path).name.encode() + b"\0" + pathlib.Path(path).read_bytes())
    return h.hexdigest()[:16]


# Both ops take this as an argument, so it is part of every compiled graph that calls them.
# inductor's caches key a graph on the op calls in it, not on what the op bodies run: without
# it, a run after an fq change (an upgrade, an edit) got the graphs compiled from the old code
# back from the cache, silently (docs/fq.md, "Under torch.compile").
CODE = source_hash()


@triton_op("fq::linear", mutates_args=())
def _linear(x: torch.Tensor, weight: torch.Tensor, thr: torch.Tensor, thr_state: torch.Tensor, stats: torch.Tensor,
            seed_calls: torch.Tensor, seed_base: torch.Tensor, tile: int, threshold: float, fallback: bool,
            budget: float, grad_input: bool, grad_weight: bool, stochastic: bool, keep_x_int8: bool,
            out_dtype: torch.dtype, swiglu: str, emit: bool, pre_rowmax: torch.Tensor | None,
            pre_counts: torch.Tensor | None,
            code: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                torch.Tensor, torch.Tensor]:
    """y, X's INT8 for dW (qt, scale_t; empty unless keep_x_int8, else the backward takes x), a
    fused SwiGLU's saved pair (empty without `swiglu`), counts, and with `emit` y's statistics for
    the next layer (rowmax, their counts; empty where the kernels do not take them). `pre_rowmax`,
    `pre_counts`: x's, from the layer before, or None. `thr`: the thresholds this call quantizes with;
    `thr_state` (the layer's), `stats`, the seed counter and base, `budget`, `grad_input` and
    `stochastic` are only carried to the backward; `code` is CODE."""
    counts = torch.zeros(NUM_STATS, dtype=torch.int64, device=x.device)
    pre = None if pre_rowmax is None else (pre_rowmax, pre_counts)
    with triton_kernels.traceable_launches():
        y, qt, scale_t, saved, saved_scale, out_pre = linear_forward(triton_kernels, x, weight, thr, counts, tile,
                                                                     threshold, fallback, keep_x_int8, out_dtype,
                                                                     swiglu, pre, emit)
    return y, qt, scale_t, saved, saved_scale, counts, *out_pre


@triton_op("fq::linear_backward", mutates_args=())
def _linear_backward(dy: torch.Tensor, weight: torch.Tensor, qt: torch.Tensor, scale_t: torch.Tensor,
                     x: torch.Tensor | None, thr: torch.Tensor, seeds: torch.Tensor | None, tile: int,
                     threshold: float, fallback: bool, grad_input: bool, grad_weight: bool, need_dx: bool,
                     need_dw: bool, x_dtype: torch.dtype, swiglu: str, saved: torch.Tensor,
                     saved_scale: torch.Tensor, code: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dX, dW (empty where not needed), counts. `seeds`: stochastic rounding's two (or None);
    with `swiglu`, dy is the gradient of silu(gate) * up; `code` is CODE."""
    counts = torch.zeros(NUM_STATS, dtype=torch.int64, device=dy.device)
    with triton_kernels.traceable_launches():
        dx, dw = linear_backward(triton_kernels, dy, weight, qt, scale_t, x, thr, counts, tile, threshold, fallback,
                                 grad_input, grad_weight, seeds, need_dx, need_dw, x_dtype, swiglu,
                                 (saved, saved_scale))
    empty = dy.new_empty(0)
    return (empty if dx is None else dx), (empty if dw is None else dw), counts


def _setup_context(ctx, inputs, output):
    (x, weight, _, thr, stats, seed_calls, seed_base, tile, threshold, fallback, budget, grad_input, grad_weight,
     stochastic, keep_x_int8, _, swiglu, *_) = inputs
    _, qt, scale_t, saved, saved_scale, counts, rowmax, hcounts = output
    ctx.mark_non_differentiable(qt, scale_t, saved, saved_scale, counts, rowmax, hcounts)
    ctx.save_for_backward(weight, qt, scale_t, None if keep_x_int8 else x, saved, saved_scale)
    # The layer's totals, thresholds and seed counter: updated in place by the backward, not
    # inputs to it.
    ctx.stats, ctx.thr = stats, thr
    ctx.seeds = (seed_calls, seed_base) if stochastic else None
    ctx.args = (tile, threshold, fallback, grad_input, grad_weight)
    ctx.budget, ctx.x_dtype, ctx.swiglu = budget, x.dtype, swiglu


def _backward(ctx, dy, _qt, _scale_t, _saved, _saved_scale, _counts, _rowmax, _hcounts):
    weight, qt, scale_t, x, saved, saved_scale = ctx.saved_tensors
    tile, threshold, fallback, grad_input, grad_weight = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    seeds = None if ctx.seeds is None else next_seeds(*ctx.seeds)
    dx, dw, counts = torch.ops.fq.linear_backward(dy, weight, qt, scale_t, x, ctx.thr, seeds, tile, threshold,
                                                  fallback, grad_input, grad_weight, need_dx, need_dw, ctx.x_dtype,
                                                  ctx.swiglu, saved, saved_scale, CODE)
    account(ctx.stats, ctx.thr, GRAD, counts, threshold, ctx.budget)
    return (dx if need_dx else None, dw if need_dw else None) + (None,) * 19


_linear.register_autograd(_backward, setup_context=_setup_context)


def fq_linear(x: torch.Tensor, weight: torch.Tensor, layer, out_dtype: torch.dtype, swiglu: str = "",
              emit: bool = False, pre_rowmax: torch.Tensor | None = None, pre_counts: torch.Tensor | None = None):
    """(y, rowmax, counts): y = x @ weight.T (`swiglu`: silu(gate) * up of it) through the op, with
    the layer's telemetry and thresholds, and (`emit`) y's statistics for the next layer (empty
    where the kernels do not take them); `pre_*`: x's, from the layer before."""
    cfg = layer.fq_config
    budget = layer.budget()
    # Under a budget `account` updates the thresholds in place after this call; a copy keeps
    # activation checkpointing's rerun of the op on the thresholds this call used.
    thr = layer.fq_thr.clone() if budget else layer.fq_thr
    y, *_, counts, rowmax, hcounts = torch.ops.fq.linear(
        x, weight, thr, layer.fq_thr, layer.fq_stats, layer.fq_seed_calls, layer.fq_seed_base, cfg.tile,
        cfg.threshold, cfg.fallback != "none", budget, cfg.grad_input, cfg.grad_weight, cfg.stochastic_rounding,
        layer.keeps_x_int8(), out_dtype, swiglu, emit, pre_rowmax, pre_counts, CODE)
    account(layer.fq_stats, layer.fq_thr, FORWARD, counts, cfg.threshold, budget)
    return y, rowmax, hcounts
