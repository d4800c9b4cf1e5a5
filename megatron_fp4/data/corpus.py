"""Turn directories of text files into Megatron indexed datasets, byte-level or subword tokens.

Sources: one root directory or several (`--src DIR [DIR ...]`); files chosen by suffix, or by
fnmatch patterns on the file name (`--patterns '*.py' '*.md'`). Byte-level (default): tokens are the
file's UTF-8 bytes (vocabulary 256); byte 0 (absent from text) ends each document. Subword
(`--tokenizer-vocab N`): a byte-level BPE trained on the training split only (data/tokenizer.py),
saved in `<out>/tokenizer.json`; id 0 ends each document; ids stored as uint16.
Whole files are held out for validation, chosen by a hash of the file's key (its path relative to
its root, prefixed with the root's directory name when there are several roots), so the split is
stable across machines and runs and independent of any seed; a corpus needs at least two files.
`--dedupe` keeps one copy of files with identical contents (the first key in sorted order), so no
held-out file repeats a training file. Default corpus: the Python standard library's sources of the
running interpreter; the campaign corpus (`--campaign`: campaign_sources(), CAMPAIGN_PATTERNS,
deduplicated) adds every code and documentation file of the installed packages. Writes
`<out>/train.{bin,idx}`, `<out>/valid.{bin,idx}` and `<out>/corpus.json`, the cache key: the source
directories, the options (patterns, tokenizer, ...) and a digest of the files' names, sizes and
modification times, plus the counts. `ensure()` reuses a corpus only when its key matches and
rebuilds it (with a log line) otherwise.

    python -m megatron_fp4.data.corpus [--src DIR ...] [--out DIR] [--valid-fraction 0.02]
    python -m megatron_fp4.data.corpus --campaign --out DIR      # the quality campaign's corpus
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import sysconfig
import zlib
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import UsageError

EOD = 0
VOCAB_SIZE = 256
SUFFIXES = (".py", ".txt", ".rst", ".md")
MANIFEST = "corpus.json"
FORMAT = 1
SOURCE_FLAG = "--nvfp4-corpus-src"     # the launcher's flag for the source directory
# The campaign corpus: real code and documentation that every machine with the same Python packages
# has (this one, a GPU machine: the stdlib plus the installed packages, torch, triton, megatron-core,
# numpy, ...), no network needed: sources, type stubs, docs, C/C++/CUDA sources and headers.
CAMPAIGN_PATTERNS = ("*.py", "*.pyi", "*.md", "*.rst", "*.txt", "*.c", "*.cc", "*.cpp", "*.h", "*.hpp",
                     "*.cu", "*.cuh")
Sources = Union[None, str, Sequence[str]]     # one root directory or several


class CorpusError(UsageError):
    """The corpus source cannot give a train and a validation split (reported in one line)."""


def default_source() -> str:
    return sysconfig.get_paths()["stdlib"]


def campaign_sources() -> list:
    """The campaign corpus's roots: the running interpreter's standard library and its site-packages
    (sysconfig's 'stdlib' and 'purelib')."""
    paths = sysconfig.get_paths()
    return [paths["stdlib"], paths["purelib"]]


def _roots(src: Sources) -> list:
    return [src or default_source()] if src is None or isinstance(src, str) else list(src) or [default_source()]


def _files(src: Sources, suffixes: Iterable[str], max_bytes: int,
           patterns: Optional[Sequence[str]] = None) -> list[str]:
    """The corpus files under the root(s), sorted per root: names ending in one of `suffixes`, or
    matching one of the fnmatch `patterns` when given; caches and package metadata skipped."""
    out = []
    for src in _roots(src):
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "dist-packages")
                             and not d.endswith((".dist-info", ".egg-info")))
            for f in sorted(files):
                if any(fnmatch.fnmatchcase(f, p) for p in patterns) if patterns else f.endswith(tuple(suffixes)):
                    path = os.path.join(root, f)
                    if os.path.isfile(path) and 0 < os.path.getsize(path) <= max_bytes:
                        out.append(path)
    return out


