"""The LM head and the cross-entropy loss, a chunk of tokens at a time.

Computed the plain way (logits = h @ W^T in full, then F.cross_entropy), the loss holds the
FP32 logits, their log-softmax and its gradient for every token of the micro-batch: 2.9 GiB for
8192 tokens at vocabulary 32000, 11.7 GiB at Llama 3's 128k (tools/bench_loss.py), alive at the
step's peak next to every block's activations. Here each chunk's logits live only while
that chunk is processed: the forward also computes the gradients of h and W (the softmax minus
the one-hot target, times W or h; W's summed over the chunks in FP32) and keeps only those, in
h's and W's dtypes, so no logits survive until the backward. Same loss and gradients as the
plain way up to rounding. Under no_grad (evaluation) no gradient is computed.

On CUDA each chunk's softmax step is one Triton kernel (train/loss_kernel.py) that overwrites the
chunk's BF16 logits with their gradient; `softmax_xent_torch` is its reference and the CPU path.
"""
from __future__ import annotations

import functools
import logging

import torch

log = logging.getLogger("fqtrain.loss")

# Tokens per chunk. Each chunk adds its share to W's FP32 gradient (a read and a write of
# vocab x dim values), so small chunks are slow. On the H100 (tools/bench_loss.py, 2026-11-25,
# the softmax step in its kernel) 2048 tokens take 0.69-0.70x the plain loss's time at vocab
# 32000 and 0.86x at 128k (dim 4096); 1024 tokens 0.8-0.93x, 4096 tokens 4-7% less than 2048
# for 1.4-1.5x its peak. One chunk's BF16 logits are 2048 x vocab x 2 bytes: 125 MiB at 32k,
# 500 MiB at 128k.
CHUNK_TOKENS = 2048


def softmax_xent_torch(logits: torch.Tensor, targets: torch.Tensor,
                       grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token losses (FP32) of one chunk's logits (tokens, vocab) against targets, and with
    `grad` d(sum of losses)/d(logits) = softmax - one_hot in the logits' dtype. The reference of
    train/loss_kernel.py's kernel, and the path on CPU."""
    lsm = torch.log_softmax(logits, -1, dtype=torch.float32)  # one kernel, no FP32 copy first
    loss = -lsm.gather(1, targets[:, None]).squeeze(1)
    if not grad:
        return loss, None
    g = lsm.exp_()  # in place over the log-softmax
    g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
    return loss, g.to(logits.dtype)


@functools.cache
def _kernel():
    """train/loss_kernel.softmax_xent, or None with a warning when Triton cannot be imported."""
    try:
        from train import loss_kernel
    except Exception as e:  # noqa: BLE001 - any import failure means the torch path
        log.warning("loss: the Triton cross-entropy kernel is unavailable (%s: %s); the loss runs "
                    "in torch, about 10 ms slower per 16 x 2048-token step at vocab 32000 on an H100",
                    type(e).__name__, e)
        return None
    return loss_kernel.softmax_xent


def _softmax_xent(logits: torch.Tensor, targets: torch.Tensor, grad: bool):
    kernel = _kernel() if logits.is_cuda else None
    return (kernel or softmax_xent_torch)(logits, targets, grad)


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc += alpha * a @ b, the product summed into FP32 acc without a BF16 rounding of its own.
    On CUDA one cuBLAS GEMM whose epilogue adds into acc; a BF16 product and then an FP32 add
    cost an extra 269 us per 2048-token chunk at vocab 32000, dim 2048 on the H100. torch has no
    such GEMM on CPU, where the operands are upcast instead."""
    if acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
    else:
        acc.addmm_(a.float(), b.float(), alpha=alpha)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        n = h.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.zeros_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            # g = d(sum of losses)/d(logits); the mean's 1/n is applied inside the GEMMs (alpha),
            # so no extra rounding step.
            losses, g = _softmax_xent(hc @ weight.t(), tc, grad=True)
            total += losses.sum()
            if want_h:
                torch.addmm(grad_h[s:s + chunk], g, weight, beta=0, alpha=1.0 / n, out=grad_h[s:s + chunk])
            if want_w:
                _add_product_fp32(grad_w, g.t(), hc, 1.0 / n)
        if want_w:  # summed in FP32 over the chunks; kept until the backward in W's dtype
            grad_w = grad_w.to(weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # grad_loss is 1/accumulation steps in training: exact when that is a power of two.
        dh = grad_h * grad_loss.to(grad_h.dtype) if grad_h is not None else None
        dw = grad_w * grad_loss.to(grad_w.dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight^T against targets.
    h (..., dim), weight (vocab, dim), targets (...) of token ids in [0, vocab)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h.shape[0] != targets.shape[0]:
        raise ValueError(f"{h.shape[0]} hidden states but {targets.shape[0]} targets")
    chunk = chunk or CHUNK_TOKENS
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, chunk)
    total = sum(_softmax_xent(h[s:s + chunk] @ weight.t(), targets[s:s + chunk], grad=False)[0].sum()
                for s in range(0, h.shape[0], chunk))
    return total / h.shape[0]
