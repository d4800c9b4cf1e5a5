"""Subword tokens for the corpus builder: a byte-level BPE trained offline with the `tokenizers`
library (`pip install 'megatron_fp4[quality]'` or `pip install tokenizers`).

- Trained on the training split only (the held-out files never shape the vocabulary), from the
  files' text (UTF-8; invalid bytes become U+FFFD, identically when training and encoding).
- Byte-level: every string is encodable (no unknown token); id 0 is the end-of-document token
  `<eod>` (corpus.EOD), the 256 byte symbols follow, then the merges.
- Saved as `<dir>/tokenizer.json` beside `<dir>/tokenizer.key.json`, the key it was trained for (the
  corpus sources and options, the training files' names and sizes, the vocabulary size, ...): a later
  build with the same key reuses the file, another key trains anew. Training is deterministic (the
  same files and options give the same merges, independent of the thread count; tested), so a bare
  machine rebuilding the corpus gets the tokenizer of the earlier ones.
- Token ids are stored as uint16 (vocabulary <= 65,536).
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Optional, Sequence

import numpy as np

EOD_TOKEN = "<eod>"
MIN_VOCAB = 258                   # <eod> + the 256 byte symbols + at least one merge
MAX_VOCAB = 1 << 16               # ids stored as uint16
TOKENIZER_FILE = "tokenizer.json"
KEY_FILE = "tokenizer.key.json"


def require_tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError("the BPE corpus needs the `tokenizers` library: pip install 'megatron_fp4[quality]' "
                          "(or pip install tokenizers), or build the byte-level corpus (no --tokenizer-vocab)") from e
    return tokenizers


def check_vocab(vocab_size: int, flag: str = "--tokenizer-vocab") -> int:
    if not MIN_VOCAB <= int(vocab_size) <= MAX_VOCAB:
        raise ValueError(f"{flag} {vocab_size}: a byte-level BPE vocabulary must be in [{MIN_VOCAB}, {MAX_VOCAB}] "
                         f"(<eod> + 256 byte symbols + merges; ids stored as uint16)")
    return int(vocab_size)


def text_of(data: bytes) -> str:
    """A file's bytes as the tokenizer sees them (UTF-8, invalid bytes replaced)."""
    return data.decode("utf-8", errors="replace")


def key_digest(key: dict) -> str:
    """A stable digest of a JSON-able key (sorted keys)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def train(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, length: Optional[int] = None):
    """A byte-level BPE `tokenizers.Tokenizer` trained on `texts`."""
    tk = require_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    vocab_size = check_vocab(vocab_size)
    tok = tk.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=length)
    if tok.token_to_id(EOD_TOKEN) != 0:
        raise RuntimeError(f"tokenizers {tk.__version__}: {EOD_TOKEN} did not get id 0")
    return tok


def load(path: str):
    """A saved tokenizer (`<dir>/tokenizer.json` or the file itself)."""
    tk = require_tokenizers()
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer at {path}: build the corpus with a BPE vocabulary first")
    return tk.Tokenizer.from_file(path)


def ensure(directory: str, train_paths: Sequence[str], vocab_size: int, key: dict, min_frequency: int = 2,
           log=print):
    """The tokenizer for `key`: `<directory>/tokenizer.json` when its key file matches, else trained on
    the files `train_paths` and saved there (the key file is written last: it marks a finished save)."""
    tk = require_tokenizers()
    key = dict(key, vocab_size=check_vocab(vocab_size), min_frequency=min_frequency, kind="byte-level BPE")
    digest = key_digest(key)
    path, key_path = os.path.join(directory, TOKENIZER_FILE), os.path.join(directory, KEY_FILE)
    if os.path.isfile(path) and os.path.isfile(key_path):
        with open(key_path) as fh:
            if json.load(fh).get("digest") == digest:
                return load(path)
    if not train_paths:
        raise ValueError("no training files to train the tokenizer on")

    def texts():
        for p in train_paths:
            with open(p, "rb") as fh:
                yield text_of(fh.read())

    tok = train(texts(), vocab_size, min_frequency, length=len(train_paths))
    os.makedirs(directory, exist_ok=True)
    for stale in (key_path, path):
        if os.path.exists(stale):
            os.remove(stale)
    tok.save(path + ".tmp")
    os.replace(path + ".tmp", path)
    with open(key_path, "w") as fh:
        json.dump({"digest": digest, "key": key, "tokenizers_version": tk.__version__,
                   "vocab_size": tok.get_vocab_size(), "sha256": file_sha256(path)}, fh, indent=1)
    log(f"trained a byte-level BPE tokenizer ({tok.get_vocab_size()} tokens) on {len(train_paths)} files -> {path}")
    return tok


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_batch(tok, datas: Sequence[bytes]) -> list:
    """Token ids (uint16 arrays) of each document, in order (the library encodes them in parallel)."""
    encodings = tok.encode_batch([text_of(d) for d in datas], add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.uint16) for e in encodings]


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], skip_special_tokens=False)
