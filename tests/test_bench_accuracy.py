"""tools/bench_accuracy.py: reading a row's metrics back, the report, and the plots (no training)."""
import json
import subprocess

from tools.bench_accuracy import ROWS, collect, command, plot, read_row, report


def test_rows_read_back_reported_and_plotted(tmp_path, capsys):
    run_dir = tmp_path / "fq"
    run_dir.mkdir()
    records = [{"step": s, "loss": 5.0 - s / 10, "fallback_ratio": 0.1 * s, "tokens_per_sec": 100.0,
                "fq/layers.0.mlp.gate_up_proj/fallback_ratio": 0.01 * s,
                "fq/layers.0.mlp.gate_up_proj/grad_fallback_ratio": 0.2} for s in (1, 2)]
    records.append({"step": 2, "val_loss": 4.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ok = subprocess.CompletedProcess([], 0, "", "")
    fq = read_row("fq", str(run_dir), ok)
    assert fq["val"] == [(2, 4.5)] and fq["final_val_loss"] == 4.5 and fq["train"] == [(1, 4.9), (2, 4.8)]
    assert set(fq["layer_fallback"]) == {"fq/layers.0.mlp.gate_up_proj/fallback_ratio",
                                         "fq/layers.0.mlp.gate_up_proj/grad_fallback_ratio"}
    bf16 = dict(fq, row="bf16", val=[(2, 4.0)], final_val_loss=4.0, fallback=[])
    failed = read_row("nofallback", str(tmp_path / "missing"), subprocess.CompletedProcess([], 1, "", "boom"))
    report([bf16, fq, failed])
    out = capsys.readouterr().out
    assert "| fq | 4.5000 | +12.50% | 20.0% |" in out and "| nofallback | exit 1 |" in out
    # a run cut short: rows compared at the last validation step all of them reached
    ahead = dict(fq, val=[(2, 4.5), (4, 4.1)])
    report([dict(bf16, val=[(2, 4.0)]), ahead])
    assert "| fq | 4.5000 | +12.50%" in capsys.readouterr().out
    path = tmp_path / "results.json"
    path.write_text(json.dumps([bf16, fq]))
    plot(str(path), str(tmp_path / "img"))
    assert (tmp_path / "img" / "accuracy_val_loss.png").stat().st_size > 0
    assert (tmp_path / "img" / "accuracy_fallback_per_layer.png").stat().st_size > 0


def test_two_process_row_goes_through_torchrun_with_the_same_global_batch():
    class Args:
        config, data, steps, val_interval, log_interval = None, "d", 10, 5, 1
        extra = ["--train.global_batch_size=16", "--train.micro_batch_size=16"]
    assert ROWS["fq_int8comm"][0] == 2
    cmd = command("fq_int8comm", Args, "/r")
    assert "torch.distributed.run" in cmd and "--nproc_per_node=2" in cmd
    assert "--parallel.reduce_scatter_dtype=int8" in cmd and "-m" in command("bf16", Args, "/r")
    # 16 per step over 2 ranks: micro batch 8, given after the user's 16 so it wins
    assert cmd[-1] == "--train.micro_batch_size=8" and "--train.micro_batch_size=8" not in command("fq", Args, "/r")


def test_collect_reads_a_cut_run(tmp_path):
    (tmp_path / "fq").mkdir()
    (tmp_path / "fq" / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 3.0}) + "\n{\"step\": 2, \"lo")
    (tmp_path / "bf16").mkdir()
    rows = collect(str(tmp_path), ["bf16", "fq", "nofallback"])
    assert [r["row"] for r in rows] == ["bf16", "fq"]
    assert "error" in rows[0] and rows[1]["final_val_loss"] == 3.0
