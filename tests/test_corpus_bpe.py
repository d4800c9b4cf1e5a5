"""The corpus builder's several roots, patterns, deduplication and held-out split of whole files, and
the byte-level BPE tokenizer (megatron_fp4/data/tokenizer.py): trained on the training split only,
lossless, deterministic across processes and thread counts, reused for the same sources and options."""
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from megatron_fp4.data import corpus, tokenizer

STDLIB = corpus.default_source()
REAL = ["argparse.py", "shutil.py", "textwrap.py", "string.py", "glob.py", "fnmatch.py", "tempfile.py",
        "typing.py"]


def _roots(tmp_path):
    """Two roots of real text (stdlib sources), a copy of one file in both, files the patterns skip."""
    a, b = tmp_path / "alpha", tmp_path / "beta" / "pkg"
    a.mkdir()
    b.mkdir(parents=True)
    for name in REAL[:5]:
        shutil.copy(os.path.join(STDLIB, name), a / name)
    for name in REAL[5:]:
        shutil.copy(os.path.join(STDLIB, name), b / name)
    shutil.copy(os.path.join(STDLIB, "argparse.py"), b / "argparse_copy.py")       # same contents as alpha's
    (b / "notes.md").write_text("# Notes\n\nSome documentation text.\n" * 20)
    (b / "data.bin").write_bytes(b"\x01\x02" * 100)                               # matches no pattern
    (b / "pkg-1.0.dist-info").mkdir()
    (b / "pkg-1.0.dist-info" / "LICENSE.txt").write_text("license\n")            # package metadata: skipped
    return [str(a), str(tmp_path / "beta")]


def test_several_roots_patterns_dedupe_and_whole_file_split(tmp_path):
    roots = _roots(tmp_path)
    info = corpus.build(roots, str(tmp_path / "c"), valid_fraction=0.3, patterns=["*.py", "*.md", "*.txt"],
                        dedupe=True)
    c = info["counts"]
    # 9 .py + 1 .md match; the .bin, the dist-info license do not; one of the two argparse copies is dropped
    assert c["duplicates_dropped"] == 1 and c["train_files"] + c["valid_files"] == 9
    keys = corpus.file_keys(roots, corpus._files(roots, (), 1 << 20, ["*.py", "*.md", "*.txt"]))
    assert sorted(keys.values())[:2] == ["alpha/argparse.py", "alpha/glob.py"]
    assert "beta/pkg/notes.md" in keys.values() and not any("dist-info" in k for k in keys.values())
    # the held-out documents are exactly the files whose key hashes into the split, bytes unchanged
    valid = corpus.load_tokens(info["prefixes"]["valid"])
    docs = [bytes(d.tolist()) for d in np.split(valid, np.flatnonzero(valid == corpus.EOD) + 1)[:-1]]
    expected = [k for k in sorted(keys.values()) if corpus.is_valid_file(k, 0.3) and k != "beta/pkg/argparse_copy.py"]
    by_key = {k: p for p, k in keys.items()}
    assert [d[:-1] for d in docs] == [open(by_key[k], "rb").read() for k in expected]
    # the split depends on the keys only: the same roots elsewhere (other absolute paths) give it again
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for r in roots:
        shutil.copytree(r, moved / os.path.basename(r))
    again = corpus.build([str(moved / "alpha"), str(moved / "beta")], str(tmp_path / "c2"), valid_fraction=0.3,
                         patterns=["*.py", "*.md", "*.txt"], dedupe=True)
    assert again["counts"] == c
    assert np.array_equal(corpus.load_tokens(again["prefixes"]["valid"]), valid)
    with pytest.raises(corpus.CorpusError, match="same file key"):
        corpus.build([roots[0], str(moved / "alpha")], str(tmp_path / "c3"))


def test_bpe_corpus_is_lossless_trained_on_the_training_split_and_reused(tmp_path):
    roots = _roots(tmp_path)
    # a held-out file with a word found nowhere else: a tokenizer that saw it would have merged it
    held = next(f"held{i}.py" for i in range(1000) if corpus.is_valid_file(f"alpha/held{i}.py", 0.3))
    (tmp_path / "alpha" / held).write_text("zqxwv = zqxwv + 1\n" * 400)
    out = str(tmp_path / "c")
    logs = []
    info = corpus.build(roots, out, valid_fraction=0.3, patterns=["*.py", "*.md"], tokenizer_vocab=700, dedupe=True,
                        log=logs.append)
    assert info["vocab_size"] == 700 and len(logs) == 1 and "trained a byte-level BPE" in logs[0]
    tok = tokenizer.load(out)
    assert tok.token_to_id(tokenizer.EOD_TOKEN) == corpus.EOD == 0
    assert not any("zq" in t for t in tok.get_vocab())                     # never saw the held-out file
    for split in ("train", "valid"):
        ids = corpus.load_tokens(info["prefixes"][split])
        assert ids.dtype == np.uint16 and ids.max() < 700
        assert (ids == corpus.EOD).sum() == info["counts"][f"{split}_files"]
        docs = np.split(ids, np.flatnonzero(ids == corpus.EOD) + 1)[:-1]
        texts = [tokenizer.decode(tok, d[:-1]) for d in docs]
        if split == "valid":
            assert "zqxwv = zqxwv + 1\n" * 400 in texts
        # lossless: the decoded documents are the files' texts (the byte reference), in key order
        keys = corpus.file_keys(roots, corpus._files(roots, (), 1 << 20, ["*.py", "*.md"]))
        chosen = [k for k in sorted(keys.values()) if corpus.is_valid_file(k, 0.3) == (split == "valid")
                  and k != "beta/pkg/argparse_copy.py"]
        by_key = {k: p for p, k in keys.items()}
        assert texts == [open(by_key[k], encoding="utf-8", newline="").read() for k in chosen]
    # same sources and options: the corpus and its tokenizer are reused; another vocabulary rebuilds both
    mtime = os.stat(os.path.join(out, "tokenizer.json")).st_mtime_ns
    corpus.ensure(out, roots, 0.3, patterns=["*.py", "*.md"], tokenizer_vocab=700, dedupe=True)
    assert os.stat(os.path.join(out, "tokenizer.json")).st_mtime_ns == mtime
    corpus.ensure(out, roots, 0.3, patterns=["*.py", "*.md"], tokenizer_vocab=600, dedupe=True)
    assert tokenizer.load(out).get_vocab_size() == 600
    assert corpus.load_tokens(os.path.join(out, "train")).max() < 600
    with pytest.raises(ValueError, match="--tokenizer-vocab 100"):
        tokenizer.check_vocab(100)


TRAIN_SCRIPT = """
import sys
from megatron_fp4.data import tokenizer
paths = sys.argv[2:]
tok = tokenizer.train((open(p, encoding="utf-8").read() for p in paths), 900)
tok.save(sys.argv[1])
"""


def test_bpe_training_is_deterministic_across_processes_and_thread_counts(tmp_path):
    """A bare machine rebuilding the corpus must get the same tokenizer: two processes with different
    thread counts (and hash seeds) train byte-identical files."""
    paths = [os.path.join(STDLIB, n) for n in REAL]
    digests = []
    for threads, hashseed in (("1", "1"), ("2", "7")):
        target = str(tmp_path / f"tok{threads}.json")
        env = dict(os.environ, RAYON_NUM_THREADS=threads, PYTHONHASHSEED=hashseed)
        subprocess.run([sys.executable, "-c", TRAIN_SCRIPT, target, *paths], check=True, env=env, timeout=120)
        digests.append(hashlib.sha256(open(target, "rb").read()).hexdigest())
    assert digests[0] == digests[1]
