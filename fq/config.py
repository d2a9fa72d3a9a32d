"""FQConfig: the one frozen description of how Linear layers are quantized."""
from __future__ import annotations

from dataclasses import dataclass

TILES = (32, 64, 128)
FALLBACKS = ("threshold", "budget", "none")
BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class FQConfig:
    enabled: bool = True
    # Square tile edge of the block-level scales (activations and weights).
    tile: int = 128
    # How activation tiles holding outliers are detected: a per-tile crest-factor threshold,
    # a per-layer budget (fraction of tiles), or no fallback at all (plain block INT8).
    fallback: str = "threshold"
    threshold: float = 12.0
    budget: float = 0.05
    # Per-GEMM switches: False keeps that backward GEMM in 16-bit.
    grad_input: bool = True
    grad_weight: bool = True
    stochastic_rounding: bool = False
    # Module-name globs (relative to the model) whose nn.Linear layers are converted.
    include: tuple[str, ...] = ("layers.*",)
    exclude: tuple[str, ...] = ()
    backend: str = "auto"

    def __post_init__(self):
        if self.tile not in TILES:
            raise ValueError(f"fq.tile={self.tile}: must be one of {TILES}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fq.fallback='{self.fallback}': must be one of {FALLBACKS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fq.backend='{self.backend}': must be one of {BACKENDS}")
        if not self.threshold > 0:
            raise ValueError(f"fq.threshold={self.threshold}: must be > 0")
        if not 0.0 <= self.budget <= 1.0:
            raise ValueError(f"fq.budget={self.budget}: must be in [0, 1]")
