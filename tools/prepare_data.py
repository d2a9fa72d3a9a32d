"""Tokenize text into the `.bin/.idx` indexed dataset that `train/data.py` reads.

    python tools/prepare_data.py corpus/ more/*.jsonl --tokenizer tok/spm32k.model \\
        --output data/corpus --val-fraction 0.01 --workers 8
    python tools/prepare_data.py --hf-dataset NAME --hf-split train --text-key text \\
        --tokenizer tok/spm32k.model --output data/name

Inputs (files, globs or directories; a directory contributes every file below it with a known
extension, in sorted order):

- `.txt`, `.text`, `.md`: one document per file (`--txt-docs file`, the default), or one per
  blank-line-separated paragraph (`--txt-docs paragraph`);
- `.jsonl`, `.ndjson`: one JSON object per line, the document is its `--text-key` field;
- `.parquet`: the `--text-key` column (needs pyarrow);
- `--hf-dataset NAME`: a Hugging Face dataset through `datasets` (a `save_to_disk` folder or a
  name `datasets.load_dataset` resolves), split `--hf-split`, column `--text-key`.

Every document is tokenized (a pool of `--workers` processes), followed by EOS, and written to
`PREFIX.bin/.idx`; `--val-fraction` or `--val-docs` holds documents out (chosen by a seeded
permutation, so the split is deterministic) into `PREFIX_val.bin/.idx`. Outputs are written
under temporary names and renamed when complete, the `.idx` last, so an interrupted run never
leaves a pair that looks valid. Empty documents are skipped.
"""
from __future__ import annotations

import argparse
import glob
import itertools
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from train.data import DataError, IndexedDataset, IndexedDatasetWriter

TEXT_EXTS = (".txt", ".text", ".md")
JSONL_EXTS = (".jsonl", ".ndjson")
PARQUET_EXTS = (".parquet",)
KNOWN_EXTS = TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS
_PARAGRAPH_BREAK = re.compile(rb"^\s*$")
# Characters of text per tokenization task: large enough to amortize the transfer between
# processes, small enough to keep every worker busy and memory flat.
BATCH_CHARS = 1 << 18


@dataclass
class PrepareStats:
    docs: int = 0
    skipped_empty: int = 0
    input_bytes: int = 0
    tokens: int = 0
    train_docs: int = 0
    val_docs: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / max(self.seconds, 1e-9)


# ---------------------------------------------------------------------------------------------
# Reading documents


def _decode(data: bytes, path: str, offset: int, errors: str) -> str:
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte offset {offset + e.start} ({e.reason}); "
                        f"fix the file or pass --errors replace") from None


def expand_inputs(patterns: list[str]) -> list[str]:
    """Files named directly, by glob, or as directories (known extensions below it, sorted)."""
    files: list[str] = []
    for pat in patterns:
        if os.path.isdir(pat):
            found = sorted(os.path.join(root, name) for root, _, names in os.walk(pat)
                           for name in names if name.lower().endswith(KNOWN_EXTS))
            if not found:
                raise DataError(f"input directory '{pat}' holds no {'/'.join(KNOWN_EXTS)} files")
        elif glob.has_magic(pat):
            found = sorted(f for f in glob.glob(pat, recursive=True) if os.path.isfile(f))
            if not found:
                raise DataError(f"input '{pat}' matches no files")
        else:
            if not os.path.isfile(pat):
                raise DataError(f"input '{pat}' does not exist")
            found = [pat]
        for f in found:
            if not f.lower().endswith(KNOWN_EXTS):
                raise DataError(f"input '{f}': unknown extension; use {', '.join(KNOWN_EXTS)}")
        files.extend(found)
    return files


def _text_documents(path: str, txt_docs: str, errors: str) -> Iterator[str]:
    if txt_docs == "file":
        with open(path, "rb") as f:
            yield _decode(f.read(), path, 0, errors)
        return
    para: list[bytes] = []
    start = offset = 0
    with open(path, "rb") as f:
        for line in f:
            if _PARAGRAPH_BREAK.match(line):
                if para:
                    yield _decode(b"".join(para), path, start, errors)
                    para = []
                start = offset + len(line)
            else:
                para.append(line)
            offset += len(line)
    if para:
        yield _decode(b"".join(para), path, start, errors)


def _jsonl_documents(path: str, text_key: str, errors: str) -> Iterator[str]:
    offset = 0
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            text = _decode(line, path, offset, errors)
            offset += len(line)
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); every line must "
                                f"be one JSON object") from None
            if not isinstance(obj, dict) or text_key not in obj:
                keys = list(obj) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(f"{path}:{lineno}: no '{text_key}' field (found {keys}); "
                                f"pass --text-key")
            value = obj[text_key]
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataError(f"{path}:{lineno}: '{text_key}' is {type(value).__name__}, "
                                f"not a string")
            yield value


