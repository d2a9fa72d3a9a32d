"""Llama-style decoder: RMSNorm, RoPE, grouped-query attention (torch SDPA), SwiGLU MLP.

Readable in one sitting. Each block has four Linear layers, plain nn.Linear here (`fq.convert`
swaps them for FQLinear): q, k and v are one projection (qkv_proj), and so are gate and up
(gate_up_proj), as in Megatron-LM. One GEMM per input reads (and under FQ quantizes and saves) the
normed activation once instead of three or two times; the Hugging Face export splits them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fq.linear import FQLinear
from fq.swiglu import swiglu
from train.config import ModelConfig, ffn_hidden
from train.loss import linear_cross_entropy


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's kernel sums the squares in fp32 (bf16 squares lose too much) and rounds once.
        # On CUDA it is one fused kernel each way: on the H100 (2026-11-25, 32768 x 2048 bf16)
        # forward + backward take 0.52 ms eagerly against 3.55 ms for the same in elementwise
        # ops, which kept 1.8 GiB of fp32 copies for the backward instead of 0.4.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, seq, heads, head_dim); rotate pairs (even, odd) as in the Llama papers.
    seq = x.shape[1]
    cos, sin = cos[:seq, None].to(x.dtype), sin[:seq, None].to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        # Output rows: q (n_heads heads), then k and v (n_kv_heads heads each).
        self.qkv_proj = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # o_proj's input is SDPA's output, which the GPU's fused attention keeps for its own
        # backward: under FQ the layer quantizes it for its weight gradient in the backward
        # rather than keeping an INT8 copy (fq/linear.py; 0.5 GiB at 1B, 8 x 2048 tokens).
        self.o_proj.x_int8_in_backward = True

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q, k, v = self.qkv_proj(x).view(b, s, -1, self.head_dim).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=2)
        # RoPE before the heads move in front: q and k stay laid out (batch, seq, heads), and
        # SDPA (cuDNN) lays its output out as q, so the o projection's input below is a view, not
        # a copy (1.4 ms of a 1B step on the H100 at 16 x 2048 tokens).
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # enable_gqa: the kernel reads each k/v head for its group of q heads, so neither the
        # forward nor the saved activations hold k and v repeated n_heads / n_kv_heads times.
        gqa = self.n_kv_heads != self.n_heads
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.gate_up_proj = nn.Linear(cfg.dim, 2 * hidden, bias=False)  # rows: gate, then up
        self.down_proj = nn.Linear(hidden, cfg.dim, bias=False)
        # fq.swiglu_int8: keep gate and up for the backward as INT8 (fq/swiglu.py), not BF16.
        self.swiglu_int8 = False

    def forward(self, x):
        if not isinstance(self.gate_up_proj, FQLinear):
            return self.down_proj(swiglu(*self.gate_up_proj(x).chunk(2, dim=-1), self.swiglu_int8))
        # SwiGLU inside the layer: its backward fused in; and the statistics of h that down_proj's
        # quantization starts from, taken as SwiGLU writes h
        mode = "int8" if self.swiglu_int8 else "bf16"
        if isinstance(self.down_proj, FQLinear) and self.down_proj.takes_stats_from(self.gate_up_proj):
            h, stats = self.gate_up_proj(x, swiglu=mode, return_stats=True)
            return self.down_proj(h, pre=stats)
        return self.down_proj(self.gate_up_proj(x, swiglu=mode))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # Activation checkpointing (train.recompute_every): keep only the block's input and run
        # the forward again in the backward. Inside forward, not a wrapper module, so parameter
        # names and checkpoints are the same either way.
        self.recompute = False

    def forward(self, x, cos, sin):
        if self.recompute and torch.is_grad_enabled():
            # No randomness in the block (no dropout; FQ rounds stochastically only in the
            # backward), so no RNG state needs replaying.
            return checkpoint(self._forward, x, cos, sin, use_reentrant=False, preserve_rng_state=False)
        return self._forward(x, cos, sin)

    def _forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def compile_blocks(model: nn.Module, traceable: bool = True) -> None:
    """train.compile: each block is compiled on its own. `traceable`: dynamo can trace every
    layer of the block; when some run uncompiled (FQ on the reference backend, as on CPU), a
    recomputing block compiles only its body, inside an uncompiled checkpoint: a compiled
    checkpoint cannot hold an uncompiled call, and dynamo then gave up on the whole block (on
    the H100, when stochastic rounding still ran FQ uncompiled, at 1/30 of the speed)."""
    for block in model.layers:
        if block.recompute and not traceable:
            block._forward = torch.compile(block._forward)
        else:
            block.compile()


class OutputHead(nn.Linear):
    """The LM head. With targets it returns the mean cross-entropy, computed a chunk of tokens
    at a time (train/loss.py) so the full FP32 logits never exist; without, the FP32 logits.
    Its own module, so the head's weight is gathered by its forward under sharding (DeepSpeed
    ZeRO-3 gathers per module)."""

    def forward(self, h: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return super().forward(h).float()
        return linear_cross_entropy(h, self.weight, targets)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size must be set (> 0) before building the model")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = OutputHead(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        # Not persistent: derived from the config, so checkpoints stay free of them.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, std); the projections that write into the residual stream are scaled by
        1/sqrt(2 * n_layers) so the residual variance does not grow with depth (GPT-2)."""
        std = self.cfg.init_std
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, residual_std)
            else:
                nn.init.normal_(p, 0.0, std)
        for norm in [m for m in self.modules() if isinstance(m, RMSNorm)]:
            norm.weight.fill_(1.0)
        rope = rope_tables(self.cfg.dim // self.cfg.n_heads, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(rope[0])
        self.rope_sin.copy_(rope[1])

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab) in fp32; with targets (batch, seq),
        the mean cross-entropy instead."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > model.max_seq_len {self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h), targets)


def num_params(model: nn.Module, exclude_embeddings: bool = True) -> int:
    n = sum(p.numel() for p in model.parameters())
    if exclude_embeddings:
        n -= model.tok_embeddings.weight.numel()
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params) + attention (PaLM appendix B)."""
    hidden = ffn_hidden(cfg)
    hd = cfg.dim // cfg.n_heads
    per_layer = cfg.dim * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * cfg.dim * hidden
    matmul_params = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len
