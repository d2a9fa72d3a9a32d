"""The bulk INT8 GEMM on Hopper, warp-specialized in Gluon (Triton's lower-level dialect).

C = (A B^T) * sa[:, None] (* sb[None, :]) for INT8 A (M, K), B (N, K), both K-major, and a
16-bit C: the same result, bit for bit, as `_fq_gemm_tma_kernel` in fq/triton_kernels.py, which
runs wherever this one cannot (see `unfit`).

Why a second kernel: in Triton's own persistent kernel one block's epilogue (scales, conversion,
the store of C) runs while the tensor cores wait, and with K = 2048 (16 steps of 128) that left
the 1B model's GEMMs at 59% of the INT8 peak against 67-70% for longer K. No configuration of it
did better (docs/benchmarks.md, sessions 20-21). Here one loader warp fills a ring of K steps
through TMA, and two consumer warp groups take alternate 128 x 128 output blocks: one's epilogue
runs while the other's MMAs do ("ping-pong").
"""
from __future__ import annotations

import torch
import triton

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    IMPORT_ERROR = None
except ImportError as e:  # a Triton without Gluon, or with another Gluon API
    IMPORT_ERROR = f"triton {triton.__version__} has no usable Gluon ({e})"

# 128 x 128 blocks per consumer (its INT32 accumulator is 128 registers a thread), 128-deep K
# steps, 4 stages: swept on the H100 against 5 stages, 64-deep steps with 8-10 stages, GROUP_M 16
# and one consumer (docs/benchmarks.md, session 22).
TILE_M, TILE_N, TILE_K, RING, GROUPS = 128, 128, 128, 4, 8
VERIFIED = "3.6."
# Registers: 3 warp groups (2 consumers and the loader's) share the SM's 64K; the loader needs
# few, the consumers take the rest.
MAXNREG, CONSUMER_NREG, LOADER_NREG = 168, 232, 24


