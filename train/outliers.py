"""Activation outlier telemetry: forward hooks that count outliers per layer on chosen steps.

After "Intriguing Properties of Quantization at Scale" (Ahmadian et al., 2023): outlier features
grow with training choices, so we count them while training (`logging.outliers=true`) and in
`tools/analyze_checkpoint.py`. Per hooked activation (a "site"):

- `gt6`: elements with |x| > 6 (the LLM.int8() rule), `gt6_features`: hidden dims where any
  token has one, `seq_share`: share of sequences with at least one;
- `adaptive`: elements with |x - mean| > 4 std, mean and std over that token's features
  (scale-free, so it also sees outliers of a small-magnitude layer);
- `absmax`: the largest |x|.

Model-wide: `outliers/gt6`, `outliers/adaptive`, `outliers/seq_share` (sequences with an
outlier in any site), `outliers/layer_share` (sites with any), and per RMSNorm the gain spread
(`gain_max_over_median`, `gain_std`). The FQ fallback ratio per GEMM is not here: the trainer
already logs it from `fq.collect_stats` (`fq/<layer>/fallback_ratio`).

Cost: nothing when off (no hooks). When on, hooks return at once unless `active` is set (the
trainer sets it only for steps whose metrics are logged); counts stay on the device and
`collect` reads them once.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from fq.linear import rerunning_forward

ABS_THRESHOLD = 6.0
STD_MULTIPLE = 4.0

# Per-site sums: elements > 6, adaptive outliers, elements, sequences with a > 6, sequences.
GT6, ADAPTIVE, ELEMENTS, SEQ_HIT, SEQS = range(5)


def activation_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outlier statistics of x (batch, ..., features), in fp32.

    Returns (sums: float64 per GT6..SEQS, absmax: 0-d, feature_hit: bool per feature,
    seq_hit: bool per sequence)."""
    x = x.detach().float()
    x3 = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, 1, -1)
    ax = x3.abs()
    big = ax > ABS_THRESHOLD
    mean = x3.mean(-1, keepdim=True)
    std = x3.std(-1, keepdim=True, correction=0)
    adaptive = (x3 - mean).abs() > STD_MULTIPLE * std
    seq_hit = big.flatten(1).any(1)
    # Sizes go in by fill (a kernel argument), not torch.tensor (a host copy that would sync).
    sums = torch.stack([big.sum(), adaptive.sum(), big.new_full((), x3.numel(), dtype=torch.int64),
                        seq_hit.sum(), big.new_full((), x3.shape[0], dtype=torch.int64)]).double()
    return sums, ax.max(), big.flatten(0, 1).any(0), seq_hit


