"""FQConfig: the one frozen description of how Linear layers are quantized (see docs/fq.md)."""
from __future__ import annotations

from dataclasses import dataclass

TILES = (32, 64, 128)
FALLBACKS = ("threshold", "budget", "none")
BACKENDS = ("auto", "triton", "reference")


@dataclass(frozen=True)
class FQConfig:
    # False: every Linear stays a plain nn.Linear (BF16 under autocast); convert() is a no-op.
    enabled: bool = True
    # Square tile edge: activation tiles are tested for outliers and fall back as a unit.
    tile: int = 128
    # How outlier tiles are chosen: a tile falls back when, in one of its rows, its absmax exceeds
    # `threshold` x that row's median tile absmax (a channel outlier; a whole large token is left
    # to its row scale); "budget" also raises a layer's threshold on device while its fallback
    # ratio exceeds `budget`; "none" disables fallback (plain row-scaled INT8, the ablation).
    fallback: str = "threshold"
    # Spike ratio: the row's median tile keeps >= 127 / threshold levels. Gaussian rows stay
    # below ~2.2, GLU outlier channels sit at 100-10000.
    threshold: float = 8.0
    # Target fraction of fallback tiles per layer and GEMM for fallback="budget".
    budget: float = 0.05
    # Per-GEMM switches: False keeps that backward GEMM in the compute dtype (BF16 on GPU).
    grad_input: bool = True
    grad_weight: bool = True
    # Stochastic rounding when quantizing output gradients (unbiased, noisier).
    stochastic_rounding: bool = False
    # Module-name globs (relative to the model root) whose nn.Linear layers are converted.
    include: tuple[str, ...] = ("layers.*",)
    # Globs removed from the include set (e.g. "layers.0.*").
    exclude: tuple[str, ...] = ()
    # SwiGLU keeps its gate and up inputs for the backward as INT8 with one scale per 128 values
    # instead of BF16 (fq/swiglu.py): half of a Llama block's largest saved activation. Works
    # with or without the INT8 GEMMs (enabled=false); only the SwiGLU backward sees the rounding.
    swiglu_int8: bool = False
    # auto: Triton on CUDA with compute capability >= 8.0, else the pure-torch reference.
    backend: str = "auto"

    def __post_init__(self):
        if self.tile not in TILES:
            raise ValueError(f"fq.tile={self.tile}: must be one of {TILES}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fq.fallback='{self.fallback}': must be one of {FALLBACKS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fq.backend='{self.backend}': must be one of {BACKENDS}")
        if not self.threshold > 1.0:
            raise ValueError(f"fq.threshold={self.threshold}: must be > 1 (a tile absmax over the row's median tile absmax; 8 is the default)")
        if not 0.0 < self.budget <= 1.0:
            raise ValueError(f"fq.budget={self.budget}: must be in (0, 1], e.g. 0.05")
        for key in ("include", "exclude"):
            globs = getattr(self, key)
            if not isinstance(globs, tuple) or not all(isinstance(g, str) and g for g in globs):
                raise ValueError(f"fq.{key}={globs!r}: must be a list of non-empty module-name globs, "
                                 "e.g. ['layers.*']")
