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
from fq.reference import STAT_CRUSHED, STAT_FALLBACK, STAT_NONFINITE, STAT_SATURATED, TileQuant, num_tiles

log = logging.getLogger("fqtrain.fq")

# Rows of a layer's stats: the operand with fallback tiles in each quantized GEMM pair.
FORWARD, GRAD = 0, 1


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


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _FQMatmul(torch.autograd.Function):
    """y = x @ weight.T with the three GEMMs quantized; x (M, K), weight (N, K)."""

    @staticmethod
    def forward(ctx, x, weight, layer: FQLinear, out_dtype: torch.dtype):
        cfg = layer.fq_config
        ops = layer._ops(x)
        with torch.autocast(x.device.type, enabled=False):
            xq = ops.quantize_act(x, cfg.tile, layer._thresholds(x.device)[FORWARD], cfg.threshold,
                                  cfg.fallback != "none", transposed=cfg.grad_weight,
                                  stats=layer._stats_sink(FORWARD, x.device))
            layer._record(FORWARD, xq, x.shape)
            wq, ws = ops.quantize_rows(weight)
            y = ops.gemm_a_fallback(xq, wq, ws, out_dtype)
        ctx.layer, ctx.ops, ctx.out_dtype, ctx.x_dtype = layer, ops, out_dtype, x.dtype
        saved_x = x if not cfg.grad_weight else None
        # Backward needs X only as the K-major (transposed) INT8 digits of the weight gradient.
        ctx.save_for_backward(weight, xq.qt, xq.scale_t, saved_x)
        return y

    @staticmethod
    def backward(ctx, dy):
        weight, qt, scale_t, x = ctx.saved_tensors
        layer, ops = ctx.layer, ctx.ops
        cfg = layer.fq_config
        cd = ctx.out_dtype
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                if cfg.grad_input:
                    dyq = ops.quantize_act(dy, cfg.tile, layer._thresholds(dy.device)[GRAD], cfg.threshold,
                                           cfg.fallback != "none", seed=layer._next_seed(),
                                           stats=layer._stats_sink(GRAD, dy.device))
                    layer._record(GRAD, dyq, dy.shape)
                    wq_t, ws_t = ops.quantize_cols_t(weight)
                    dx = ops.gemm_a_fallback(dyq, wq_t, ws_t, ctx.x_dtype)
                else:
                    dx = (dy.to(cd) @ weight.to(cd)).to(ctx.x_dtype)
            if ctx.needs_input_grad[1]:
                if cfg.grad_weight:
                    dyq_t, dys = ops.quantize_cols_t(dy, row_mult=scale_t, seed=layer._next_seed())
                    dw = ops.gemm_wgrad(dyq_t, dys, qt, weight.dtype)
                else:
                    dw = (dy.to(cd).t() @ x.to(cd)).to(weight.dtype)
        return dx, dw, None, None


# torch.compile (train.compile) compiles the code around FQ layers and runs them as they are:
# their kernels are already fused, and tracing into the Triton launches, the fallback lists and
# the host-side telemetry would only multiply graph breaks and recompilations.
_fq_matmul = torch.compiler.disable(_FQMatmul.apply)


