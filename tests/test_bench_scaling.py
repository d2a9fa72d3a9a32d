"""tools/bench_scaling.py: per-GPU throughput and efficiency against the same row's one process."""
from tools.bench_scaling import efficiency_table


def test_efficiency_is_per_gpu_over_one_process():
    results = [{"row": "fq", "nproc": 1, "tokens_per_sec": 1000.0},
               {"row": "fq", "nproc": 4, "tokens_per_sec": 3600.0},
               {"row": "fq+bf16comm", "nproc": 4, "tokens_per_sec": 2000.0},
               {"row": "fq", "nproc": 8, "error": "exit 1"}]
    lines = efficiency_table(results).splitlines()
    assert lines[3] == "| fq | 4 | 3,600 | 900 | 90.0% |"
    assert lines[4] == "| fq+bf16comm | 4 | 2,000 | 500 | - |"  # no one-process run of that row
    assert lines[5] == "| fq | 8 | exit 1 | | |"


def test_one_process_point_runs_end_to_end(tmp_path, monkeypatch):
    # Runs the real trainer (debug config, CPU): catches an argument bench_train's run_row
    # reads that this tool does not set.
    import json
    import sys

    from tools import bench_scaling

    out = tmp_path / "scaling.json"
    monkeypatch.setattr(sys, "argv", [
        "bench_scaling.py", "--config", "configs/debug.toml", "--nprocs", "1", "--rows", "fq",
        "--steps", "3", "--warmup", "1", "--per-gpu-batch", "2", "--vocab", "512",
        "--train.micro_batch_size=2", "--out", str(out)])
    bench_scaling.main()
    (r,) = json.loads(out.read_text())
    assert r["nproc"] == 1 and "error" not in r and r["tokens_per_sec"] > 0


def test_plot_draws_rows_from_several_results_files(tmp_path):
    import json

    from tools.bench_scaling import plot

    pts = lambda sockets: [{"row": "fq", "nproc": n, "tokens_per_sec": 100.0 * n, "sockets": sockets}  # noqa: E731
                           for n in (1, 2)]
    (tmp_path / "a.json").write_text(json.dumps(pts(False)))
    (tmp_path / "b.json").write_text(json.dumps(pts(True) + [{"row": "fq", "nproc": 4, "error": "exit 1"}]))
    plot(f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", str(tmp_path / "img"))
    assert (tmp_path / "img" / "scaling.png").stat().st_size > 0
