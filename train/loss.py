"""The LM head and the cross-entropy loss, a chunk of tokens at a time.

Computed the plain way (logits = h @ W^T in full, then F.cross_entropy), the loss holds the
FP32 logits, their log-softmax and its gradient for every token of the micro-batch: 2.9 GiB for
4 x 2048 tokens at vocabulary 32000 (docs/benchmarks.md), ~12 GiB at Llama 3's 128k, alive at
the step's peak next to every block's activations. Here each chunk's logits live
only while that chunk is processed: the forward also computes the gradients of h and W (the
softmax minus the one-hot target, times W or h) and keeps only those, h's in h's dtype and W's
in FP32, so no logits survive until the backward. Same loss and gradients as the plain way up to
rounding. Under no_grad (evaluation) no gradient is computed.
"""
from __future__ import annotations

import torch

# Tokens per chunk are chosen so one chunk's FP32 logits hold at most this many values
# (128 MiB): large enough for efficient GEMMs, small next to a micro-batch's activations.
CHUNK_VALUES = 2 ** 25


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_VALUES // vocab_size)


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """Logits of one chunk in FP32, their log-sum-exp and the summed loss."""
    logits = (h @ weight.t()).float()
    lse = logits.logsumexp(-1)
    loss = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    return logits, lse, loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            logits, lse, loss = _chunk_loss(hc, weight, tc)
            total += loss
            # d(mean loss)/d(logits) = (softmax - one_hot) / n, in place over the logits. The 1/n
            # is applied before the cast, as F.cross_entropy's backward does.
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
            g = g.mul_(1.0 / n).to(h.dtype)
            if want_h:
                grad_h[s:s + chunk] = g @ weight
            if want_w:
                grad_w += g.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # grad_loss is 1/accumulation steps in training: exact when that is a power of two.
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against targets.
    h (..., dim), weight (vocab, dim), targets (...) of token ids in [0, vocab)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden states but {targets.shape[0]} targets")
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)
    total = sum(_chunk_loss(h[s:s + chunk], weight, targets[s:s + chunk])[2]
                for s in range(0, h.shape[0], chunk))
    return total / h.shape[0]