def transformer_sites(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The activations that enter the quantized GEMMs of each block, and the residual stream:
    (site name, module, "input" | "output")."""
    sites = []
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        sites += [(f"{p}.attn_in", block.attention_norm, "output"),      # into q/k/v
                  (f"{p}.attn_out", block.attention.o_proj, "input"),
                  (f"{p}.mlp_in", block.mlp_norm, "output"),             # into gate/up
                  (f"{p}.mlp_hidden", block.mlp.down_proj, "input"),
                  (f"{p}.residual", block, "output")]
    return sites


def rmsnorm_gains(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from train.model import RMSNorm

    return [(name, m) for name, m in model.named_modules() if isinstance(m, RMSNorm)]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


class OutlierMonitor:
    """Hooks on `sites` of `model` (default: `transformer_sites`); counts while `active`."""

    def __init__(self, model: nn.Module, sites: list[tuple[str, nn.Module, str]] | None = None):
        self.model = model
        self.sites = transformer_sites(model) if sites is None else sites
        self.active = False
        self._handles = []
        self._reset()
        self._handles.append(model.register_forward_pre_hook(self._forward_start))
        self._handles.append(model.register_forward_hook(self._forward_end))
        for i, (_, module, where) in enumerate(self.sites):
            if where == "input":
                hook = module.register_forward_pre_hook(lambda _m, args, i=i: self._observe(i, args[0]))
            else:
                hook = module.register_forward_hook(lambda _m, _args, out, i=i: self._observe(i, out))
            self._handles.append(hook)

    def _reset(self) -> None:
        self._sums = None  # (sites, 5) float64
        self._absmax = None  # (sites,)
        self._features = [None] * len(self.sites)  # bool per feature, OR over micro-batches
        self._seq_any = None  # this forward's sequences with a > 6 anywhere
        self._model_seqs = None  # (2,) sequences with a > 6 anywhere, sequences

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _forward_start(self, _module, _args) -> None:
        self._seq_any = None

    def _observe(self, i: int, x) -> None:
        if not self.active or not isinstance(x, torch.Tensor) or rerunning_forward():  # counted already
            return
        with torch.no_grad():
            sums, absmax, features, seq_hit = activation_stats(x)
            if self._sums is None:
                n = len(self.sites)
                self._sums = torch.zeros(n, 5, dtype=torch.float64, device=x.device)
                self._absmax = torch.zeros(n, dtype=torch.float32, device=x.device)
                self._model_seqs = torch.zeros(2, dtype=torch.float64, device=x.device)
            self._sums[i] += sums
            self._absmax[i] = torch.maximum(self._absmax[i], absmax)
            f = self._features[i]
            self._features[i] = features if f is None else f | features
            self._seq_any = seq_hit if self._seq_any is None else self._seq_any | seq_hit

    def _forward_end(self, _module, _args, _out) -> None:
        if self.active and self._seq_any is not None:
            seqs = self._seq_any.new_full((), self._seq_any.numel(), dtype=torch.int64)
            self._model_seqs += torch.stack([self._seq_any.sum(), seqs])
        self._seq_any = None

    @torch.no_grad()
    def collect(self) -> dict[str, float]:
        """`outliers/...` metrics since the last collect, over all ranks, with one device read.
        Call on every rank (collectives; the norm gains may be sharded)."""
        norms = rmsnorm_gains(self.model)
        gains = []
        for _, norm in norms:
            g = _full(norm.weight.detach()).float().abs()
            gains += [g.max() / g.median().clamp_min(1e-12), g.std(correction=0)]
        packed = [torch.stack(gains).double()] if gains else []
        n = len(self.sites)
        if self._sums is not None:
            masks = [f.float() if f is not None else torch.zeros(0, device=self._sums.device)
                     for f in self._features]
            features = torch.cat(masks)
            sums = torch.cat([self._sums.flatten(), self._model_seqs])
            maxes = self._absmax.clone()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(sums)
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
                dist.all_reduce(features, op=dist.ReduceOp.MAX)  # a feature hit on any rank counts once
            counts = torch.stack([c.sum() for c in features.split([m.numel() for m in masks])])
            packed += [sums, maxes.double(), counts.double()]
            self._reset()
        values = torch.cat(packed).tolist() if packed else []
        out: dict[str, float] = {}
        for j, (name, _) in enumerate(norms):
            out[f"outliers/{name}/gain_max_over_median"] = values[2 * j]
            out[f"outliers/{name}/gain_std"] = values[2 * j + 1]
        if len(values) == 2 * len(norms):
            return out
        act = values[2 * len(norms):]
        site_sums = [act[5 * i:5 * i + 5] for i in range(n)]
        model_hit, model_seqs = act[5 * n:5 * n + 2]
        maxes, features = act[5 * n + 2:6 * n + 2], act[6 * n + 2:]
        total_gt6 = total_adaptive = hit_sites = 0.0
        for (name, _, _), s, m, f in zip(self.sites, site_sums, maxes, features):
            out[f"outliers/{name}/gt6"] = s[GT6]
            out[f"outliers/{name}/gt6_features"] = f
            out[f"outliers/{name}/adaptive"] = s[ADAPTIVE]
            out[f"outliers/{name}/seq_share"] = s[SEQ_HIT] / max(s[SEQS], 1.0)
            out[f"outliers/{name}/absmax"] = m
            total_gt6 += s[GT6]
            total_adaptive += s[ADAPTIVE]
            hit_sites += s[GT6] > 0
        out["outliers/gt6"] = total_gt6
        out["outliers/adaptive"] = total_adaptive
        out["outliers/layer_share"] = hit_sites / max(n, 1)
        out["outliers/seq_share"] = model_hit / max(model_seqs, 1.0)
        return out
