"""Profile a few training steps: a Chrome trace per rank and a summary of where the time goes.

    fqtrain --logging.profile_steps=3 --logging.profile_start=10

Steps profile_start .. profile_start + profile_steps - 1 run under torch.profiler. Each rank
writes `{run_dir}/profile/trace_rank{R}.json.gz` (open in Perfetto or chrome://tracing). Rank 0
also writes `profile/summary.json` and logs a table: wall time per step, how much of it the GPU
was busy (the union of kernel intervals), and GPU time and launches per kernel category. A GPU
busy far below the wall time means the step is bound by the host (Python, launches), not by
the kernels.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time

import torch

log = logging.getLogger("fqtrain")

# First match wins; names are kernel names as the profiler records them.
CATEGORIES = [
    ("fq gemm", r"_fq_gemm_kernel"),
    ("fq quantize", r"_act_stats_kernel|_act_quant_kernel|_line_quant_kernel|_scales_kernel"),
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
