"""FQLinear: a drop-in nn.Linear whose three GEMMs run fallback-quantized INT8.

    model = fq.convert(model, FQConfig())      # swaps Linear layers inside blocks, logs the backend
    ...train...
    metrics.update(fq.collect_stats(model))    # fallback ratio, saturation, NaN/Inf since last call

Forward  Y  = X W^T      X per-row INT8 with fallback tiles, W per-row INT8
Backward dX = dY W       dY per-row INT8 with fallback tiles, W per-column INT8
         dW = dY^T X     dY per-column INT8 with X's row scales folded in, X per-row INT8 at its
                         absmax scale (no fallback: docs/fq.md, "Weight gradient"), written
                         transposed by the forward quantization
X is saved only as those INT8 digits and scales (never in 16 bit) unless grad_weight is off.
"""
from __future__ import annotations

import fnmatch
import logging
import types
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from fq import reference
from fq.config import FQConfig
from fq.reference import NUM_STATS, STAT_CRUSHED, STAT_FALLBACK, STAT_NONFINITE, STAT_SATURATED, STAT_TILES
from fq.swiglu import swiglu_forward

log = logging.getLogger("fqtrain.fq")

# Rows of a layer's stats: the operand with fallback tiles in each quantized GEMM pair.
FORWARD, GRAD = 0, 1
SEED_MOD = 2**31 - 1


def _triton_ops() -> types.ModuleType:
    from fq import triton_kernels

    return triton_kernels


def resolve_backend(config: FQConfig) -> tuple[str, str]:
    """Which kernels run for CUDA tensors, and why (CPU tensors always use the reference)."""
    if config.backend == "reference":
        return "reference", "fq.backend=reference"
    why_not = None
    if not torch.cuda.is_available():
        why_not = "no CUDA"
    else:
        cap = torch.cuda.get_device_capability()
        if cap < (8, 0):
            why_not = f"compute capability {cap[0]}.{cap[1]} < 8.0"
        else:
            try:
                _triton_ops()
            except Exception as e:  # noqa: BLE001 - any import failure means no Triton path
                why_not = f"triton not importable ({type(e).__name__}: {e})"
    if why_not is None:
        cap = torch.cuda.get_device_capability()
        return "triton", f"CUDA sm_{cap[0]}{cap[1]}"
    if config.backend == "triton":
        raise ValueError(f"fq.backend='triton': unavailable ({why_not}); use fq.backend='auto' or 'reference'")
    return "reference", why_not


def rerunning_forward() -> bool:
    """True inside the backward: activation checkpointing (train.recompute_every) running a
    forward again. Forward-time side effects (telemetry, budgets, outlier counts) must not repeat."""
    return torch._C._current_autograd_node() is not None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


# The math of one FQ Linear, for either kernel set `ops` (fq.reference or fq.triton_kernels).
# Both add their counts (STAT_*) into `counts`: the layer's running totals in eager mode, a
# fresh vector inside fq/ops.py's functional op (what torch.compile traces) or under a budget.

def linear_forward(ops, x, weight, thr, counts, tile: int, threshold: float, fallback: bool, keep_x_int8: bool,
                   out_dtype: torch.dtype, swiglu: str = "", pre=None, emit: bool = False):
    """y = x @ weight.T; also X's INT8 transposed digits and row scales for the weight gradient
    (empty unless keep_x_int8), what a fused SwiGLU's backward needs (`swiglu` "bf16" or "int8":
    y is silu(gate) * up of the product's halves; fq.swiglu.swiglu_forward), else two empty
    tensors, and with `emit` y's statistics for the next layer's `pre` (rowmax, counts; both
    empty where the kernels do not take them: then the next layer takes its own). `pre`: x's,
    from the layer before."""
    xq = ops.quantize_act(x, tile, thr[FORWARD], threshold, fallback, transposed=keep_x_int8, stats=counts, pre=pre)
    wq, ws = ops.quantize_rows(weight)
    y = ops.gemm_a_fallback(xq, wq, ws, out_dtype)
    out_pre = None
    if swiglu:
        y, *saved, out_pre = ops.swiglu(y, swiglu == "int8", tile, emit)
    else:
        saved = (x.new_empty(0), x.new_empty(0))
    out_pre = out_pre or (x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.int64))
    if not keep_x_int8:
        return y, x.new_empty(0, dtype=torch.int8), x.new_empty(0, dtype=torch.float32), *saved, out_pre
    return y, xq.qt, xq.scale_t, *saved, out_pre