def _parquet_documents(path: str, text_key: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow; pip install pyarrow") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(f"{path}: no column '{text_key}' (columns: {names}); pass --text-key")
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if value is None:
                continue
            if isinstance(value, bytes):
                value = _decode(value, path, 0, "strict")
            yield value


def file_documents(files: list[str], text_key: str = "text", txt_docs: str = "file",
                   errors: str = "strict") -> Iterator[str]:
    """The documents of local files, in order."""
    for path in files:
        low = path.lower()
        if low.endswith(TEXT_EXTS):
            yield from _text_documents(path, txt_docs, errors)
        elif low.endswith(JSONL_EXTS):
            yield from _jsonl_documents(path, text_key, errors)
        else:
            yield from _parquet_documents(path, text_key)


def hf_documents(name: str, split: str, text_key: str) -> Iterator[str]:
    """The documents of a Hugging Face dataset: a save_to_disk folder or a load_dataset name."""
    try:
        import datasets
    except ImportError:
        raise DataError("--hf-dataset needs the datasets library; pip install datasets "
                        "(or install fqtrain's 'data' extra)") from None
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"dataset '{name}': no split '{split}' (splits: {list(ds)}); "
                                f"pass --hf-split")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(name, split=split)
    if text_key not in ds.column_names:
        raise DataError(f"dataset '{name}': no column '{text_key}' (columns: {ds.column_names}); "
                        f"pass --text-key")
    for rows in ds.select_columns([text_key]).iter(batch_size=1024):
        for value in rows[text_key]:
            if value is not None:
                yield value


# ---------------------------------------------------------------------------------------------
# Tokenizing

_sp = None


def _load_tokenizer(path: str):
    import sentencepiece as spm

    if not os.path.isfile(path):
        raise DataError(f"tokenizer '{path}' does not exist; train one with "
                        f"tools/train_tokenizer.py")
    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except (OSError, RuntimeError) as e:
        raise DataError(f"tokenizer '{path}' is not a SentencePiece model ({e})") from None
    if sp.eos_id() < 0:
        raise DataError(f"tokenizer '{path}' has no EOS id; train it with "
                        f"tools/train_tokenizer.py (EOS = 2)")
    return sp


def restore_default_sigterm() -> None:
    """Pool initializer: a worker forked from the trainer inherits its flag-only SIGTERM handler,
    and pool.terminate() then waits on it forever; the default handler lets it die."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _init_worker(path: str) -> None:
    global _sp
    restore_default_sigterm()
    _sp = _load_tokenizer(path)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Token ids of the documents, each followed by EOS, concatenated; their lengths; bytes."""
    eos = _sp.eos_id()
    ids = _sp.encode(texts, num_threads=1)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    for x in ids:
        x.append(eos)
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint32,
                         count=int(lengths.sum()))
    return tokens, lengths, sum(len(t.encode("utf-8")) for t in texts)


def _batches(documents: Iterable[str], stats: PrepareStats) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        if not doc or doc.isspace():
            stats.skipped_empty += 1
            continue
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Writing


def output_paths(prefix: str) -> list[str]:
    return [f"{prefix}{s}.{e}" for s in ("", "_val") for e in ("bin", "idx")]


def _commit(tmp_prefix: str, prefix: str) -> None:
    """Rename a finished temporary pair into place, the .idx last (it makes the pair valid)."""
    os.replace(f"{tmp_prefix}.bin", f"{prefix}.bin")
    os.replace(f"{tmp_prefix}.idx", f"{prefix}.idx")


def _split(all_prefix: str, tmp: str, n_val: int, seed: int, stats: PrepareStats) -> None:
    """Copy the documents of the temporary all-documents pair into train and val pairs."""
    ds = IndexedDataset(all_prefix)
    is_val = np.zeros(ds.num_docs, dtype=bool)
    is_val[np.random.default_rng(seed).choice(ds.num_docs, n_val, replace=False)] = True
    lengths = np.diff(np.asarray(ds.offsets))
    train = IndexedDatasetWriter(f"{tmp}.train.bin", f"{tmp}.train.idx", ds.vocab_size, ds.eos_id)
    val = IndexedDatasetWriter(f"{tmp}.val.bin", f"{tmp}.val.idx", ds.vocab_size, ds.eos_id)
    step = 1 << 14
    for a in range(0, ds.num_docs, step):
        b = min(a + step, ds.num_docs)
        tokens = np.asarray(ds.tokens[ds.offsets[a]:ds.offsets[b]])
        doc_val, doc_len = is_val[a:b], lengths[a:b]
        tok_val = np.repeat(doc_val, doc_len)
        train.add(tokens[~tok_val], doc_len[~doc_val])
        val.add(tokens[tok_val], doc_len[doc_val])
    train.finish()
    val.finish()
    stats.train_docs, stats.val_docs = ds.num_docs - n_val, n_val


