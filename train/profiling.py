"""Profile a few training steps: a Chrome trace per rank and a summary of where the time goes.

    fqtrain --logging.profile_steps=3 --logging.profile_start=10

Steps profile_start .. profile_start + profile_steps - 1 run under torch.profiler. Each rank
writes `{run_dir}/profile/trace_rank{R}.json.gz` (open in Perfetto or chrome://tracing). Rank 0
also writes `profile/summary.json` and logs a table: wall time per step, how much of it the GPU
was busy (the union of kernel intervals), and GPU time and launches per kernel category. A GPU
busy far below the wall time means the step is bound by the host (Python, launches), not by
the kernels; `tools/trace_gaps.py` charges the idle time to the host ops that caused it.

    fqtrain --logging.memory_snapshot_step=10

records every CUDA allocation of step 10 and writes `profile/memory_rank{R}.pickle` (drag it into
https://pytorch.org/memory_viz). Rank 0 also writes `profile/memory_summary.json` and logs what
was alive at the step's peak, by the line that allocated it: for compiled blocks, a line of
inductor's generated code, which names the buffer's shape and dtype.
"""
from __future__ import annotations

import json
import linecache
import logging
import os
import pickle
import re
import time

import torch

log = logging.getLogger("fqtrain")

# First match wins; names are kernel names as the profiler records them.
CATEGORIES = [
    ("fq gemm", r"_fq_gemm_kernel|_fq_gemm_tma_kernel|_gemm_ws_kernel|_fallback_tail_kernel"),
    # _swiglu_kernel and _swiglu_grad_kernel also compute SwiGLU's forward and backward, "other
    # kernels" in a BF16 profile
    ("fq quantize", r"_act_stats_kernel|_act_quant_kernel|_fallback_quant_kernel|_scales_kernel"
                    r"|_row_quant_kernel|_col_absmax_kernel|_col_quant_kernel"
                    r"|_swiglu_kernel|_swiglu_grad_kernel"),
    ("comm quantize", r"_quantize_kernel|_dequantize_kernel|_dequantize_sum_kernel"),
    ("nccl", r"nccl"),
    ("attention", r"flash|fmha|attention|attn"),
    ("bf16/fp32 matmul", r"gemm|cutlass|nvjet|xmma|cublas|sm\d+_|splitK"),
    ("optimizer", r"multi_tensor_apply|adam"),
    ("copy / cast / fill", r"[Mm]emcpy|[Mm]emset|copy|cast|fill|to_copy"),
]
OTHER = "other kernels"


def categorize(name: str) -> str:
    for category, pattern in CATEGORIES:
        if re.search(pattern, name):
            return category
    return OTHER


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels on several streams overlap)."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def summarize(events, steps: int, wall_s: float) -> dict:
    """Per-step figures from the profiler's events (device-side ones only, plus the wall time)."""
    per_cat: dict[str, list[float]] = {}
    per_kernel: dict[str, list[float]] = {}
    intervals = []
    cpu_ops: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU:
            cpu_ops[e.name] = cpu_ops.get(e.name, 0.0) + e.self_cpu_time_total
            continue
        if "#" in e.name or e.name.startswith(("FSDP::", "ProfilerStep")):
            continue  # a user annotation shown on the GPU timeline, spanning kernels: not a kernel
        start, end = e.time_range.start, e.time_range.end
        intervals.append((start, end))
        per_cat.setdefault(categorize(e.name), []).append(end - start)
        per_kernel.setdefault(e.name, []).append(end - start)
    busy_ms = union_us(intervals) / 1e3 / steps
    wall_ms = wall_s * 1e3 / steps
    cats = {c: {"ms_per_step": sum(d) / 1e3 / steps, "launches_per_step": len(d) / steps}
            for c, d in sorted(per_cat.items(), key=lambda kv: -sum(kv[1]))}
    return {"steps": steps, "wall_ms_per_step": wall_ms, "gpu_busy_ms_per_step": busy_ms,
            "gpu_busy_fraction": busy_ms / wall_ms if wall_ms > 0 else 0.0,
            "launches_per_step": len(intervals) / steps, "categories": cats,
            "top_kernels": [{"name": n[:120], "ms_per_step": sum(d) / 1e3 / steps, "launches_per_step": len(d) / steps}
                            for n, d in sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:15]],
            "top_cpu_ops_ms_per_step": {n: t / 1e3 / steps for n, t in
                                        sorted(cpu_ops.items(), key=lambda kv: -kv[1])[:8]}}


def format_summary(s: dict) -> str:
    lines = [f"profile: {s['steps']} step(s), wall {s['wall_ms_per_step']:.1f} ms/step, GPU busy "
             f"{s['gpu_busy_ms_per_step']:.1f} ms/step ({100 * s['gpu_busy_fraction']:.0f}%), "
             f"{s['launches_per_step']:.0f} kernel launches/step"]
    for c, v in s["categories"].items():
        lines.append(f"  {c:<20} {v['ms_per_step']:9.2f} ms/step {v['launches_per_step']:8.0f} launches/step")
    if s.get("top_kernels"):
        lines.append("  top kernels:")
        for k in s["top_kernels"][:8]:
            lines.append(f"    {k['ms_per_step']:8.2f} ms/step {k['launches_per_step']:6.0f}x  {k['name'][:70]}")
    if not s["categories"]:  # a CPU run: the operators that took the most time themselves
        for n, ms in s["top_cpu_ops_ms_per_step"].items():
            lines.append(f"  {n[:40]:<40} {ms:9.2f} ms/step (self CPU)")
    return "\n".join(lines)


