"""INT8 collectives on gloo (2 and 4 processes): identical gathered weights on every rank, and the
reduce-scatter's error against the exact fp32 sum within the stated bound, heavy tails included.

Stated bound (round to nearest): each dequantized value is off by at most half a step of its
block, step = absmax(block) / 127, so an element of the INT8 reduce-scatter differs from the
exact sum by at most the sum over source ranks of those half steps (plus fp32 rounding).
"""
import torch
import torch.distributed as dist
import pytest

from parallel.collectives import (Int8AllGather, Int8ReduceScatter, Int8ReplicaAllReduce,
                                  comm_stats, reset_comm_stats)
from parallel.testing import run_workers

BLOCK = 256


def _heavy_tailed(shape, g):
    x = torch.randn(shape, generator=g) / torch.sqrt(torch.distributions.Chi2(2.0).sample(shape) / 2)
    idx = torch.randint(0, x.numel(), (max(1, x.numel() // 1000),), generator=g)
    x.view(-1)[idx] *= 1e3
    return x


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _half_steps(x: torch.Tensor, block: int) -> torch.Tensor:
    """Per element: half the quantization step of its block, for rows of x (R, n)."""
    rows, n = x.shape
    nb = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, nb * block - n)).view(rows, nb, block)
    step = padded.abs().amax(-1, keepdim=True) / 127
    return (step / 2).expand_as(padded).reshape(rows, -1)[:, :n]


def _all_gather_checks(rank, world, g):
    for n in (1, 37, BLOCK, 5000):
        local = torch.randn(n, generator=g) * (rank + 1)
        out = torch.full((world * n,), float("nan"))
        # FSDP hands the collective a view of the output's own slot as input.
        inp = out[rank * n:(rank + 1) * n]
        inp.copy_(local)
        assert Int8AllGather(BLOCK)(out, inp, dist.group.WORLD) is None
        copies = _gather(out)
        assert all(torch.equal(copies[0], c) for c in copies), "ranks hold different weights"
        exact = torch.cat(_gather(local))
        bound = torch.cat([_half_steps(x.view(1, -1), BLOCK)[0] for x in _gather(local)])
        assert ((out - exact).abs() <= bound * (1 + 1e-5)).all()


def _reduce_scatter_checks(rank, world, g):
    n = 3000
    for kind in ("normal", "heavy"):
        x = torch.randn(world * n, generator=g) if kind == "normal" else _heavy_tailed((world * n,), g)
        out = torch.full((n,), float("nan"))
        Int8ReduceScatter(BLOCK)(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
        exact = torch.empty(n)
        dist.reduce_scatter_tensor(exact, x.clone())
        # Half steps of every source rank's row destined to this rank.
        rows_to_me = torch.stack([s.view(world, n)[rank] for s in _gather(x)])
        bound = _half_steps(rows_to_me, BLOCK).sum(0)
        err = (out - exact).abs()
        assert (err <= bound * (1 + 1e-4) + 1e-6 * exact.abs()).all(), kind
        rel = (err.norm() / exact.norm()).item()
        # Heavy tails: the small values that share a block with an outlier lose resolution.
        assert rel < (0.01 if kind == "normal" else 0.03), f"{kind}: relative L2 error {rel:.4f}"
        avg = torch.empty(n)
        Int8ReduceScatter(BLOCK)(avg, x.clone(), dist.group.WORLD, dist.ReduceOp.AVG)
        torch.testing.assert_close(avg, out / world)
    # Stochastic rounding: at most a whole step per source.
    x = torch.randn(world * n, generator=g)
    out = torch.empty(n)
    Int8ReduceScatter(BLOCK, stochastic=True)(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
    exact = torch.empty(n)
    dist.reduce_scatter_tensor(exact, x.clone())
    rows_to_me = torch.stack([s.view(world, n)[rank] for s in _gather(x)])
    assert ((out - exact).abs() <= 2 * _half_steps(rows_to_me, BLOCK).sum(0) * (1 + 1e-4)).all()


def _error_feedback_checks(rank, world, g):
    # The same gradient T times: without feedback the rounding error adds up T times; with
    # feedback what was lost is sent next time, so the running sum stays within one step.
    n, steps = 2000, 20
    x = torch.randn(world * n, generator=g)
    exact = torch.empty(n)
    dist.reduce_scatter_tensor(exact, x.clone())
    errors = {}
    for feedback in (False, True):
        comm = Int8ReduceScatter(BLOCK, error_feedback=feedback)
        total = torch.zeros(n)
        for _ in range(steps):
            out = torch.empty(n)
            comm(out, x.clone(), dist.group.WORLD, dist.ReduceOp.SUM)
            total += out
        errors[feedback] = ((total - steps * exact).norm() / (steps * exact.norm())).item()
    assert errors[True] < 0.2 * errors[False], errors


def _replica_all_reduce_checks(rank, world, g):
    for n in (5, 4099):  # fewer values than ranks, and uneven chunks
        x = _heavy_tailed((n,), g)
        t = x.clone()
        Int8ReplicaAllReduce(dist.group.WORLD, BLOCK)(t)
        copies = _gather(t)
        assert all(torch.equal(copies[0], c) for c in copies), "replicas disagree"
        exact = x.clone()
        dist.all_reduce(exact)
        rel = ((t - exact).norm() / exact.norm()).item()
        assert rel < 0.04, rel  # two roundings (reduce-scatter, all-gather), heavy tails


def _bytes_checks(rank, world, g):
    reset_comm_stats()
    n = 8192
    out = torch.empty(world * n)
    Int8AllGather(BLOCK)(out, out[rank * n:(rank + 1) * n].normal_(), dist.group.WORLD)
    x = torch.randn(world * n, generator=g)
    Int8ReduceScatter(BLOCK)(torch.empty(n), x, dist.group.WORLD, dist.ReduceOp.SUM)
    stats = comm_stats()
    assert stats["all_gather_bytes"] <= 0.52 * n * 2           # vs bf16
    assert stats["reduce_scatter_bytes"] <= 0.27 * world * n * 4  # vs fp32
    assert stats["all_gather_calls"] == stats["reduce_scatter_calls"] == 1


def _worker(rank, world):
    g = torch.Generator().manual_seed(1000 + rank)
    torch.manual_seed(7)  # the same on every rank: the chi-squared draws of _heavy_tailed
    _all_gather_checks(rank, world, g)
    _reduce_scatter_checks(rank, world, g)
    _error_feedback_checks(rank, world, g)
    _replica_all_reduce_checks(rank, world, g)
    _bytes_checks(rank, world, g)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_int8_collectives(world):
    run_workers(_worker, world, timeout=180)


def test_unsupported_reduce_op_is_refused():
    from parallel.collectives import _sum_only

    assert _sum_only(dist.ReduceOp.SUM) and not _sum_only(dist.ReduceOp.AVG)
    with pytest.raises(ValueError, match="force-sum"):
        _sum_only(dist.ReduceOp.MAX)