def prepare(documents: Iterable[str], tokenizer: str, output: str, val_fraction: float = 0.0,
            val_docs: int = 0, workers: int = 1, overwrite: bool = False, seed: int = 0,
            progress: bool = False) -> PrepareStats:
    """Tokenize `documents` into `{output}.bin/.idx` (and `{output}_val.bin/.idx` when a
    validation split is asked for). Returns counts and throughput."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction {val_fraction}: must be in [0, 1)")
    if val_docs < 0:
        raise DataError(f"val docs {val_docs}: must be >= 0")
    existing = [p for p in output_paths(output) if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(f"output '{output}' exists ({', '.join(existing)}); pass --overwrite "
                        f"or choose another --output")
    sp = _load_tokenizer(tokenizer)
    vocab, eos = sp.vocab_size(), sp.eos_id()
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    tmp_files = [f"{tmp}.{part}.{e}" for part in ("all", "train", "val") for e in ("bin", "idx")]

    stats = PrepareStats()
    t0 = last = time.perf_counter()
    writer = IndexedDatasetWriter(f"{tmp}.all.bin", f"{tmp}.all.idx", vocab, eos)
    pool = None
    try:
        batches = _batches(documents, stats)
        if workers > 1 and not mp.current_process().daemon:  # daemons may not have children
            pool = mp.Pool(workers, initializer=_init_worker, initargs=(tokenizer,))
            results = pool.imap(_encode_batch, batches)
        else:
            _init_worker(tokenizer)
            results = map(_encode_batch, batches)
        for tokens, lengths, nbytes in results:
            writer.add(tokens, lengths)
            stats.docs += lengths.size
            stats.input_bytes += nbytes
            now = time.perf_counter()
            if progress and now - last > 10:
                last = now
                print(f"  {stats.docs} docs, {stats.input_bytes / 1e6:.1f} MB, "
                      f"{stats.input_bytes / 1e6 / (now - t0):.2f} MB/s", file=sys.stderr)
        writer.finish()
        stats.tokens = writer.num_tokens
        if stats.docs == 0:
            raise DataError(f"empty corpus: no non-empty documents in the input "
                            f"({stats.skipped_empty} empty skipped); nothing written to "
                            f"'{output}'")
        n_val = val_docs or (max(1, round(val_fraction * stats.docs)) if val_fraction else 0)
        if n_val >= stats.docs:
            raise DataError(f"validation split of {n_val} documents leaves no training data "
                            f"({stats.docs} documents); lower --val-fraction/--val-docs (for one "
                            f"big .txt file, --txt-docs paragraph makes more documents)")
        for p in output_paths(output):  # stale outputs of an earlier run go first
            if os.path.exists(p):
                os.remove(p)
        if n_val:
            _split(f"{tmp}.all", tmp, n_val, seed, stats)
            _commit(f"{tmp}.val", f"{output}_val")
            _commit(f"{tmp}.train", output)
        else:
            stats.train_docs = stats.docs
            _commit(f"{tmp}.all", output)
    except BaseException:
        writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        for p in tmp_files:
            if os.path.exists(p):
                os.remove(p)
    stats.seconds = time.perf_counter() - t0
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="text/JSONL/Parquet files, globs or directories")
    p.add_argument("--hf-dataset", default="", help="Hugging Face dataset name or saved folder")
    p.add_argument("--hf-split", default="train")
    p.add_argument("--text-key", default="text", help="JSONL field / Parquet or HF column")
    p.add_argument("--txt-docs", choices=("file", "paragraph"), default="file",
                   help=".txt documents: one per file (default) or per blank-line paragraph")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model")
    p.add_argument("--output", required=True, help="prefix: writes PREFIX.bin/.idx")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="fraction of documents held out into PREFIX_val.bin/.idx")
    p.add_argument("--val-docs", type=int, default=0, help="hold out exactly this many documents")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="undecodable UTF-8: fail (default) or replace with U+FFFD")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    a = p.parse_args(argv)
    try:
        if bool(a.inputs) == bool(a.hf_dataset):
            raise DataError("give input files or --hf-dataset (exactly one of them)")
        if a.hf_dataset:
            docs = hf_documents(a.hf_dataset, a.hf_split, a.text_key)
        else:
            docs = file_documents(expand_inputs(a.inputs), a.text_key, a.txt_docs, a.errors)
        s = prepare(docs, a.tokenizer, a.output, a.val_fraction, a.val_docs, a.workers,
                    a.overwrite, a.seed, progress=True)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{s.docs} documents ({s.skipped_empty} empty skipped), {s.input_bytes / 1e6:.2f} MB "
          f"of text -> {s.tokens} tokens in {s.seconds:.2f} s: {s.mb_per_s:.2f} MB/s with "
          f"{a.workers} worker(s); train {s.train_docs} docs -> {a.output}.bin/.idx"
          + (f", val {s.val_docs} docs -> {a.output}_val.bin/.idx" if s.val_docs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