class StepProfiler:
    """Wraps the training loop: call `before(step)` and `after(step)` around each step (1-based)."""

    def __init__(self, start: int, steps: int, run_dir: str, rank: int, device: torch.device):
        self.first, self.last = start, start + steps - 1
        self.enabled = steps > 0
        self.dir = os.path.join(run_dir, "profile")
        self.rank, self.device = rank, device
        self.prof = None
        self.t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before(self, step: int) -> None:
        if not self.enabled or step != self.first:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        if self.prof is None or step != self.last:
            return
        self._sync()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        os.makedirs(self.dir, exist_ok=True)
        trace = os.path.join(self.dir, f"trace_rank{self.rank}.json.gz")
        self.prof.export_chrome_trace(trace)
        if self.rank == 0:
            summary = summarize(self.prof.events(), self.last - self.first + 1, wall)
            with open(os.path.join(self.dir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
            log.info(format_summary(summary))
            log.info(f"profile: trace in {trace}")
        self.prof = None


def allocation_site(frames: list[dict]) -> str:
    """Where a block was allocated: the innermost Python frame outside torch (project code, or
    inductor's generated code for a compiled graph), with its source line."""
    torch_dir = os.path.dirname(torch.__file__)
    for fr in frames:
        name = fr.get("filename", "")
        if name.startswith(torch_dir) or not name.endswith(".py") or "/lib/python" in name:
            continue
        text = linecache.getline(name, fr.get("line", 0)).strip()
        return f"{os.path.basename(name)}:{fr.get('line')} {fr.get('name', '')}" + (f": {text[:90]}" if text else "")
    # No Python frame: allocated from C++, mostly the autograd engine running the backward.
    return "torch internals" if frames else "no Python frame (the backward's engine, C++)"


def peak_breakdown(events: list[dict], before_bytes: int, top: int = 12) -> dict:
    """Replay a step's allocator trace (`alloc` / `free_completed` events) from `before_bytes`
    already allocated, and group what is alive at the highest point by allocation site. Blocks
    allocated before the step (parameters, optimizer state) form one group."""
    def replay(stop: int | None):
        live, before, total, peak, peak_at = {}, before_bytes, before_bytes, before_bytes, -1
        for i, e in enumerate(events[:stop]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e.get("frames", []))
                total += e["size"]
            elif e["action"] == "free_completed":
                if e["addr"] in live:
                    total -= live.pop(e["addr"])[0]
                else:  # freed during the step, allocated before it
                    total -= e["size"]
                    before -= e["size"]
            if total > peak:
                peak, peak_at = total, i
        return live, before, peak, peak_at

    _, _, peak, peak_at = replay(None)
    live, before, _, _ = replay(peak_at + 1)
    sites: dict[str, list[int]] = {}
    for size, frames in live.values():
        entry = sites.setdefault(allocation_site(frames), [0, 0])
        entry[0] += size
        entry[1] += 1
    groups = [{"site": "allocated before the step (parameters, optimizer state, ...)", "bytes": before, "blocks": None}]
    groups += [{"site": k, "bytes": b, "blocks": n} for k, (b, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])]
    shown = groups[:top + 1]
    rest = sum(g["bytes"] for g in groups[top + 1:])
    if rest:
        shown.append({"site": f"{len(groups) - top - 1} other sites", "bytes": rest, "blocks": None})
    return {"peak_bytes": peak, "peak_event": peak_at, "events": len(events), "groups": shown}


def format_breakdown(b: dict, step: int) -> str:
    lines = [f"memory: step {step} peaks at {b['peak_bytes'] / 2**30:.2f} GiB; alive then, by allocation site:"]
    for g in b["groups"]:
        n = "" if g["blocks"] is None else f" ({g['blocks']} blocks)"
        lines.append(f"  {g['bytes'] / 2**30:8.3f} GiB{n:>14}  {g['site']}")
    return "\n".join(lines)


class MemorySnapshot:
    """logging.memory_snapshot_step: record the CUDA allocator over one step (`before` / `after`
    around each step, 1-based), write the snapshot, and log what is alive at the step's peak."""

    def __init__(self, step: int, run_dir: str, rank: int, device: torch.device):
        self.step, self.rank, self.device = step, rank, device
        self.dir = os.path.join(run_dir, "profile")
        self.base = None
        if step and device.type != "cuda":
            log.warning(f"logging.memory_snapshot_step={step}: memory snapshots record the CUDA allocator; "
                        f"this run is on {device.type}, so none is taken")
            self.step = 0

    def before(self, step: int) -> None:
        if step != self.step:
            return
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=2_000_000, device=self.device)

    def after(self, step: int) -> None:
        if self.base is None or step != self.step:
            return
        torch.cuda.synchronize(self.device)
        snapshot = torch.cuda.memory._snapshot(self.device)
        torch.cuda.memory._record_memory_history(enabled=None, device=self.device)
        os.makedirs(self.dir, exist_ok=True)
        path = os.path.join(self.dir, f"memory_rank{self.rank}.pickle")
        with open(path, "wb") as f:
            pickle.dump(snapshot, f)
        if self.rank == 0:
            trace = snapshot["device_traces"][self.device.index or 0]
            breakdown = peak_breakdown(trace, self.base)
            with open(os.path.join(self.dir, "memory_summary.json"), "w", encoding="utf-8") as f:
                json.dump(breakdown, f, indent=1)
            log.info(format_breakdown(breakdown, step))
            log.info(f"memory: snapshot in {path} (open it at https://pytorch.org/memory_viz)")
        self.base = None
