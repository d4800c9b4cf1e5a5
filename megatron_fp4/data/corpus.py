"""Turn a directory of text files into Megatron indexed datasets with byte-level tokens.

Tokens are the file's UTF-8 bytes (vocabulary 256); byte 0 (absent from text) ends each document.
Whole files are held out for validation (chosen by a hash of the relative path, so the split is
stable across machines and runs). Default corpus: the Python standard library's sources of the
running interpreter. Writes `<out>/train.{bin,idx}` and `<out>/valid.{bin,idx}`.

    python -m megatron_fp4.data.corpus [--src DIR] [--out DIR] [--valid-fraction 0.02]
"""
from __future__ import annotations

import argparse
import os
import sysconfig
import zlib
from typing import Iterable, Optional

import numpy as np

EOD = 0
VOCAB_SIZE = 256
SUFFIXES = (".py", ".txt", ".rst", ".md")


def default_source() -> str:
    return sysconfig.get_paths()["stdlib"]


def _files(src: str, suffixes: Iterable[str], max_bytes: int) -> list[str]:
    out = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "dist-packages"))
        for f in sorted(files):
            if f.endswith(tuple(suffixes)):
                path = os.path.join(root, f)
                if 0 < os.path.getsize(path) <= max_bytes:
                    out.append(path)
    return out


def is_valid_file(rel_path: str, valid_fraction: float) -> bool:
    return (zlib.crc32(rel_path.encode()) % 10_000) < valid_fraction * 10_000


def build(src: Optional[str] = None, out: str = "mfp4_corpus", valid_fraction: float = 0.02,
          suffixes: Iterable[str] = SUFFIXES, max_file_bytes: int = 1 << 20) -> dict:
    """Build train/valid indexed datasets; returns their prefixes and token counts."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    src = src or default_source()
    if not os.path.isdir(src):
        raise FileNotFoundError(f"corpus source directory not found: {src}")
    files = _files(src, suffixes, max_file_bytes)
    if not files:
        raise ValueError(f"no text files ({', '.join(suffixes)}) under {src}")
    os.makedirs(out, exist_ok=True)
    prefixes = {split: os.path.join(out, split) for split in ("train", "valid")}
    builders = {split: IndexedDatasetBuilder(get_bin_path(p), dtype=np.uint8) for split, p in prefixes.items()}
    counts = {"train": 0, "valid": 0, "train_files": 0, "valid_files": 0}
    rel = {path: os.path.relpath(path, src) for path in files}
    held_out = {p for p in files if is_valid_file(rel[p], valid_fraction)}
    if not held_out and len(files) > 1 and valid_fraction > 0:
        # a small corpus: still hold out one whole file, the one with the smallest hash (stable)
        held_out = {min(files, key=lambda p: zlib.crc32(rel[p].encode()))}
    for path in files:
        with open(path, "rb") as fh:
            data = fh.read().replace(b"\x00", b"")
        if not data:
            continue
        split = "valid" if path in held_out else "train"
        tokens = np.frombuffer(data + bytes([EOD]), dtype=np.uint8)
        builders[split].add_item(torch.from_numpy(tokens.copy()))
        builders[split].end_document()
        counts[split] += len(tokens)
        counts[f"{split}_files"] += 1
    if counts["valid_files"] == 0:
        raise ValueError(f"valid_fraction={valid_fraction} held out no file of {len(files)}; raise it")
    for split, b in builders.items():
        b.finalize(get_idx_path(prefixes[split]))
    return {"prefixes": prefixes, "counts": counts, "source": src}


def ensure(out: str, src: Optional[str] = None) -> tuple:
    """The (train, valid) prefixes under `out`, building the corpus there first when it is missing
    (the valid split is written last, so its index marks a finished build)."""
    if not os.path.exists(os.path.join(out, "valid.idx")):
        info = build(src, out)
        print(f"built corpus from {info['source']}: {info['counts']}", flush=True)
    return os.path.join(out, "train"), os.path.join(out, "valid")


def load_tokens(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset as one uint8 array (documents separated by EOD)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix, mmap=True)
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))]).astype(np.uint8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--src", default=None, help="directory of text files (default: Python stdlib)")
    p.add_argument("--out", default="mfp4_corpus")
    p.add_argument("--valid-fraction", type=float, default=0.02)
    a = p.parse_args(argv)
    info = build(a.src, a.out, a.valid_fraction)
    print(f"corpus from {info['source']}: {info['counts']} -> {info['prefixes']}")


if __name__ == "__main__":
    main()