class FQLinear(nn.Linear):
    """nn.Linear with fallback-quantized INT8 GEMMs; same parameters and state_dict as nn.Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 config: FQConfig | None = None, name: str = "", backend: str = "reference"):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.fq_config = config or FQConfig()
        self.fq_name = name
        self.fq_backend = backend  # kernels for CUDA tensors: "triton" or "reference"
        self.last_backend = None  # what the latest forward actually ran (tests and logs)
        self._stats = None  # (2, 4) int64 on the activations' device: FORWARD / GRAD x STAT_*
        self._stat_rows = ()  # its two rows, which the kernels add into
        self._tiles = [0, 0]
        self._thr = None
        self._seed_calls = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FQConfig, name: str, backend: str) -> FQLinear:
        """Wrap an existing nn.Linear, sharing its Parameter objects (no copy, no re-init)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  config=config, name=name, backend=backend)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def extra_repr(self) -> str:
        c = self.fq_config
        return f"{super().extra_repr()}, tile={c.tile}, fallback={c.fallback}, backend={self.fq_backend}"

    def _ops(self, x: torch.Tensor):
        # CPU tensors take the reference, except under the Triton interpreter (tests).
        use_triton = self.fq_backend == "triton" and (x.is_cuda or _triton_ops().INTERPRET)
        self.last_backend = "triton" if use_triton else "reference"
        return _triton_ops() if use_triton else reference

    def _thresholds(self, device) -> torch.Tensor:
        if self._thr is None or self._thr.device != device:
            self._thr = torch.full((2,), self.fq_config.threshold, dtype=torch.float32, device=device)
        return self._thr

    def _next_seed(self) -> int | None:
        if not self.fq_config.stochastic_rounding:
            return None
        self._seed_calls += 1
        # crc32, not hash(): str hashes change per process, seeds must not.
        return (zlib.crc32(self.fq_name.encode()) * 1000003 + self._seed_calls) % (2**31 - 1)

    def _stats_sink(self, which: int, device) -> torch.Tensor | None:
        """Where a quantization adds its counts: straight into the running totals (no extra
        launch), except under the budget policy, which needs each call's own counts."""
        if self._stats is None or self._stats.device != device:
            self._stats = torch.zeros(2, 4, dtype=torch.int64, device=device)
            self._stat_rows = self._stats.unbind(0)
        return None if self.fq_config.fallback == "budget" else self._stat_rows[which]

    def _record(self, which: int, q: TileQuant, shape) -> None:
        """Count tiles; the budget policy adds the call's counts and adapts its threshold on the
        device (no sync)."""
        n = num_tiles(shape[0], self.fq_config.tile) * num_tiles(shape[1], self.fq_config.tile)
        self._tiles[which] += n
        if self.fq_config.fallback == "budget":
            self._stats[which] += q.stats
            thr = self._thr[which]
            ratio = q.stats[STAT_FALLBACK].float() / max(n, 1)
            base = torch.full_like(thr, self.fq_config.threshold)
            budget = self.fq_config.budget
            # Up fast when over budget, back down slowly when well under it (hysteresis, no ringing).
            lower = torch.where(ratio < budget / 2, torch.maximum(thr / 1.05, base), thr)
            self._thr[which] = torch.where(ratio > budget, thr * 1.25, lower)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return F.linear(x, self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))
        y = _fq_matmul(x2, self.weight, self, dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y


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


def collect_stats(model: nn.Module, reset: bool = True) -> dict[str, float]:
    """Telemetry since the last reset: one device read for the whole model."""
    layers = [m for m in model.modules() if isinstance(m, FQLinear) and m._stats is not None]
    out: dict[str, float] = {}
    if not layers:
        return {"fallback_ratio": 0.0, "fq/fallback_ratio": 0.0, "fq/saturated": 0.0, "fq/nonfinite": 0.0}
    counts = torch.stack([m._stats.to(layers[0]._stats.device) for m in layers]).tolist()
    total_tiles = total_fb = total_sat = total_nf = total_crushed = 0
    for m, c in zip(layers, counts):
        tiles = m._tiles
        name = m.fq_name
        out[f"fq/{name}/fallback_ratio"] = c[FORWARD][STAT_FALLBACK] / max(tiles[FORWARD], 1)
        out[f"fq/{name}/grad_fallback_ratio"] = c[GRAD][STAT_FALLBACK] / max(tiles[GRAD], 1)
        out[f"fq/{name}/saturated"] = float(c[FORWARD][STAT_SATURATED] + c[GRAD][STAT_SATURATED])
        out[f"fq/{name}/nonfinite"] = float(c[FORWARD][STAT_NONFINITE] + c[GRAD][STAT_NONFINITE])
        total_tiles += sum(tiles)
        total_fb += c[FORWARD][STAT_FALLBACK] + c[GRAD][STAT_FALLBACK]
        total_sat += c[FORWARD][STAT_SATURATED] + c[GRAD][STAT_SATURATED]
        total_nf += c[FORWARD][STAT_NONFINITE] + c[GRAD][STAT_NONFINITE]
        total_crushed += c[FORWARD][STAT_CRUSHED] + c[GRAD][STAT_CRUSHED]
        if reset:
            m._stats.zero_()
            m._tiles = [0, 0]
    ratio = total_fb / max(total_tiles, 1)
    out.update({"fallback_ratio": ratio, "fq/fallback_ratio": ratio, "fq/saturated": float(total_sat),
                "fq/nonfinite": float(total_nf), "fq/crushed_tiles": float(total_crushed)})
    return out