def linear_backward(ops, dy, weight, qt, scale_t, x, thr, counts, tile: int, threshold: float, fallback: bool,
                    grad_input: bool, grad_weight: bool, seeds: torch.Tensor | None,
                    need_dx: bool, need_dw: bool, x_dtype: torch.dtype, swiglu: str = "", saved=()):
    """dX = dY W and dW = dY^T X (each None unless needed). A GEMM switched off (grad_input /
    grad_weight false) runs in dY's dtype; dW then needs X itself. `seeds`: stochastic rounding's
    seeds for dY's two quantizations (`next_seeds`), or None. With `swiglu`, dy is the gradient of
    silu(gate) * up and `saved` what linear_forward kept for it. X's INT8 (qt, scale_t) is
    taken from x here when the forward did not keep it (empty qt)."""
    seed_dx, seed_dw = (None, None) if seeds is None else (seeds[0:1], seeds[1:2])
    dx = dw = dyq = dyq_t = pre = None
    if need_dw and grad_weight and qt.numel() == 0:  # the forward kept X itself (x_int8_in_backward)
        qt, scale_t = ops.quantize_rows_t(x)
    both = need_dx and grad_input and need_dw and grad_weight  # both layouts of dY from one pair of reads
    if swiglu:  # the product's own gradient, with its statistics for quantize_grad (Triton path)
        dy, pre = ops.swiglu_grad(dy, *saved, swiglu == "int8", scale_t if both else None, tile, counts)
    if both:
        dyq, dyq_t, dys = ops.quantize_grad(dy, tile, thr[GRAD], threshold, fallback, scale_t, seed_dx, seed_dw,
                                            counts, pre)
    if need_dx:
        if grad_input:
            if dyq is None:
                dyq = ops.quantize_act(dy, tile, thr[GRAD], threshold, fallback, seed=seed_dx, stats=counts)
            wq_t, ws_t = ops.quantize_cols_t(weight)
            dx = ops.gemm_a_fallback(dyq, wq_t, ws_t, x_dtype)
        else:
            dx = (dy @ weight.to(dy.dtype)).to(x_dtype)
    if need_dw:
        if grad_weight:
            if dyq_t is None:
                dyq_t, dys = ops.quantize_cols_t(dy, row_mult=scale_t, seed=seed_dw)
            dw = ops.gemm_wgrad(dyq_t, dys, qt, weight.dtype)
        else:
            dw = (dy.t() @ x.to(dy.dtype)).to(weight.dtype)
    return dx, dw


