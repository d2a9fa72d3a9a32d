"""logging.profile_steps: the time breakdown's arithmetic, and the files a profiled run writes;
logging.memory_snapshot_step: what is alive at a step's peak."""
import gzip
import json
from types import SimpleNamespace

import pytest
import torch

from tests.test_train import TINY, run_cli
from train.profiling import MemorySnapshot, categorize, peak_breakdown, summarize, union_us

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


def test_every_project_kernel_has_its_category():
    # The kernel names as written in the sources: a new or renamed kernel must not fall into
    # "bf16/fp32 matmul" or "other kernels" (the TMA GEMM once did).
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    expected = {"fq/triton_kernels.py": ("fq gemm", "fq quantize"), "parallel/quantize_triton.py": ("comm quantize",)}
    for path, categories in expected.items():
        names = re.findall(r"def (\w+_kernel)\(", (root / path).read_text())
        assert len(names) >= 3, path
        for name in names:
            assert categorize(name) in categories, (path, name, categorize(name))
    assert categorize("_fq_gemm_tma_kernel") == "fq gemm" and categorize("_scales_kernel") == "fq quantize"
    assert categorize("_gemm_ws_kernel") == "fq gemm"


def test_profiled_run_writes_trace_and_summary(default_cache, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*TINY, "--train.steps=3", "--logging.profile_steps=2", "--logging.profile_start=2",
                    "--logging.memory_snapshot_step=2", f"--logging.dir={run_dir}"], default_cache["cache"])
    summary = json.loads((run_dir / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
    assert summary["top_cpu_ops_ms_per_step"]  # a CPU run: operators, no kernels
    with gzip.open(run_dir / "profile" / "trace_rank0.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]
    assert "profile: 2 step(s)" in proc.stderr
    if torch.cuda.is_available():  # the trainer runs on the GPU: step 2's allocations, by site
        memory = json.loads((run_dir / "profile" / "memory_summary.json").read_text())
        assert memory["peak_bytes"] > 0 and len(memory["groups"]) > 1
        assert "memory: step 2 peaks at" in proc.stderr
    else:
        assert "memory snapshots record the CUDA allocator; this run is on cpu" in proc.stderr


def _frames(line):
    return [{"filename": torch.__file__, "line": 1, "name": "empty"},  # torch's own frames are skipped
            {"filename": "/tmp/torchinductor_x/ab/cabc.py", "line": line, "name": "call"}]


def test_peak_breakdown_groups_what_is_alive_at_the_peak():
    MiB = 2**20
    events = [
        {"action": "alloc", "addr": 1, "size": 256 * MiB, "frames": _frames(10)},   # saved activation, layer 1
        {"action": "alloc", "addr": 2, "size": 256 * MiB, "frames": _frames(10)},   # same line, layer 2
        {"action": "alloc", "addr": 3, "size": 64 * MiB, "frames": _frames(20)},
        {"action": "free_completed", "addr": 3, "size": 64 * MiB},
        {"action": "free_completed", "addr": 99, "size": 100 * MiB},                # allocated before the step
        {"action": "alloc", "addr": 4, "size": 300 * MiB, "frames": _frames(30)},   # the peak: 1000 + 812 - 100
        {"action": "free_requested", "addr": 4, "size": 300 * MiB},                 # not yet back
        {"action": "free_completed", "addr": 4, "size": 300 * MiB},
        {"action": "free_completed", "addr": 1, "size": 256 * MiB},
        {"action": "alloc", "addr": 5, "size": 8 * MiB, "frames": []},
    ]
    b = peak_breakdown(events, before_bytes=1000 * MiB)
    assert b["peak_bytes"] == (1000 - 100 + 512 + 300) * MiB and b["peak_event"] == 5
    groups = {g["site"].split(" ")[0]: (g["bytes"] // MiB, g["blocks"]) for g in b["groups"]}
    assert groups == {"allocated": (900, None), "cabc.py:30": (300, 1), "cabc.py:10": (512, 2)}
    assert b["groups"][0]["site"].startswith("allocated before the step")
    assert [g["bytes"] for g in b["groups"][1:]] == [512 * MiB, 300 * MiB]  # largest first
    assert sum(g["bytes"] for g in b["groups"]) == b["peak_bytes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="records the CUDA allocator")
def test_memory_snapshot_names_the_line_that_allocated_the_peak(tmp_path):
    device = torch.device("cuda", torch.cuda.current_device())
    keep = torch.empty(2**20, device=device)  # before the step
    snap = MemorySnapshot(1, str(tmp_path), 0, device)
    snap.before(1)
    torch.empty(2**21, device=device)  # 8 MiB, freed at once, before the peak
    held = [torch.empty(2**22, device=device) for _ in range(3)]  # 3 x 16 MiB, alive at the peak
    snap.after(1)
    summary = json.loads((tmp_path / "profile" / "memory_summary.json").read_text())
    assert (tmp_path / "profile" / "memory_rank0.pickle").stat().st_size > 0
    top = summary["groups"][1]
    assert "test_profiling.py" in top["site"] and "held = " in top["site"]
    assert top["bytes"] == 3 * 2**24 and top["blocks"] == 3
    assert summary["groups"][0]["bytes"] == torch.cuda.memory_allocated(device) - 3 * 2**24
    del held, keep