def file_keys(src: Sources, files: Sequence[str]) -> dict:
    """path -> key, which decides the held-out split: the path relative to its root; with several roots
    prefixed by the root's directory name ('python3.12/os.py', 'site-packages/torch/nn/functional.py'),
    so it is the same on every machine with the same packages."""
    roots = [os.path.abspath(r) for r in _roots(src)]
    keys, owner = {}, {}
    for path in files:
        full = os.path.abspath(path)
        root = next(r for r in roots if full.startswith(r.rstrip(os.sep) + os.sep))
        rel = os.path.relpath(full, root).replace(os.sep, "/")
        key = rel if len(roots) == 1 else f"{os.path.basename(root.rstrip(os.sep))}/{rel}"
        if key in owner and owner[key] != root:
            raise CorpusError(f"corpus roots {owner[key]} and {root} give the same file key {key!r} (two roots with "
                              "one directory name): pass roots with distinct names")
        owner[key] = root
        keys[path] = key
    return keys


def is_valid_file(rel_path: str, valid_fraction: float) -> bool:
    return (zlib.crc32(rel_path.encode()) % 10_000) < valid_fraction * 10_000


def source_files(src: Sources = None, suffixes: Iterable[str] = SUFFIXES, max_file_bytes: int = 1 << 20,
                 source_flag: str = SOURCE_FLAG, patterns: Optional[Sequence[str]] = None) -> tuple:
    """(source directory or list of them, their text files); a CorpusError names the flag when there
    are fewer than two (whole files are held out for validation)."""
    src = src or default_source()
    for root in _roots(src):
        if not os.path.isdir(root):
            raise CorpusError(f"{source_flag} {root}: directory not found (a directory of text files)")
    files = _files(src, suffixes, max_file_bytes, patterns)
    if not files:
        raise CorpusError(f"{source_flag} {src}: no text files ({', '.join(patterns or suffixes)}, 1 to "
                          f"{max_file_bytes} bytes) under it")
    if len(files) < 2:
        raise CorpusError(f"{source_flag} {src}: only one text file ({file_keys(src, files)[files[0]]}); validation "
                          "holds out whole files, so the corpus needs at least 2: add files, or pass an indexed "
                          "dataset with --data-path (and --valid-data-path)")
    return src, files


def check_source(src: Optional[str] = None, source_flag: str = SOURCE_FLAG) -> None:
    """Start-time check of a corpus source (every rank, before any build)."""
    source_files(src, source_flag=source_flag)


def cache_key(src: Sources = None, valid_fraction: float = 0.02, suffixes: Iterable[str] = SUFFIXES,
              max_file_bytes: int = 1 << 20, files: Optional[list] = None, patterns: Optional[Sequence[str]] = None,
              tokenizer_vocab: Optional[int] = None, dedupe: bool = False) -> dict:
    """What a built corpus depends on: source directory (or directories), options (patterns, BPE
    vocabulary, deduplication), and the files' keys, sizes and modification times (a digest)."""
    roots = [os.path.abspath(r) for r in _roots(src)]
    if files is None:
        files = _files(roots if len(roots) > 1 else roots[0], suffixes, max_file_bytes, patterns)
    keys = file_keys(roots, files)
    digest = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        digest.update(f"{keys[path]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"format": FORMAT, "source": roots[0] if len(roots) == 1 else roots, "valid_fraction": float(valid_fraction),
            "suffixes": sorted(suffixes), "max_file_bytes": int(max_file_bytes), "files": len(files),
            "files_sha256": digest.hexdigest(), "patterns": sorted(patterns) if patterns else None,
            "tokenizer_vocab": int(tokenizer_vocab) if tokenizer_vocab else None, "dedupe": bool(dedupe)}


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read().replace(b"\x00", b"")


def _dedupe(files: list, keys: dict) -> list:
    """One file of each content (the first key in sorted order), sorted by key."""
    seen, kept = set(), []
    for path in sorted(files, key=keys.get):
        digest = hashlib.sha1(_read(path)).digest()
        if digest not in seen:
            seen.add(digest)
            kept.append(path)
    return kept


