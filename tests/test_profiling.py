"""logging.profile_steps: the time breakdown's arithmetic, and the files a profiled run writes."""
import gzip
import json
from types import SimpleNamespace

import torch

from tests.test_train import TINY, run_cli
from train.profiling import categorize, summarize, union_us

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def _event(name, start, end, device=CUDA, self_cpu=0.0):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           self_cpu_time_total=self_cpu)


def test_union_of_overlapping_kernels():
    assert union_us([]) == 0.0
    assert union_us([(0, 10), (5, 20), (30, 40), (32, 35)]) == 30.0


def test_categories_and_per_step_figures():
    events = [_event("_fq_gemm_kernel", 0, 400), _event("_act_quant_kernel", 400, 500),
              _event("sm90_xmma_gemm_bf16bf16", 600, 1000), _event("ncclDevKernel_AllGather", 500, 900),
              _event("vectorized_elementwise_kernel", 1000, 1100), _event("aten::mm", 0, 50, CPU, 50.0),
              _event("Optimizer.step#AdamW.step", 0, 5000)]  # an annotation, not a kernel
    s = summarize(events, steps=2, wall_s=2e-3)  # 2 steps in 2 ms of wall time
    assert s["wall_ms_per_step"] == 1.0 and s["launches_per_step"] == 2.5
    assert abs(s["gpu_busy_ms_per_step"] - 0.55) < 1e-9  # union 0..1100 us over 2 steps
    cats = s["categories"]
    assert cats["fq gemm"]["ms_per_step"] == 0.2 and cats["fq quantize"]["launches_per_step"] == 0.5
    assert set(cats) == {"fq gemm", "fq quantize", "bf16/fp32 matmul", "nccl", "other kernels"}
    assert list(cats)[0] == "fq gemm"  # largest first
    assert s["top_cpu_ops_ms_per_step"] == {"aten::mm": 0.025}
    top = {k["name"]: (k["ms_per_step"], k["launches_per_step"]) for k in s["top_kernels"]}
    assert len(top) == 5 and top["sm90_xmma_gemm_bf16bf16"] == (0.2, 0.5)
    assert categorize("flash_fwd_kernel") == "attention" and categorize("Memcpy DtoD") == "copy / cast / fill"


def test_profiled_run_writes_trace_and_summary(default_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "--train.steps=3", "--logging.profile_steps=2", "--logging.profile_start=2",
                    f"--logging.dir={run_dir}"], default_cache["cache"])
    summary = json.loads((run_dir / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["top_cpu_ops_ms_per_step"]  # a CPU run: operators, no kernels
    with gzip.open(run_dir / "profile" / "trace_rank0.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert "profile: 2 step(s)" in proc.stderr
