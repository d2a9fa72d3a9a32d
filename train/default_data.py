"""The embedded default dataset: Python standard library prose, built once per machine, offline.

`fqtrain` with no data path trains on the docstrings and full-line comments of the installed
standard library: text every machine with Python has. The first call extracts them (one document
per source file that parses; library files, then test files, each in sorted path order; capped
at `DEFAULT_CORPUS_BYTES` of UTF-8), trains a BPE tokenizer,
prepares `train.bin/.idx` plus `train_val.bin/.idx`, and caches it all in

    $FQTRAIN_CACHE, else $XDG_CACHE_HOME/fqtrain, else ~/.cache/fqtrain
      / default-py{X.Y.Z}-v{vocab}-c{corpus bytes}-f{format}/
          corpus.txt  tokenizer.model  tokenizer.vocab  train.{bin,idx}  train_val.{bin,idx}

Later calls return at once. The folder is built under a temporary name and renamed into place,
so it either exists complete or not at all; a file lock makes a second process on the same
machine wait for the first instead of building twice (where locks are unavailable the first
rename wins and the loser's copy is discarded).
"""
from __future__ import annotations

import ast
import glob
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from contextlib import contextmanager

log = logging.getLogger("fqtrain.data")

# Bump when the corpus extraction, tokenizer settings or data format change: old caches are
# then ignored, never misread.
FORMAT_VERSION = 1
DEFAULT_CORPUS_BYTES = 3_000_000
VAL_FRACTION = 0.02
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3",
              "turtledemo"}
_TEST_DIRS = {"test", "tests"}


def cache_root() -> str:
    if os.environ.get("FQTRAIN_CACHE"):
        return os.environ["FQTRAIN_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "fqtrain")


def stdlib_files() -> list[str]:
    """The standard library's .py files: library code first, then its tests; each sorted."""
    root = sysconfig.get_paths()["stdlib"]
    lib, tests = [], []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in _SKIP_DIRS]
        rel = os.path.relpath(d, root).split(os.sep)
        bucket = tests if _TEST_DIRS.intersection(rel) else lib
        bucket.extend(os.path.join(d, n) for n in names if n.endswith(".py"))
    return sorted(lib) + sorted(tests)


def source_prose(path: str) -> str:
    """Docstrings and full-line comments of one Python file, in source order; "" if it does not
    parse. Lines inside multi-line strings are not comments; trailing code comments are left out
    (mostly terse), which avoids the pure-Python tokenize module, 3x slower than the parse."""
    try:
        with open(path, "rb") as f:
            src = f.read()
        tree = ast.parse(src)
        lines = src.decode("utf-8").splitlines()
    except (OSError, SyntaxError, ValueError):
        return ""
    parts: list[tuple[int, str]] = []
    in_string = bytearray(len(lines) + 2)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and node.body:
                parts.append((node.body[0].lineno, doc))
        elif isinstance(node, (ast.Constant, ast.JoinedStr)) and node.end_lineno > node.lineno:
            in_string[node.lineno + 1:node.end_lineno + 1] = b"\1" * (node.end_lineno - node.lineno)
    block: list[str] = []
    for lineno, line in enumerate(lines, 1):
        stripped = line.lstrip()
        if stripped.startswith("#") and not in_string[lineno]:
            text = stripped.lstrip("#!").strip()
            if text:
                if not block:
                    parts.append((lineno, ""))
                block.append(text)
                continue
        if block:
            parts[-1] = (parts[-1][0], "\n".join(block))
            block = []
    if block:
        parts[-1] = (parts[-1][0], "\n".join(block))
    parts.sort(key=lambda p: p[0])
    return "\n\n".join(text for _, text in parts if text.strip())


