import pytest

from tools.bench_train import row_overrides


def test_rows_say_whether_they_compile():
    """The GPU configs turn train.compile on, so an eager row must turn it off itself."""
    assert "--train.compile=false" in row_overrides("bf16")
    assert "--train.compile=false" in row_overrides("fq+bf16comm")
    compiled = row_overrides("fq+compile")
    assert "--train.compile=true" in compiled and "--train.compile=false" not in compiled
    assert row_overrides("rowwise")[:2] == ["--fq.enabled=true", "--fq.fallback=none"]


def test_unknown_rows_and_suffixes_are_named():
    with pytest.raises(SystemExit, match="unknown.*'fq8'"):
        row_overrides("fq8")
    with pytest.raises(SystemExit, match="unknown.*'compiled'"):
        row_overrides("fq+compiled")


def test_keep_refuses_a_directory_that_already_holds_a_row(tmp_path, monkeypatch):
    """Runs append to metrics.jsonl, so a kept row directory from an earlier call would mix its
    steps into the new medians: refused before any run."""
    import sys

    from tools import bench_train
    (tmp_path / "fq_compile").mkdir()
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--rows", "bf16,fq+compile", "--keep", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"already holds \['fq_compile'\]"):
        bench_train.main()
