"""Token data for training: the `.bin/.idx` indexed dataset and the deterministic sample stream.

Format (written by `tools/prepare_data.py` through `IndexedDatasetWriter`, read here):

- `{prefix}.bin`: every document's token ids back to back, each document ending with EOS;
  uint16 when the vocabulary has fewer than 65536 ids, else uint32; no header.
- `{prefix}.idx`: a little-endian header, then `num_docs + 1` int64 document offsets (in tokens)
  into the `.bin` (offset[0] = 0, offset[-1] = num_tokens):

      magic      8 bytes  b"FQTIDX\\0\\0"
      version    uint32   1
      itemsize   uint32   bytes per token in the .bin: 2 (uint16) or 4 (uint32)
      vocab_size uint32   the tokenizer's vocabulary size
      eos_id     uint32   the id appended after every document
      num_docs   uint64
      num_tokens uint64

Samples: the token stream is cut into windows of `seq_len + 1` tokens with stride `seq_len`, so the
last token of window j is the first of window j+1 and every token after the first is a target
exactly once per epoch. Windows run across document boundaries (EOS separates documents). Sample
`i` of the infinite stream is window `perm_e[i % n]` of epoch `e = i // n`, where `perm_e` is a
permutation seeded by (seed, e), computed per index (`IndexPermutation`). A run's data position is
therefore one integer, the number of samples consumed, and `batch(a, n)` equals the concatenation
of any split of it into smaller batches: resuming, or changing the number of data-parallel ranks,
replays exactly the same samples.

Only numpy and torch are needed here; training never imports `datasets`.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import torch

MAGIC = b"FQTIDX\0\0"
VERSION = 1
_HEADER = struct.Struct("<8sIIIIQQ")
_FIX = "run tools/prepare_data.py to (re)build it"


class DataError(ValueError):
    """A dataset or data input is missing or malformed; the message names the file and the fix."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else uint32."""
    if vocab_size <= 0:
        raise DataError(f"vocab_size={vocab_size}: must be > 0")
    if vocab_size >= 2**32:
        raise DataError(f"vocab_size={vocab_size}: ids do not fit in uint32")
    return np.dtype(np.uint16) if vocab_size < 65536 else np.dtype(np.uint32)


class IndexedDatasetWriter:
    """Writes a `{path}.bin/{path}.idx` pair document by document.

    The caller chooses the paths (tools/prepare_data.py writes to temporary names and renames
    them when complete, so an interrupted run never leaves a pair that looks valid).
    """

    def __init__(self, bin_path: str, idx_path: str, vocab_size: int, eos_id: int):
        self.bin_path, self.idx_path = bin_path, idx_path
        self.vocab_size, self.eos_id = vocab_size, eos_id
        self.dtype = token_dtype(vocab_size)
        if not 0 <= eos_id < vocab_size:
            raise DataError(f"eos_id={eos_id} is outside the vocabulary [0, {vocab_size})")
        self._bin = open(bin_path, "wb")
        self._lengths: list[np.ndarray] = []
        self.num_tokens = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: `tokens` is their concatenation (EOS included), `lengths` their
        sizes."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != tokens.size:
            raise DataError(f"{self.bin_path}: document lengths sum to {int(lengths.sum())}, "
                            f"but {tokens.size} tokens were given")
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"{self.bin_path}: token id {int(tokens.max())} >= vocab_size "
                            f"{self.vocab_size}; the tokenizer and vocab_size disagree")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.append(lengths)
        self.num_tokens += tokens.size

    def finish(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with open(self.idx_path, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.vocab_size,
                                 self.eos_id, lengths.size, self.num_tokens))
            f.write(offsets.astype("<i8").tobytes())

    def abort(self) -> None:
        self._bin.close()


