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
