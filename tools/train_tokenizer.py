"""Train a SentencePiece tokenizer (BPE or unigram) on text.

    python tools/train_tokenizer.py --input corpus/*.txt --vocab-size 32000 \\
        --model-type bpe --output tok/spm32k      # -> tok/spm32k.model, tok/spm32k.vocab

Inputs are those of tools/prepare_data.py: .txt/.text/.md files (read by sentencepiece itself),
.jsonl/.ndjson and .parquet files (the `--text-key` field, read here), globs and directories.
Every line of text is one training sentence; at most `--input-sentence-size` lines,
sampled at random, are used, so training stays fast on big inputs. The model is lossless:
byte fallback is on (any text encodes, unseen characters become byte pieces), normalization is
the identity and whitespace is kept as is, so `decode(encode(text)) == text`.

Fixed special ids (tools/prepare_data.py appends EOS after every document):

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Iterator

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.prepare_data import TEXT_EXTS, expand_inputs, file_documents
from train.data import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 256 byte pieces + 4 specials, plus room for at least some merges.
MIN_VOCAB_SIZE = 300


class TokenizerError(DataError):
    """Bad tokenizer settings for the input; the message names the input and the fix."""


def _lines(files: list[str], text_key: str) -> Iterator[str]:
    for doc in file_documents(files, text_key):
        for line in doc.split("\n"):
            if line:
                yield line


def train_tokenizer(inputs: list[str], output: str, vocab_size: int, model_type: str = "bpe",
                    input_sentence_size: int = 1_000_000, num_threads: int | None = None,
                    quiet: bool = True, text_key: str = "text") -> str:
    """Train and write `{output}.model` / `{output}.vocab`; returns the .model path."""
    import sentencepiece as spm

    if model_type not in ("bpe", "unigram"):
        raise TokenizerError(f"model type '{model_type}': use bpe or unigram")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(f"vocab size {vocab_size}: must be >= {MIN_VOCAB_SIZE} (256 byte "
                             f"pieces for byte fallback + special ids + merges)")
    files = expand_inputs(inputs)
    if sum(os.path.getsize(f) for f in files) == 0:
        raise TokenizerError(f"inputs {inputs}: all files are empty; give text to train on")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if all(f.lower().endswith(TEXT_EXTS) for f in files):
        source = {"input": files}
    else:
        source = {"sentence_iterator": _lines(files, text_key)}
    try:
        spm.SentencePieceTrainer.train(
            **source,
            model_prefix=output,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as e:
        msg = str(e)
        if "Vocabulary size too high" in msg:
            raise TokenizerError(f"vocab size {vocab_size} is too large for inputs {inputs}: "
                                 f"{msg.strip()}; use a smaller --vocab-size or more text") from e
        if "smaller than required_chars" in msg:
            raise TokenizerError(f"vocab size {vocab_size} is too small for the characters of "
                                 f"inputs {inputs} (byte fallback needs 256 byte pieces + special "
                                 f"ids + every frequent character): {msg.strip()}; use a larger "
                                 f"--vocab-size") from e
        raise TokenizerError(f"sentencepiece failed on inputs {inputs}: {msg.strip()}") from e
    return f"{output}.model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", nargs="+", required=True,
                   help="text/JSONL/Parquet files, globs or directories")
    p.add_argument("--text-key", default="text", help="JSONL field / Parquet column")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--output", required=True, help="prefix: writes PREFIX.model, PREFIX.vocab")
    p.add_argument("--input-sentence-size", type=int, default=1_000_000,
                   help="lines sampled for training (default 1M)")
    p.add_argument("--threads", type=int, default=0, help="default: all CPU cores")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's log")
    a = p.parse_args(argv)
    try:
        path = train_tokenizer(a.input, a.output, a.vocab_size, a.model_type,
                               a.input_sentence_size, a.threads or None, quiet=not a.verbose,
                               text_key=a.text_key)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} and {a.output}.vocab ({a.model_type}, vocab {a.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