class IndexedDataset:
    """A memory-mapped `{prefix}.bin/{prefix}.idx` pair, validated on open."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        bin_path, idx_path = f"{prefix}.bin", f"{prefix}.idx"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise DataError(f"dataset '{prefix}': {p} does not exist; {_FIX}")
        with open(idx_path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:8] != MAGIC:
                raise DataError(f"{idx_path}: not an fqtrain index (bad magic or truncated "
                                f"header); {_FIX}")
            magic, version, itemsize, vocab, eos, num_docs, num_tokens = _HEADER.unpack(head)
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version}, this fqtrain reads version "
                            f"{VERSION}; {_FIX}")
        if itemsize not in (2, 4):
            raise DataError(f"{idx_path}: token size {itemsize} bytes is not 2 or 4; {_FIX}")
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        if self.dtype != token_dtype(vocab):
            raise DataError(f"{idx_path}: vocab_size {vocab} does not match token dtype "
                            f"{self.dtype}; {_FIX}")
        if not 0 <= eos < vocab:
            raise DataError(f"{idx_path}: eos_id {eos} outside vocabulary of {vocab}; {_FIX}")
        idx_size = os.path.getsize(idx_path)
        want_idx = _HEADER.size + 8 * (num_docs + 1)
        if idx_size != want_idx:
            raise DataError(f"{idx_path}: {idx_size} bytes, expected {want_idx} for {num_docs} "
                            f"documents (truncated or mismatched); {_FIX}")
        bin_size = os.path.getsize(bin_path)
        if bin_size != num_tokens * itemsize:
            raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes "
                            f"{num_tokens} tokens of {itemsize} bytes ({num_tokens * itemsize} "
                            f"bytes); the pair does not belong together or was truncated; {_FIX}")
        self.vocab_size = int(vocab)
        self.eos_id = int(eos)
        self.num_docs = int(num_docs)
        self.num_tokens = int(num_tokens)
        self.offsets = np.memmap(idx_path, dtype="<i8", mode="r", offset=_HEADER.size,
                                 shape=(self.num_docs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != self.num_tokens:
            raise DataError(f"{idx_path}: document offsets do not span the {self.num_tokens} "
                            f"tokens of {bin_path}; {_FIX}")
        # np.memmap cannot map an empty file; an empty corpus is refused by prepare_data anyway.
        if self.num_tokens == 0:
            self.tokens = np.zeros(0, dtype=self.dtype)
        else:
            self.tokens = np.memmap(bin_path, dtype=self.dtype, mode="r",
                                    shape=(self.num_tokens,))

    def document(self, i: int) -> np.ndarray:
        """Token ids of document i, its trailing EOS included."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def check_vocab(self, embedding_size: int) -> None:
        """Raise if the tokenizer's ids do not fit the model's embedding table."""
        if self.vocab_size > embedding_size:
            raise DataError(f"dataset '{self.prefix}' has vocab_size {self.vocab_size} but the "
                            f"model embedding has {embedding_size} rows; set model.vocab_size >= "
                            f"{self.vocab_size} (or 0 to take the dataset's)")

    def __repr__(self) -> str:
        return (f"IndexedDataset('{self.prefix}', docs={self.num_docs}, tokens={self.num_tokens}, "
                f"vocab={self.vocab_size}, dtype={self.dtype})")


_MASK64 = (1 << 64) - 1


def _mix64(x):
    """splitmix64's finalizer: a bijective 64-bit hash (Python ints or uint64 arrays)."""
    if isinstance(x, int):
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        return x ^ (x >> 31)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class IndexPermutation:
    """A seeded pseudo-random permutation of range(n), evaluated per index in O(1) memory.

    A 6-round Feistel network on 2k bits (4^k >= n) with a splitmix64 round function is a
    bijection of [0, 4^k); indices it maps outside [0, n) are mapped again until they land
    inside ("cycle walking"), which keeps it a bijection of [0, n). Pure integer arithmetic:
    the same permutation on every machine and NumPy version, and no n-sized table to build or
    hold, however large the corpus.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, stream: int = 0):
        if n <= 0:
            raise ValueError(f"permutation of {n} elements")
        self.n = n
        self._half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        base = _mix64((seed * 0x9E3779B97F4A7C15 + stream) & _MASK64)
        self._keys = [np.uint64(_mix64((base + r * 0xD1B54A32D192ED03) & _MASK64))
                      for r in range(self.ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        k = np.uint64(self._half)
        mask = np.uint64((1 << self._half) - 1)
        left, right = x >> k, x & mask
        for key in self._keys:
            left, right = right, left ^ (_mix64(right ^ key) & mask)
        return (left << k) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(idx, dtype=np.uint64))
        outside = x >= self.n
        while outside.any():
            x[outside] = self._feistel(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


class SampleStream:
    """Windows of seq_len+1 tokens packed across documents; sample i of the infinite stream is
    window perm_e[i % n] of epoch e = i // n, with perm_e a seeded permutation per epoch."""

    def __init__(self, dataset: IndexedDataset, seq_len: int, seed: int):
        if seq_len <= 0:
            raise DataError(f"seq_len={seq_len}: must be > 0")
        if seed < 0:
            raise DataError(f"seed={seed}: must be >= 0")
        self.dataset, self.seq_len, self.seed = dataset, seq_len, seed
        self._n = max(0, (dataset.num_tokens - 1) // seq_len)
        if self._n == 0:
            raise DataError(f"dataset '{dataset.prefix}' has {dataset.num_tokens} tokens, fewer "
                            f"than one window of seq_len+1 = {seq_len + 1}; use more text or a "
                            f"smaller data.seq_len")
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def __len__(self) -> int:
        return self._n

    def windows(self, start: int, count: int) -> np.ndarray:
        """Window indices (into the epoch's unshuffled windows) of samples start..start+count-1."""
        if start < 0 or count < 0:
            raise ValueError(f"batch(start={start}, count={count}): both must be >= 0")
        samples = np.arange(start, start + count, dtype=np.int64)
        epochs, pos = np.divmod(samples, self._n)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = IndexPermutation(self._n, self.seed, int(e))(pos[sel])
        return out

    def batch(self, start: int, count: int) -> torch.Tensor:
        """int64 tensor (count, seq_len+1): samples start..start+count-1 of the stream."""
        starts = self.windows(start, count) * self.seq_len
        rows = self.dataset.tokens[starts[:, None] + self._offsets[None, :]]
        return torch.from_numpy(rows.astype(np.int64))


def resolve_val_prefix(path: str, val_path: str) -> str | None:
    """The validation prefix: val_path if given, else f"{path}_val" when its pair exists, else
    None."""
    if val_path:
        return val_path
    candidate = f"{path}_val"
    if os.path.isfile(f"{candidate}.bin") and os.path.isfile(f"{candidate}.idx"):
        return candidate
    return None
