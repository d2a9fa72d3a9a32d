"""tools/trace_gaps.py: GPU idle gaps in a Chrome trace, charged to the host ops open meanwhile."""
import gzip
import json

import pytest

from tools.trace_gaps import by_host_op, gaps, load


def _x(cat, name, ts, dur, tid=1, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_gaps_are_charged_to_the_host_ops_open_before_the_late_launch(tmp_path):
    events = [
        _x("kernel", "gemm", 0, 100, tid=7, correlation=1),
        _x("kernel", "copy", 50, 100, tid=8, correlation=2),   # overlaps: busy 0-150
        _x("kernel", "adam", 400, 50, tid=7, correlation=3),   # gap 150-400, launched at 390
        _x("kernel", "norm", 460, 10, tid=7, correlation=4),   # 10 us gap: under the minimum
        _x("cuda_runtime", "cudaLaunchKernel", 390, 5, correlation=3),
        _x("cpu_op", "Optimizer.step", 100, 300),
        _x("cpu_op", "aten::_fused_adamw_", 200, 195),
        _x("cpu_op", "aten::item", 0, 90),                       # over before the gap
        _x("cpu_op", "other thread op", 150, 250, tid=2),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events + [{"ph": "i", "name": "marker", "ts": 0}]}, f)
    g = gaps(load(str(path)), min_us=20)
    assert g["busy_ms"] == pytest.approx(0.21) and g["span_ms"] == pytest.approx(0.47)
    (row,) = g["gaps"]
    assert row["us"] == 250 and row["next_kernel"] == "adam"
    # charged at (150 + 390) / 2 = 270 us on the launching thread: inside both optimizer ops
    assert row["host"] == ["Optimizer.step", "aten::_fused_adamw_"]
    assert by_host_op(g["gaps"]) == [("Optimizer.step > aten::_fused_adamw_", 0.25)]


def test_a_trace_without_kernels_is_refused(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [_x("cpu_op", "aten::mm", 0, 10)]}))
    with pytest.raises(SystemExit, match="no GPU kernels"):
        gaps(load(str(path)))
