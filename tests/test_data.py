"""Data pipeline: tokenizer, prepare_data, the .bin/.idx format, SampleStream, default dataset."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import sentencepiece as spm
import torch

from tools.prepare_data import expand_inputs, file_documents, main as prepare_main, prepare
from tools.train_tokenizer import EOS_ID, TokenizerError, train_tokenizer
from train.data import (DataError, IndexedDataset, IndexedDatasetWriter, IndexPermutation,
                        SampleStream, resolve_val_prefix, token_dtype)
from train.default_data import source_prose

DOCS = [
    "Hello world.\nThis is the first document.",
    "  leading spaces, trailing spaces  \n\n\ttabs\tand blank lines\n\n",
    "Unicode: wörld, 日本語, emoji 😀, math ∑ x².",
    "x = 1  # code with a comment\nif x:\n    print(x)\n",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> str:
    """A small BPE tokenizer trained on standard library prose (present on every machine)."""
    d = tmp_path_factory.mktemp("tok")
    stdlib = sysconfig.get_paths()["stdlib"]
    text = "\n".join(source_prose(os.path.join(stdlib, f)) for f in
                     ("argparse.py", "textwrap.py", "typing.py", "dataclasses.py"))
    (d / "corpus.txt").write_text(text, encoding="utf-8")
    return train_tokenizer([str(d / "corpus.txt")], str(d / "spm"), 400, "bpe")


def docs_of(ds: IndexedDataset) -> list[list[int]]:
    return [ds.document(i).tolist() for i in range(ds.num_docs)]


# --- tokenizer -----------------------------------------------------------------------------


def test_tokenizer_is_lossless_with_fixed_ids(tok):
    sp = spm.SentencePieceProcessor(model_file=tok)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, 3)
    for text in DOCS:
        assert sp.decode(sp.encode(text)) == text


def test_tokenizer_unigram_and_bad_inputs(tmp_path, tok):
    corpus = os.path.join(os.path.dirname(tok), "corpus.txt")
    model = train_tokenizer([corpus], str(tmp_path / "uni"), 400, "unigram")
    assert spm.SentencePieceProcessor(model_file=model).vocab_size() == 400
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("abc abd\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match="vocab size 4000 is too large"):
        train_tokenizer([str(tiny)], str(tmp_path / "x"), 4000)
    with pytest.raises(DataError, match="input '.*missing.txt' does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")], str(tmp_path / "x"), 400)
    with pytest.raises(TokenizerError, match="must be >= 300"):
        train_tokenizer([str(corpus)], str(tmp_path / "x"), 100)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(TokenizerError, match="empty"):
        train_tokenizer([str(tmp_path / "empty.txt")], str(tmp_path / "x"), 400)


def test_tokenizer_from_jsonl(tmp_path, tok):
    corpus = open(os.path.join(os.path.dirname(tok), "corpus.txt"), encoding="utf-8").read()
    paragraphs = corpus.split("\n\n")
    with open(tmp_path / "c.jsonl", "w", encoding="utf-8") as f:
        for p in paragraphs:
            f.write(json.dumps({"body": p}) + "\n")
    model = train_tokenizer([str(tmp_path / "c.jsonl")], str(tmp_path / "j"), 400,
                            text_key="body")
    sp = spm.SentencePieceProcessor(model_file=model)
    assert sp.vocab_size() == 400 and sp.decode(sp.encode(DOCS[2])) == DOCS[2]
    with open(tmp_path / "c.jsonl", "a", encoding="utf-8") as f:
        f.write('{"text": "no body"}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:\d+: no 'body' field"):
        train_tokenizer([str(tmp_path / "c.jsonl")], str(tmp_path / "j2"), 400, text_key="body")


# --- prepare_data and the format ------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip(tmp_path, tok, workers):
    stats = prepare(DOCS + ["", "   "], tok, str(tmp_path / "d"), workers=workers)
    assert (stats.docs, stats.skipped_empty) == (len(DOCS), 2)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert (ds.num_docs, ds.vocab_size, ds.eos_id) == (len(DOCS), 400, EOS_ID)
    assert ds.tokens.dtype == np.uint16 and ds.num_tokens == stats.tokens
    sp = spm.SentencePieceProcessor(model_file=tok)
    for i, text in enumerate(DOCS):
        doc = ds.document(i).tolist()
        assert doc[-1] == ds.eos_id and ds.eos_id not in doc[:-1]
        assert sp.decode(doc[:-1]) == text
    # The flat stream is the documents joined by EOS.
    flat = ds.tokens.tolist()
    assert flat == sum((sp.encode(t) + [EOS_ID] for t in DOCS), [])


def test_workers_give_identical_output(tmp_path, tok):
    docs = [f"document {i}: " + DOCS[i % len(DOCS)] * (i % 7 + 1) for i in range(300)]
    prepare(docs, tok, str(tmp_path / "one"), workers=1)
    prepare(docs, tok, str(tmp_path / "two"), workers=2)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"one.{ext}").read_bytes() == (tmp_path / f"two.{ext}").read_bytes()


def test_token_dtype_choice(tmp_path):
    assert token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    for vocab, itemsize in ((1000, 2), (70000, 4)):
        p = str(tmp_path / f"v{vocab}")
        w = IndexedDatasetWriter(f"{p}.bin", f"{p}.idx", vocab, 2)
        w.add(np.array([5, vocab - 1, 2, 7, 2]), np.array([3, 2]))
        w.finish()
        ds = IndexedDataset(p)
        assert ds.tokens.dtype.itemsize == itemsize
        assert os.path.getsize(f"{p}.bin") == 5 * itemsize
        assert ds.tokens.tolist() == [5, vocab - 1, 2, 7, 2]


def test_writer_rejects_ids_outside_vocab(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "x.bin"), str(tmp_path / "x.idx"), 100, 2)
    with pytest.raises(DataError, match="token id 100 >= vocab_size 100"):
        w.add(np.array([100, 2]), np.array([2]))
    w.abort()


@pytest.fixture
def pair(tmp_path, tok) -> str:
    prefix = str(tmp_path / "d")
    prepare(DOCS, tok, prefix)
    return prefix


def test_missing_files(pair, tmp_path):
    with pytest.raises(DataError, match=r"nope\.idx does not exist.*prepare_data"):
        IndexedDataset(str(tmp_path / "nope"))
    os.remove(f"{pair}.bin")
    with pytest.raises(DataError, match=r"d\.bin does not exist"):
        IndexedDataset(pair)


def test_truncated_or_mismatched_bin(pair, tmp_path, tok):
    data = open(f"{pair}.bin", "rb").read()
    open(f"{pair}.bin", "wb").write(data[:-2])
    with pytest.raises(DataError, match=r"d\.bin: .*does not belong together or was truncated"):
        IndexedDataset(pair)
    # A .bin from another corpus next to this .idx.
    other = str(tmp_path / "other")
    prepare(DOCS[:2], tok, other)
    os.replace(f"{other}.bin", f"{pair}.bin")
    with pytest.raises(DataError, match="does not belong together"):
        IndexedDataset(pair)


def test_truncated_idx_bad_magic_bad_version(pair):
    idx = open(f"{pair}.idx", "rb").read()
    open(f"{pair}.idx", "wb").write(idx[:-8])
    with pytest.raises(DataError, match=r"d\.idx: .*truncated or mismatched"):
        IndexedDataset(pair)
    open(f"{pair}.idx", "wb").write(idx[:20])
    with pytest.raises(DataError, match="bad magic or truncated"):
        IndexedDataset(pair)
    open(f"{pair}.idx", "wb").write(b"MMIDIDX\0\0" + idx[8:])
    with pytest.raises(DataError, match="not an fqtrain index"):
        IndexedDataset(pair)
    open(f"{pair}.idx", "wb").write(idx[:8] + (99).to_bytes(4, "little") + idx[12:])
    with pytest.raises(DataError, match="index version 99"):
        IndexedDataset(pair)


def test_vocab_larger_than_embedding(pair):
    ds = IndexedDataset(pair)
    ds.check_vocab(400)
    with pytest.raises(DataError, match="vocab_size 400 but the model embedding has 256 rows"):
        ds.check_vocab(256)


def test_empty_corpus(tmp_path, tok):
    with pytest.raises(DataError, match="empty corpus"):
        prepare(["", " \n "], tok, str(tmp_path / "e"))
    assert os.listdir(tmp_path) == []  # nothing, not even temporary files


def test_interrupted_run_leaves_nothing(tmp_path, tok):
    def docs():
        yield from DOCS
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(docs(), tok, str(tmp_path / "i"))
    assert os.listdir(tmp_path) == []


def test_undecodable_bytes(tmp_path, tok, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text\n\xff\xfe more")
    out = str(tmp_path / "o")
    assert prepare_main([str(bad), "--tokenizer", tok, "--output", out]) == 2
    assert "bad.txt: invalid UTF-8 at byte offset 10" in capsys.readouterr().err
    assert prepare_main([str(bad), "--tokenizer", tok, "--output", out, "--errors",
                         "replace", "--workers", "1"]) == 0
    sp = spm.SentencePieceProcessor(model_file=tok)
    replaced = sp.decode(IndexedDataset(out).document(0)[:-1].tolist())
    assert replaced == "good text\n\ufffd\ufffd more"
    jl = tmp_path / "bad.jsonl"
    jl.write_bytes(b'{"text": "ok"}\n{"text": "b\xc3"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: invalid UTF-8 at byte offset 26"):
        list(file_documents([str(jl)]))


def test_input_errors(tmp_path, tok, capsys):
    with pytest.raises(DataError, match="does not exist"):
        expand_inputs([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match="matches no files"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        expand_inputs([str(tmp_path / "a.csv")])
    jl = tmp_path / "a.jsonl"
    jl.write_text('{"content": "x"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:1: no 'text' field"):
        list(file_documents([str(jl)]))
    with pytest.raises(DataError, match="tokenizer .* does not exist"):
        prepare(DOCS, str(tmp_path / "none.model"), str(tmp_path / "o"))


def test_refuses_to_overwrite(pair, tok):
    with pytest.raises(DataError, match="exists .*--overwrite"):
        prepare(DOCS, tok, pair)
    prepare(DOCS[:2], tok, pair, overwrite=True)
    assert IndexedDataset(pair).num_docs == 2


# --- validation split ----------------------------------------------------------------------


def test_val_split_disjoint_and_deterministic(tmp_path, tok):
    docs = [f"doc number {i} " + DOCS[i % len(DOCS)] for i in range(200)]
    out = str(tmp_path / "s")
    stats = prepare(docs, tok, out, val_fraction=0.05, workers=2)
    train, val = IndexedDataset(out), IndexedDataset(f"{out}_val")
    assert (stats.train_docs, stats.val_docs) == (190, 10)
    assert (train.num_docs, val.num_docs) == (190, 10)
    sp = spm.SentencePieceProcessor(model_file=tok)
    train_text = [sp.decode(d[:-1]) for d in docs_of(train)]
    val_text = [sp.decode(d[:-1]) for d in docs_of(val)]
    assert not set(train_text) & set(val_text)
    assert sorted(train_text + val_text) == sorted(docs)
    # Held-out documents keep their corpus order in both parts.
    assert train_text == [d for d in docs if d in set(train_text)]
    assert resolve_val_prefix(out, "") == f"{out}_val"
    prepare(docs, tok, str(tmp_path / "again"), val_fraction=0.05)
    assert open(f"{out}_val.bin", "rb").read() == open(f"{tmp_path}/again_val.bin", "rb").read()


def test_val_docs_and_errors(tmp_path, tok):
    out = str(tmp_path / "s")
    prepare(DOCS, tok, out, val_docs=1)
    assert IndexedDataset(f"{out}_val").num_docs == 1
    with pytest.raises(DataError, match="leaves no training data"):
        prepare(DOCS[:1], tok, str(tmp_path / "one"), val_fraction=0.5)
    # Re-preparing without a split removes the stale val pair.
    prepare(DOCS, tok, out, overwrite=True)
    assert resolve_val_prefix(out, "") is None
    assert resolve_val_prefix(out, "/explicit/val") == "/explicit/val"


# --- input formats -------------------------------------------------------------------------


def test_text_and_jsonl_inputs(tmp_path, tok):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("para one\nline two\n\n\npara two\n", encoding="utf-8")
    with open(src / "sub" / "b.jsonl", "w", encoding="utf-8") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
        f.write("\n" + json.dumps({"text": None}) + "\n")
    (src / "ignored.log").write_text("not an input")
    sp = spm.SentencePieceProcessor(model_file=tok)
    out = str(tmp_path / "o")
    assert prepare_main([str(src), "--tokenizer", tok, "--output", out, "--workers", "2"]) == 0
    texts = [sp.decode(d[:-1]) for d in docs_of(IndexedDataset(out))]
    assert texts == ["para one\nline two\n\n\npara two\n"] + DOCS
    assert prepare_main([str(src / "a.txt"), "--txt-docs", "paragraph", "--tokenizer", tok,
                         "--output", out, "--overwrite"]) == 0
    texts = [sp.decode(d[:-1]) for d in docs_of(IndexedDataset(out))]
    assert texts == ["para one\nline two\n", "para two\n"]


def test_parquet_input(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": DOCS + [None], "n": list(range(len(DOCS) + 1))}),
                   tmp_path / "x.parquet", row_group_size=2)
    out = str(tmp_path / "o")
    assert prepare_main([str(tmp_path / "x.parquet"), "--text-key", "content", "--tokenizer", tok,
                         "--output", out]) == 0
    sp = spm.SentencePieceProcessor(model_file=tok)
    assert [sp.decode(d[:-1]) for d in docs_of(IndexedDataset(out))] == DOCS
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['content', 'n'\]\)"):
        list(file_documents([str(tmp_path / "x.parquet")]))


def test_hf_dataset_input(tmp_path, tok):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "hf"))
    out = str(tmp_path / "o")
    assert prepare_main(["--hf-dataset", str(tmp_path / "hf"), "--tokenizer", tok,
                         "--output", out, "--workers", "2"]) == 0
    sp = spm.SentencePieceProcessor(model_file=tok)
    assert [sp.decode(d[:-1]) for d in docs_of(IndexedDataset(out))] == DOCS


# --- SampleStream --------------------------------------------------------------------------


def synthetic(tmp_path, num_tokens=1001, vocab=5000) -> IndexedDataset:
    prefix = str(tmp_path / "syn")
    w = IndexedDatasetWriter(f"{prefix}.bin", f"{prefix}.idx", vocab, 2)
    tokens = np.arange(num_tokens) % vocab
    w.add(tokens, np.array([num_tokens // 2, num_tokens - num_tokens // 2]))
    w.finish()
    return IndexedDataset(prefix)


def test_windows_are_strided_and_cover_the_epoch(tmp_path):
    ds = synthetic(tmp_path)
    s = SampleStream(ds, seq_len=10, seed=0)
    assert len(s) == 100  # (1001 - 1) // 10: every token after the first is a target once
    b = s.batch(0, len(s))
    assert b.dtype == torch.int64 and b.shape == (100, 11)
    starts = sorted(b[:, 0].tolist())
    assert starts == list(range(0, 1000, 10))
    for row in b:
        assert row.tolist() == list(range(row[0].item(), row[0].item() + 11))


def test_stream_is_deterministic_and_splittable(tmp_path):
    ds = synthetic(tmp_path)
    s = SampleStream(ds, seq_len=10, seed=7)
    a = s.batch(0, 350)  # spans four epochs
    assert torch.equal(a, SampleStream(ds, seq_len=10, seed=7).batch(0, 350))
    assert not torch.equal(a, SampleStream(ds, seq_len=10, seed=8).batch(0, 350))
    assert not torch.equal(a[:100], a[100:200])  # each epoch has its own order
    assert sorted(a[:100, 0].tolist()) == sorted(a[100:200, 0].tolist())
    # Any split of the sample range, in any order (resume, other rank counts), is the same data.
    for sizes in ([1] * 350, [7, 93, 3, 247], [100, 100, 150]):
        parts, start = [], 0
        fresh = SampleStream(ds, seq_len=10, seed=7)
        for n in sizes:
            parts.append(fresh.batch(start, n))
            start += n
        assert torch.equal(torch.cat(parts), a)
    assert torch.equal(SampleStream(ds, 10, 7).batch(1234, 5), s.batch(1234, 5))
    ranks = [s.batch(300 + r, 1) for r in range(4)]
    assert torch.equal(torch.cat(ranks), a[300:304])


def test_index_permutation():
    for n in (1, 2, 3, 5, 100, 4097):
        for seed, stream in ((0, 0), (1234, 0), (1234, 1)):
            perm = IndexPermutation(n, seed, stream)(np.arange(n))
            assert sorted(perm.tolist()) == list(range(n)), (n, seed, stream)
    n = 10_000
    a, b = IndexPermutation(n, 7, 0)(np.arange(n)), IndexPermutation(n, 7, 1)(np.arange(n))
    assert abs(np.corrcoef(np.arange(n), a)[0, 1]) < 0.05  # no drift with the index
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.05  # epochs independent
    assert 0.3 < np.abs(np.diff(a)).mean() / n < 0.37  # neighbours land ~n/3 apart, as at random
    # Any index of a huge stream, with no table: 1T tokens / 2048 per window.
    big = IndexPermutation(500_000_000, 3)(np.array([0, 499_999_999]))
    assert ((big >= 0) & (big < 500_000_000)).all()


def test_stream_order_is_pinned(tmp_path):
    """The sample order is part of the checkpoint contract: a run resumed on another machine
    (other NumPy, other torch) must see the same windows. Changing it breaks resume."""
    s = SampleStream(synthetic(tmp_path), seq_len=10, seed=7)
    assert s.windows(0, 10).tolist() == [97, 68, 99, 52, 53, 20, 42, 30, 13, 70]
    assert s.windows(100, 3).tolist() == [47, 95, 11]
    with pytest.raises(DataError, match="seed=-1"):
        SampleStream(s.dataset, seq_len=10, seed=-1)


def test_stream_too_short(tmp_path):
    ds = synthetic(tmp_path, num_tokens=50)
    with pytest.raises(DataError, match="50 tokens, fewer than one window of seq_len\\+1 = 65"):
        SampleStream(ds, seq_len=64, seed=0)
    assert len(SampleStream(ds, seq_len=49, seed=0)) == 1


# --- default dataset -----------------------------------------------------------------------


def test_default_dataset_builds_once(tmp_path, monkeypatch):
    import train.default_data as dd

    monkeypatch.setenv("FQTRAIN_CACHE", str(tmp_path / "cache"))
    stale = dd.default_folder(512, 300_000) + ".tmp-killed"
    os.makedirs(stale)
    prefix = dd.ensure_default_dataset(512, corpus_bytes=300_000)
    assert not os.path.exists(stale)  # a killed build's leftovers are removed
    assert prefix == os.path.join(dd.default_folder(512, 300_000), "train")
    assert prefix.startswith(str(tmp_path / "cache"))
    train, val = IndexedDataset(prefix), IndexedDataset(f"{prefix}_val")
    assert train.vocab_size == 512 and train.num_tokens > 50_000 and val.num_docs >= 1
    assert resolve_val_prefix(prefix, "") == f"{prefix}_val"
    assert os.path.isfile(os.path.join(os.path.dirname(prefix), "tokenizer.model"))
    assert sorted(os.listdir(tmp_path / "cache")) == [
        os.path.basename(os.path.dirname(prefix)),
        os.path.basename(os.path.dirname(prefix)) + ".lock"]

    def no_rebuild(*args):
        raise AssertionError("rebuilt a cached dataset")

    monkeypatch.setattr(dd, "_build", no_rebuild)
    assert dd.ensure_default_dataset(512, corpus_bytes=300_000) == prefix


def test_default_dataset_concurrent_processes_build_once(tmp_path):
    """Two processes on one machine: one builds, the other waits and reuses it."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout); "
            "from train.default_data import ensure_default_dataset as e; "
            "print('PREFIX', e(400, corpus_bytes=100_000))")
    env = dict(os.environ, FQTRAIN_CACHE=str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    prefixes = {line.split()[1] for out in outs for line in out.splitlines()
                if line.startswith("PREFIX")}
    assert len(prefixes) == 1
    assert sum(out.count("first run only") for out in outs) == 1, outs
    IndexedDataset(prefixes.pop())


def test_default_data_workers_stop_under_a_trainers_sigterm_handler(tmp_path):
    """The trainer installs a SIGTERM handler that only sets a flag before it builds the default
    data; pool workers (corpus parsing, tokenizing) forked from it inherited that handler, so
    pool.terminate() waited on them forever (the first `fqtrain` of a fresh machine hung)."""
    code = ("import signal; signal.signal(signal.SIGTERM, lambda *a: None); "
            "from train.default_data import ensure_default_dataset as e; "
            "print('PREFIX', e(400, corpus_bytes=200_000))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, FQTRAIN_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = proc.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # the handler ignores SIGTERM: SIGKILL the group
        proc.communicate()
        pytest.fail("building the default data hung in pool.terminate() under a SIGTERM handler")
    assert proc.returncode == 0 and "PREFIX" in out, out