def next_seeds(calls: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Two stochastic-rounding seeds, (base + calls) mod 2**31 - 1, and the counter advanced by
    two: on the device, in eager mode and in a compiled backward alike."""
    seeds = (base + calls) % SEED_MOD
    calls.add_(2)
    return seeds


def account(stats: torch.Tensor, thr: torch.Tensor, which: int, counts: torch.Tensor, threshold: float,
            budget: float) -> None:
    """Add a call's counts to the layer's totals; with a budget (> 0), adapt the layer's threshold
    on the device (no sync): up fast while over budget, back down slowly when well under it
    (hysteresis, no ringing), never below the configured threshold."""
    stats[which] += counts
    if budget > 0:
        t = thr[which]
        ratio = counts[STAT_FALLBACK].float() / counts[STAT_TILES].clamp_min(1).float()
        lower = torch.where(ratio < budget / 2, (t / 1.05).clamp_min(threshold), t)
        thr[which] = torch.where(ratio > budget, t * 1.25, lower)


class _EagerLinear(torch.autograd.Function):
    """The eager path, with either kernel set: the reference (CPU tensors, fq.backend=reference)
    or the Triton kernels outside torch.compile (where fq/ops.py's op would only add dispatch)."""

    @staticmethod
    def forward(ctx, x, weight, layer: FQLinear, out_dtype: torch.dtype, ops, swiglu: str, emit: bool,
                pre_rowmax, pre_counts):
        cfg = layer.fq_config
        # Activation checkpointing runs this forward again inside the backward. The rerun must
        # give the same output, so it takes the thresholds the first run used, and it leaves the
        # telemetry and the budget alone, which the first run already counted.
        rerun = rerunning_forward()
        if rerun:
            counts = torch.zeros(NUM_STATS, dtype=torch.int64, device=layer.fq_stats.device)
            thr = layer._thr_used if layer.budget() else layer.fq_thr
        else:
            counts = layer._counts(FORWARD)
            thr = layer.fq_thr
            if layer.budget():
                layer._thr_used = thr.clone()
        pre = None if pre_rowmax is None else (pre_rowmax, pre_counts)
        keep_x_int8 = layer.keeps_x_int8()
        with torch.autocast(x.device.type, enabled=False):
            y, qt, scale_t, *saved, out_pre = linear_forward(ops, x, weight, thr, counts, cfg.tile, cfg.threshold,
                                                             cfg.fallback != "none", keep_x_int8, out_dtype,
                                                             swiglu, pre, emit)
        if not rerun:
            layer._budget(FORWARD, counts)
        ctx.layer, ctx.ops, ctx.x_dtype, ctx.swiglu = layer, ops, x.dtype, swiglu
        ctx.save_for_backward(weight, qt, scale_t, None if keep_x_int8 else x, *saved)
        ctx.mark_non_differentiable(*out_pre)
        return y, *out_pre

    @staticmethod
    def backward(ctx, dy, _rowmax, _counts):
        weight, qt, scale_t, x, *saved = ctx.saved_tensors
        layer = ctx.layer
        cfg = layer.fq_config
        counts = layer._counts(GRAD)
        with torch.autocast(dy.device.type, enabled=False):
            dx, dw = linear_backward(ctx.ops, dy, weight, qt, scale_t, x, layer.fq_thr, counts, cfg.tile,
                                     cfg.threshold, cfg.fallback != "none", cfg.grad_input, cfg.grad_weight,
                                     layer.next_seeds(), ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                                     ctx.x_dtype, ctx.swiglu, saved)
        layer._budget(GRAD, counts)
        return dx, dw, None, None, None, None, None, None, None


# Under torch.compile (train.compile) this runs as it is: the reference is eager code with
# host-side checks, and compiled Triton layers take fq/ops.py's traceable op instead.
_eager_linear = torch.compiler.disable(_EagerLinear.apply)


class FQLinear(nn.Linear):
    """nn.Linear with fallback-quantized INT8 GEMMs; same parameters and state_dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: FQConfig | None = None, name: str = "", backend: str = "reference"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.fq_config = config or FQConfig()
        self.fq_name = name
        self.fq_backend = backend  # kernels for CUDA tensors: "triton" or "reference"
        self.last_backend = None  # what the latest forward actually ran (tests and logs)
        self._thr_used = None  # the thresholds of the latest forward, under a budget (for its rerun)
        # Quantize X for the weight gradient in the backward, from x itself, instead of keeping
        # its INT8 from the forward: for a layer whose caller keeps x alive for its own backward
        # anyway (o_proj: fused attention keeps its output), so the INT8 copy would be memory
        # spent twice. Set on the nn.Linear before fq.convert, which carries it over.
        self.x_int8_in_backward = False
        self._init_state(self.weight.device)

    def _init_state(self, device) -> None:
        # Telemetry totals (FORWARD / GRAD x STAT_*) and the fallback thresholds, on the layer's
        # device; buffers so .to() moves them, non-persistent so the state_dict stays nn.Linear's.
        self.register_buffer("fq_stats", torch.zeros(2, NUM_STATS, dtype=torch.int64, device=device),
                             persistent=False)
        self.register_buffer("fq_thr", torch.full((2,), self.fq_config.threshold, dtype=torch.float32,
                                                  device=device), persistent=False)
        # Stochastic rounding: seeds come from a call counter on the device, so that a compiled
        # graph draws new ones at every call (fq/ops.py); crc32, not hash(): str hashes change
        # per process, seeds must not.
        base = zlib.crc32(self.fq_name.encode()) * 1000003
        self.register_buffer("fq_seed_calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self.register_buffer("fq_seed_base", torch.tensor([base + 1, base + 2], dtype=torch.int64, device=device),
                             persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FQConfig, name: str, backend: str) -> FQLinear:
        """Wrap an existing nn.Linear, sharing its Parameter objects (no copy, no re-init)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  config=config, name=name, backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        new.x_int8_in_backward = getattr(linear, "x_int8_in_backward", False)
        new._init_state(linear.weight.device)
        return new

    def extra_repr(self) -> str:
        c = self.fq_config
        return f"{super().extra_repr()}, tile={c.tile}, fallback={c.fallback}, backend={self.fq_backend}"

    def next_seeds(self) -> torch.Tensor | None:
        """The seeds of a backward's two quantized GEMMs (dX, dW), None without stochastic rounding."""
        if not self.fq_config.stochastic_rounding:
            return None
        return next_seeds(self.fq_seed_calls, self.fq_seed_base)

    def keeps_x_int8(self) -> bool:
        """Whether the forward keeps X's INT8 for the weight gradient (else the backward takes x)."""
        return self.fq_config.grad_weight and not self.x_int8_in_backward

    def budget(self) -> float:
        """The target fallback ratio the thresholds adapt to; 0 unless fq.fallback=budget."""
        return self.fq_config.budget if self.fq_config.fallback == "budget" else 0.0

    def compile_blocker(self, on_gpu: bool) -> str | None:
        """Why torch.compile runs this layer uncompiled; None when it traces fq/ops.py's op."""
        if not (on_gpu and self.fq_backend == "triton"):
            return "reference backend"
        return None

    def _counts(self, which: int) -> torch.Tensor:
        """Where an eager call adds its counts: straight into the running totals (no extra
        launch), except under the budget policy, which needs each call's own counts."""
        if not self.budget():
            return self.fq_stats[which]
        return torch.zeros(NUM_STATS, dtype=torch.int64, device=self.fq_stats.device)

    def _budget(self, which: int, counts: torch.Tensor) -> None:
        if self.budget():
            account(self.fq_stats, self.fq_thr, which, counts, self.fq_config.threshold, self.budget())

    def forward(self, x: torch.Tensor, swiglu: str = "", pre: tuple | None = None, return_stats: bool = False):
        """x @ weight.T + bias; `swiglu` "bf16" or "int8" (a gate/up projection without bias, whose
        output rows are gate, then up): silu(gate) * up instead, with the SwiGLU backward fused into
        this layer's, its product kept for it in BF16 or INT8 (fq/swiglu.py). With
        `return_stats` (a fused SwiGLU only) (h, stats): stats is what the next FQLinear's
        quantization would first take of h, for its `pre` (where `takes_stats_from` holds), so
        it skips that pass; None where the kernels do not compute them (it then takes its own)."""
        if swiglu not in ("", "bf16", "int8"):
            raise ValueError(f"FQLinear: swiglu={swiglu!r}; use '', 'bf16' or 'int8'")
        if swiglu and self.bias is not None:
            raise ValueError("FQLinear: a fused SwiGLU takes a projection without bias")
        if return_stats and not swiglu:
            raise ValueError("FQLinear: return_stats needs a fused SwiGLU (swiglu='bf16' or 'int8')")
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if pre is not None:
            want = (x2.shape[0], reference.num_tiles(x2.shape[1], self.fq_config.tile))
            if tuple(pre[0].shape) != want:
                raise ValueError(f"FQLinear {self.fq_name}: `pre` has row maxima of shape {tuple(pre[0].shape)}, "
                                 f"not {want}: it must come from the layer that produced x, with the same fq.tile")
        if x2.shape[0] == 0:
            y = F.linear(x, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
            y = swiglu_forward(y, False)[0] if swiglu else y
            return (y, None) if return_stats else y
        # CPU tensors take the reference, except under the Triton interpreter (tests).
        use_triton = self.fq_backend == "triton" and (x.is_cuda or _triton_ops().INTERPRET)
        self.last_backend = "triton" if use_triton else "reference"
        pre_rowmax, pre_counts = pre if pre is not None else (None, None)
        if torch.compiler.is_compiling() and self.compile_blocker(x.is_cuda) is None:
            from fq import ops

            y, rowmax, counts = ops.fq_linear(x2, self.weight, self, dtype, swiglu, return_stats, pre_rowmax,
                                              pre_counts)
        else:
            y, rowmax, counts = _eager_linear(x2, self.weight, self, dtype,
                                              _triton_ops() if use_triton else reference, swiglu, return_stats,
                                              pre_rowmax, pre_counts)
        y = y.reshape(*lead, y.shape[-1])
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        if return_stats:
            return y, ((rowmax, counts) if rowmax.numel() else None)
        return y

    def takes_stats_from(self, producer: FQLinear) -> bool:
        """Whether this layer can take `producer`'s return_stats as its `pre`: the same kernels and
        tile size."""
        return (isinstance(producer, FQLinear) and producer.fq_backend == self.fq_backend
                and producer.fq_config.tile == self.fq_config.tile)


def _selected(name: str, config: FQConfig) -> bool:
    return any(fnmatch.fnmatchcase(name, g) for g in config.include) and not any(
        fnmatch.fnmatchcase(name, g) for g in config.exclude)


def convert(model: nn.Module, config: FQConfig) -> nn.Module:
    """Swap (in place) every nn.Linear whose name matches config.include and not config.exclude."""
    if not config.enabled:
        log.info("fq: disabled (fq.enabled=false); Linear layers stay nn.Linear")
        return model
    backend, why = resolve_backend(config)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and not isinstance(mod, FQLinear) and _selected(name, config)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FQLinear.from_linear(mod, config, name, backend))
    if not targets:
        log.warning("fq: no nn.Linear matched fq.include=%s minus fq.exclude=%s; nothing converted",
                    list(config.include), list(config.exclude))
    log.info("fq: backend=%s (%s); %d Linear layers converted; tile=%d fallback=%s threshold=%g",
             backend, why, len(targets), config.tile, config.fallback, config.threshold)
    return model


def layer_state(model: nn.Module) -> dict[str, dict]:
    """What training changes in each FQ layer besides its weights: the thresholds the budget
    policy adapts on the device, and the stochastic-rounding call counter its seeds come from.
    Checkpoints keep it per rank (train/checkpoint.py), since budgets adapt to each rank's data."""
    return {m.fq_name: {"thr": m.fq_thr.detach().cpu().clone(), "seed_calls": int(m.fq_seed_calls)}
            for m in model.modules() if isinstance(m, FQLinear)}


def load_layer_state(model: nn.Module, state: dict[str, dict]) -> list[str]:
    """Restore `layer_state`; returns the names of the layers that have such state (budget policy
    or stochastic rounding) and that `state` has nothing for. Thresholds are restored only under
    fallback="budget" (otherwise they are the config's, which a resumed run may change), and
    never below the configured threshold."""
    missing = []
    for m in model.modules():
        if not isinstance(m, FQLinear):
            continue
        saved = state.get(m.fq_name)
        if saved is None:
            if m.budget() or m.fq_config.stochastic_rounding:
                missing.append(m.fq_name)
            continue
        m.fq_seed_calls.fill_(int(saved["seed_calls"]))
        if m.budget():
            with torch.no_grad():
                m.fq_thr.copy_(saved["thr"].clamp_min(m.fq_config.threshold))
    return missing


def stats_counts(model: nn.Module, reset: bool = True) -> torch.Tensor | None:
    """Every FQ layer's counters since the last reset, stacked on the device as (layers, 2,
    NUM_STATS) int64 (None without FQ layers), with no host read: a training loop can sum
    them over ranks and read them later (`stats_from_counts`)."""
    layers = [m for m in model.modules() if isinstance(m, FQLinear)]
    if not layers:
        return None
    counts = torch.stack([m.fq_stats.to(layers[0].fq_stats.device) for m in layers])
    if reset:
        torch._foreach_zero_([m.fq_stats for m in layers])
    return counts


def stats_from_counts(model: nn.Module, counts) -> dict[str, float]:
    """The telemetry dict from `stats_counts`' numbers (a tensor or nested lists; None: no
    FQ layers)."""
    layers = [m for m in model.modules() if isinstance(m, FQLinear)]
    out: dict[str, float] = {}
    if counts is None or not layers:
        return {"fallback_ratio": 0.0, "fq/fallback_ratio": 0.0, "fq/saturated": 0.0, "fq/nonfinite": 0.0}
    if isinstance(counts, torch.Tensor):
        counts = counts.tolist()
    total_tiles = total_fb = total_sat = total_nf = total_crushed = 0
    for m, c in zip(layers, counts):
        fwd, grad = c[FORWARD], c[GRAD]
        name = m.fq_name
        out[f"fq/{name}/fallback_ratio"] = fwd[STAT_FALLBACK] / max(fwd[STAT_TILES], 1)
        out[f"fq/{name}/grad_fallback_ratio"] = grad[STAT_FALLBACK] / max(grad[STAT_TILES], 1)
        out[f"fq/{name}/saturated"] = float(fwd[STAT_SATURATED] + grad[STAT_SATURATED])
        out[f"fq/{name}/nonfinite"] = float(fwd[STAT_NONFINITE] + grad[STAT_NONFINITE])
        total_tiles += fwd[STAT_TILES] + grad[STAT_TILES]
        total_fb += fwd[STAT_FALLBACK] + grad[STAT_FALLBACK]
        total_sat += fwd[STAT_SATURATED] + grad[STAT_SATURATED]
        total_nf += fwd[STAT_NONFINITE] + grad[STAT_NONFINITE]
        total_crushed += fwd[STAT_CRUSHED] + grad[STAT_CRUSHED]
    ratio = total_fb / max(total_tiles, 1)
    out.update({"fallback_ratio": ratio, "fq/fallback_ratio": ratio, "fq/saturated": float(total_sat),
                "fq/nonfinite": float(total_nf), "fq/crushed_tiles": float(total_crushed)})
    return out


def collect_stats(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Telemetry since the last reset: one device read for the whole model."""
    return stats_from_counts(model, stats_counts(model, reset))