def unfit(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> str | None:
    """Why this kernel cannot compute C here (None: it can). The caller has already checked
    what TMA needs of the operands (16-byte aligned rows)."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    if not triton.__version__.startswith(VERIFIED):
        # Gluon is experimental and its API moves between releases (Triton 3.9 renamed the TMA
        # copies): only the release this kernel was checked on, on the GPU, runs it.
        return f"the warp-specialized Gluon GEMM is verified on Triton {VERIFIED}x only, not {triton.__version__}"
    from fq.triton_kernels import _props  # read once per device; this runs on every eager GEMM
    if a.device.type != "cuda" or _props(a.device).major != 9:
        return "the warp-specialized Gluon GEMM needs Hopper's wgmma (sm_90)"
    if c.element_size() != 2:
        return f"the warp-specialized Gluon GEMM writes 16-bit outputs, not {c.dtype}"
    return None


if IMPORT_ERROR is None:
    BLOCK_M, BLOCK_N, BLOCK_K = gl.constexpr(TILE_M), gl.constexpr(TILE_N), gl.constexpr(TILE_K)
    STAGES, GROUP_M = gl.constexpr(RING), gl.constexpr(GROUPS)
    CONSUMER_REGS, LOADER_REGS = gl.constexpr(CONSUMER_NREG), gl.constexpr(LOADER_NREG)

    @gluon.jit
    def _block(t, num_m, num_n):
        """Output block t in grouped order: GROUP_M block rows share each B panel while in L2."""
        group = GROUP_M * num_n
        first_m = (t // group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (t % group) % size_m, (t % group) // size_m

    @gluon.jit
    def _loader(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, M, N, K,
                HAS_SB: gl.constexpr, PROGRAMS: gl.constexpr):
        """One warp: this program's blocks in order, each block's K steps into the ring."""
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        it = 0
        for t in range(gl.program_id(0), num_m * num_n, PROGRAMS):
            pm, pn = _block(t, num_m, num_n)
            for kk in range(gl.cdiv(K, BLOCK_K)):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pm * BLOCK_M, kk * BLOCK_K], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [pn * BLOCK_N, kk * BLOCK_K], ready.index(s), b_bufs.index(s))
                it += 1

    @gluon.jit
    def _consumer(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, M, N, K,
                  HAS_SB: gl.constexpr, PROGRAMS: gl.constexpr, WG: gl.constexpr):
        """One warp group: blocks WG, WG + 2, ... of this program's, MMAs then the epilogue."""
        layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 32])
        c_smem = c_bufs.index(WG)
        num_m = gl.cdiv(M, BLOCK_M)
        num_n = gl.cdiv(N, BLOCK_N)
        ksteps = gl.cdiv(K, BLOCK_K)
        i = 0
        for t in range(gl.program_id(0) + WG * PROGRAMS, num_m * num_n, 2 * PROGRAMS):
            pm, pn = _block(t, num_m, num_n)
            it = (2 * i + WG) * ksteps  # the ring position of this block's first K step
            # Wait for the ring's stages only after the other consumer has waited for all of the
            # previous block's: a wait on a parity two phases ahead of a barrier would pass early.
            mbarrier.wait(turn.index(WG), (i & 1) ^ (1 - WG))
            acc = gl.zeros((BLOCK_M, BLOCK_N), gl.int32, layout)
            for kk in range(ksteps):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))
                # The previous step's MMA is done: its stage may be refilled.
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1, pred=kk > 0)
                it += 1
            mbarrier.arrive(turn.index(1 - WG), count=1)
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1)
            rows = pm * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, layout))
            out = acc.to(gl.float32) * gl.expand_dims(gl.load(sa_ptr + rows, mask=rows < M, other=0.0), 1)
            cols = pn * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
            # Without column scales, times ones (exact); an argument no partition reads broke
            # Triton 3.6's lowering of the warp-specialized region.
            sb = gl.load(sb_ptr + cols, mask=(cols < N) & HAS_SB, other=1.0)
            out = out * gl.expand_dims(sb, 0)
            tma.store_wait(0)  # this consumer's previous store has left c_smem
            c_smem.store(out.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [pm * BLOCK_M, pn * BLOCK_N], c_smem)
            i += 1
        tma.store_wait(0)

    @gluon.jit
    def _consumer1(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, M, N, K,
                   HAS_SB: gl.constexpr, PROGRAMS: gl.constexpr):
        """The second consumer: worker partitions all take the loader's arguments."""
        _consumer(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, M, N, K,
                  HAS_SB, PROGRAMS, 1)

    @gluon.jit
    def _gemm_ws_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, s_am, s_bn, s_cm, a_layout: gl.constexpr,
                        c_layout: gl.constexpr, HAS_SB: gl.constexpr, PROGRAMS: gl.constexpr):
        # Descriptors built on the device (128 B of scratch each from triton's allocator), as
        # `_fq_gemm_tma_kernel` does.
        a_desc = tma.make_tensor_descriptor(a_ptr, [M, K], [s_am, 1], [BLOCK_M, BLOCK_K], a_layout)
        b_desc = tma.make_tensor_descriptor(b_ptr, [N, K], [s_bn, 1], [BLOCK_N, BLOCK_K], a_layout)
        c_desc = tma.make_tensor_descriptor(c_ptr, [M, N], [s_cm, 1], [BLOCK_M, BLOCK_N], c_layout)
        a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_M, BLOCK_K], a_layout)
        b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BLOCK_N, BLOCK_K], a_layout)
        c_bufs = gl.allocate_shared_memory(c_desc.dtype, [2, BLOCK_M, BLOCK_N], c_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(STAGES):
            mbarrier.init(ready.index(s), count=1)
            mbarrier.init(empty.index(s), count=1)
        for w in gl.static_range(2):
            mbarrier.init(turn.index(w), count=1)
        args = (a_desc, b_desc, c_desc, sa_ptr, sb_ptr, a_bufs, b_bufs, c_bufs, ready, empty, turn, M, N, K, HAS_SB,
                PROGRAMS)
        gl.warp_specialize([(_consumer, args + (0,)), (_consumer1, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, LOADER_REGS])


def gemm(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor | None, c: torch.Tensor,
         programs: int) -> torch.Tensor:
    """Write (a @ b.T) * sa[:, None] (* sb[None, :]) into c with `programs` persistent programs
    (one per SM); `unfit` must have said None, and triton's allocator must be set (the
    descriptors' scratch)."""
    m, k = a.shape
    n = b.shape[0]
    a_layout = gl.NVMMASharedLayout.get_default_for([TILE_M, TILE_K], gl.int8)
    c_layout = gl.NVMMASharedLayout.get_default_for([TILE_M, TILE_N], gl.bfloat16 if c.dtype == torch.bfloat16
                                                    else gl.float16)
    programs = min(programs, triton.cdiv(m, TILE_M) * triton.cdiv(n, TILE_N))
    _gemm_ws_kernel[(programs,)](a, b, c, sa, sb if sb is not None else sa, m, n, k, a.stride(0), b.stride(0),
                                 c.stride(0), a_layout, c_layout, HAS_SB=sb is not None, PROGRAMS=programs,
                                 num_warps=4, maxnreg=MAXNREG)
    return c


if IMPORT_ERROR is None:

    @torch.library.custom_op("fq::gemm_ws", mutates_args=())
    def _gemm_op(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor | None,
                 out_dtype: torch.dtype, programs: int) -> torch.Tensor:
        """`gemm` as an op that torch.compile keeps opaque: inductor traces the Triton kernels
        inside fq's ops, but not a Gluon one."""
        from fq.triton_kernels import _scratch  # fq.triton_kernels imports this module
        triton.set_allocator(_scratch)
        c = torch.empty(a.shape[0], b.shape[0], dtype=out_dtype, device=a.device)
        return gemm(a, b, sa, sb, c, programs)

    @_gemm_op.register_fake
    def _(a, b, sa, sb, out_dtype, programs):
        return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)
