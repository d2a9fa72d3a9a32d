"""Fallback-quantized INT8 GEMMs for Linear layers (docs/fq.md; ../shared/DESIGN.md, "FQ").

Public API: FQConfig, FQLinear, convert(model, config), collect_stats(model, reset=True),
swiglu(gate, up, int8) (fq.swiglu_int8).
"""
from fq.config import FQConfig
from fq.linear import FQLinear, collect_stats, convert, stats_counts, stats_from_counts
from fq.swiglu import swiglu

__all__ = ["FQConfig", "FQLinear", "convert", "collect_stats", "stats_counts", "stats_from_counts", "swiglu"]