def build(src: Sources = None, out: str = "nvfp4_corpus", valid_fraction: float = 0.02,
          suffixes: Iterable[str] = SUFFIXES, max_file_bytes: int = 1 << 20, source_flag: str = SOURCE_FLAG,
          patterns: Optional[Sequence[str]] = None, tokenizer_vocab: Optional[int] = None, dedupe: bool = False,
          log=print) -> dict:
    """Build train/valid indexed datasets and their cache key; returns prefixes, token counts, key,
    vocabulary size and tokenizer path (None: byte-level). With `tokenizer_vocab` the tokens are a
    byte-level BPE of that vocabulary trained on the training split (reused from `<out>` when it was
    trained for the same sources and options: data/tokenizer.py)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    src, files = source_files(src, suffixes, max_file_bytes, source_flag, patterns)
    if not 0.0 < valid_fraction < 1.0:
        raise CorpusError(f"valid_fraction={valid_fraction}: must be in (0, 1) to hold out a validation split")
    key = cache_key(src, valid_fraction, suffixes, max_file_bytes, files, patterns, tokenizer_vocab, dedupe)
    os.makedirs(out, exist_ok=True)
    for stale in (MANIFEST, "valid.idx"):           # an interrupted rebuild never looks finished
        if os.path.exists(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    rel = file_keys(src, files)
    duplicates = 0
    if dedupe:
        kept = _dedupe(files, rel)
        duplicates, files = len(files) - len(kept), kept
    prefixes = {split: os.path.join(out, split) for split in ("train", "valid")}
    counts = {"train": 0, "valid": 0, "train_files": 0, "valid_files": 0, "train_bytes": 0, "valid_bytes": 0,
              "duplicates_dropped": duplicates}
    held_out = {p for p in files if is_valid_file(rel[p], valid_fraction)}
    if not held_out:
        # a small corpus: still hold out one whole file, the one with the smallest hash (stable)
        held_out = {min(files, key=lambda p: zlib.crc32(rel[p].encode()))}
    if len(held_out) == len(files):
        # every file hashed into validation: keep the largest-hash one for training
        held_out.discard(max(files, key=lambda p: zlib.crc32(rel[p].encode())))
    tok, dtype = None, np.uint8
    if tokenizer_vocab:                  # trained on the training split only, keyed by this corpus's key
        from . import tokenizer as bpe
        train_paths = [p for p in files if p not in held_out]
        tok = bpe.ensure(out, train_paths, tokenizer_vocab, {k: v for k, v in key.items() if k != "source"}, log=log)
        dtype = np.uint16
    builders = {split: IndexedDatasetBuilder(get_bin_path(p), dtype=dtype) for split, p in prefixes.items()}
    for start in range(0, len(files), 256):       # the tokenizer encodes a chunk of files in parallel
        chunk = [(p, d) for p, d in ((p, _read(p)) for p in files[start:start + 256]) if d]
        encoded = ([np.frombuffer(d, dtype=np.uint8) for _, d in chunk] if tok is None
                   else bpe.encode_batch(tok, [d for _, d in chunk]))
        for (path, data), ids in zip(chunk, encoded):
            split = "valid" if path in held_out else "train"
            tokens = np.concatenate([ids, np.array([EOD], dtype=dtype)])
            builders[split].add_item(torch.from_numpy(tokens.astype(np.int64) if tok is not None else tokens))
            builders[split].end_document()
            counts[split] += len(tokens)
            counts[f"{split}_files"] += 1
            counts[f"{split}_bytes"] += len(data)
    for split in ("train", "valid"):
        if counts[f"{split}_files"] == 0:
            raise CorpusError(f"{source_flag} {src}: the {split} split got no text (the other files are empty "
                              "once NUL bytes are dropped); add text files")
    for split, b in builders.items():
        b.finalize(get_idx_path(prefixes[split]))
    built = {"vocab_size": tok.get_vocab_size() if tok is not None else VOCAB_SIZE,
             "tokenizer": os.path.join(out, bpe.TOKENIZER_FILE) if tok is not None else None}
    with open(os.path.join(out, MANIFEST), "w") as fh:     # last: marks a finished build
        json.dump({**key, "counts": counts, "built": built}, fh, indent=1)
    return {"prefixes": prefixes, "counts": counts, "source": src, "key": key, **built}


def _stored_key(out: str) -> Optional[dict]:
    try:
        with open(os.path.join(out, MANIFEST)) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return None
    stored.pop("counts", None)
    stored.pop("built", None)
    return stored


def ensure(out: str, src: Sources = None, valid_fraction: float = 0.02, patterns: Optional[Sequence[str]] = None,
           tokenizer_vocab: Optional[int] = None, dedupe: bool = False) -> tuple:
    """The (train, valid) prefixes under `out`. The corpus there is reused only if it was built from
    the same source, options and files (its corpus.json); otherwise it is (re)built, with a log line."""
    want = cache_key(src, valid_fraction, patterns=patterns, tokenizer_vocab=tokenizer_vocab, dedupe=dedupe)
    have = _stored_key(out) if os.path.exists(os.path.join(out, "valid.idx")) else None
    if have != want:
        if have is not None or os.path.exists(os.path.join(out, "train.idx")):
            print(f"megatron_fp4: corpus under {out} {_difference(have, want)}: rebuilding", flush=True)
        info = build(src, out, valid_fraction, patterns=patterns, tokenizer_vocab=tokenizer_vocab, dedupe=dedupe)
        print(f"built corpus from {info['source']}: {info['counts']}", flush=True)
    return os.path.join(out, "train"), os.path.join(out, "valid")


def _difference(have: Optional[dict], want: dict) -> str:
    if have is None:
        return "has no cache key (corpus.json) or is incomplete"
    if have.get("source") != want["source"]:
        return f"was built from {have.get('source')}, this run's source is {want['source']}"
    changed = [k for k in want if have.get(k) != want[k]]
    if changed == ["files_sha256"] or changed == ["files", "files_sha256"]:
        return f"was built from other contents of {want['source']} (files added, removed or changed)"
    return "was built with other options (" + ", ".join(f"{k}: {have.get(k)} -> {want[k]}" for k in changed) + ")"


def load_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset as one array of its dtype (uint8 byte-level, uint16 BPE;
    documents separated by EOD)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix, mmap=True)
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).astype(ds.index.dtype)


def main(argv=None):
    from ..errors import run_reporting_user_errors
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", nargs="+", default=None, help="directories of text files (default: Python stdlib)")
    p.add_argument("--out", default="nvfp4_corpus")
    p.add_argument("--valid-fraction", type=float, default=0.02)
    p.add_argument("--patterns", nargs="+", default=None, help="fnmatch patterns of file names (default: suffixes "
                   + " ".join(SUFFIXES) + ")")
    p.add_argument("--tokenizer-vocab", type=int, default=None, help="byte-level BPE vocabulary (default: bytes)")
    p.add_argument("--dedupe", action="store_true", help="one copy of files with identical contents")
    p.add_argument("--campaign", action="store_true",
                   help="the quality campaign's corpus: stdlib + site-packages, CAMPAIGN_PATTERNS, --dedupe, "
                        "BPE 16384 (flags given explicitly override)")
    a = p.parse_args(argv)
    if a.campaign:
        a.src, a.patterns = a.src or campaign_sources(), a.patterns or list(CAMPAIGN_PATTERNS)
        a.tokenizer_vocab, a.dedupe = a.tokenizer_vocab or 16384, True
    src = a.src[0] if a.src and len(a.src) == 1 else a.src
    info = run_reporting_user_errors(lambda: build(src, a.out, a.valid_fraction, source_flag="--src",
                                                   patterns=a.patterns, tokenizer_vocab=a.tokenizer_vocab,
                                                   dedupe=a.dedupe), argv)
    print(f"corpus from {info['source']}: {info['counts']} -> {info['prefixes']}")


if __name__ == "__main__":
    main()