def stdlib_corpus(max_bytes: int = DEFAULT_CORPUS_BYTES, workers: int = 0) -> list[str]:
    """One document per standard library file (its prose), in order, up to max_bytes of UTF-8.
    Parsing is the slow part: `workers` processes (0: up to 8 cores) share it."""
    import multiprocessing as mp

    workers = workers or min(8, os.cpu_count() or 1)
    if mp.current_process().daemon:  # daemonic processes may not have children
        workers = 1
    docs: list[str] = []
    total = 0
    from tools.prepare_data import restore_default_sigterm

    pool = mp.Pool(workers, initializer=restore_default_sigterm) if workers > 1 else None
    try:
        texts = (pool.imap(source_prose, stdlib_files(), chunksize=8) if pool
                 else map(source_prose, stdlib_files()))
        for text in texts:
            if not text:
                continue
            size = len(text.encode("utf-8"))
            if total + size > max_bytes:
                break
            docs.append(text)
            total += size
    finally:
        if pool:
            pool.terminate()
            pool.join()
    return docs


@contextmanager
def _file_lock(path: str):
    """Hold an exclusive lock on `path`; yields whether locking is available."""
    try:
        import fcntl
    except ImportError:  # no advisory locks (Windows): the atomic rename still protects the cache
        yield False
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _complete(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in
               ("tokenizer.model", "train.bin", "train.idx", "train_val.bin", "train_val.idx"))


def _build(folder: str, vocab_size: int, corpus_bytes: int) -> None:
    from tools.prepare_data import prepare
    from tools.train_tokenizer import train_tokenizer
    from train.data import DataError

    t0 = time.perf_counter()
    docs = stdlib_corpus(corpus_bytes)
    if len(docs) < 2:
        raise DataError(f"the standard library at {sysconfig.get_paths()['stdlib']} yielded "
                        f"{len(docs)} documents of prose; set data.path to a prepared dataset")
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(doc)
            f.write("\n")
    size = os.path.getsize(corpus)
    log.info("default data: corpus of %d standard library files, %.1f MB of docstrings and "
             "comments (%.1f s)", len(docs), size / 1e6, time.perf_counter() - t0)
    t1 = time.perf_counter()
    model = train_tokenizer([corpus], os.path.join(folder, "tokenizer"), vocab_size, "bpe")
    log.info("default data: BPE tokenizer, vocab %d (%.1f s)", vocab_size,
             time.perf_counter() - t1)
    t2 = time.perf_counter()
    stats = prepare(docs, model, os.path.join(folder, "train"), val_fraction=VAL_FRACTION,
                    workers=min(8, os.cpu_count() or 1))
    log.info("default data: %d tokens, %d train / %d val documents (%.1f s)", stats.tokens,
             stats.train_docs, stats.val_docs, time.perf_counter() - t2)


def default_folder(vocab_size: int, corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """The cache folder of the default dataset for this Python, vocabulary and corpus size."""
    v = sys.version_info
    name = (f"default-py{v.major}.{v.minor}.{v.micro}-v{vocab_size}-c{corpus_bytes}"
            f"-f{FORMAT_VERSION}")
    return os.path.join(cache_root(), name)


def ensure_default_dataset(vocab_size: int = 2048, *,
                           corpus_bytes: int = DEFAULT_CORPUS_BYTES) -> str:
    """Build the default dataset once (cached) and return its train prefix; the validation
    prefix is f"{prefix}_val"."""
    folder = default_folder(vocab_size, corpus_bytes)
    root, name = os.path.split(folder)
    prefix = os.path.join(folder, "train")
    if _complete(folder):
        return prefix
    os.makedirs(root, exist_ok=True)
    with _file_lock(os.path.join(root, f"{name}.lock")) as locked:
        if _complete(folder):  # another process built it while we waited
            return prefix
        if locked:  # nobody else is building: leftovers of a killed build can go
            for stale in glob.glob(os.path.join(root, f"{name}.tmp-*")):
                shutil.rmtree(stale, ignore_errors=True)
        t0 = time.perf_counter()
        log.info("default data: building %s (first run only)", folder)
        tmp = tempfile.mkdtemp(prefix=f"{name}.tmp-", dir=root)
        try:
            _build(tmp, vocab_size, corpus_bytes)
            if not _complete(folder):  # else a lock-free race was lost: use the winner's copy
                if os.path.isdir(folder):  # damaged by hand (files deleted): replace it
                    shutil.rmtree(folder)
                try:
                    os.rename(tmp, folder)
                except OSError:
                    if not _complete(folder):
                        raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("default data: ready in %.1f s", time.perf_counter() - t0)
    return prefix
