"""The launcher's corpus is cached under its save folder keyed by its source directory, options and
files: reused while they match, rebuilt (with a log line) when they do not. The tokens are checked
against the source files' bytes (documents end with EOD 0)."""
import os

import numpy as np
import pytest

from megatron_fp4.data import corpus

pytestmark = pytest.mark.timeout(120)


def _source(root, name, texts):
    src = root / name
    src.mkdir()
    for i, text in enumerate(texts):
        (src / f"f{i}.py").write_text(text)
    return src


def _all_tokens(out):
    return np.concatenate([corpus.load_tokens(os.path.join(out, s)) for s in ("train", "valid")])


def _expected(src):
    """Every file's bytes + EOD, any order: the multiset of documents."""
    return sorted((p.read_bytes() + b"\0") for p in sorted(src.iterdir()))


def _documents(tokens):
    parts = bytes(tokens).split(b"\0")[:-1]
    return sorted(p + b"\0" for p in parts)


def test_cache_is_keyed_by_source_options_and_files(tmp_path, capsys):
    a = _source(tmp_path, "a", [f"alpha = {i}\n" * 20 for i in range(4)])
    b = _source(tmp_path, "b", [f"beta = {i}\n" * 30 for i in range(5)])
    out = str(tmp_path / "run" / "corpus")
    corpus.ensure(out, str(a))
    assert _documents(_all_tokens(out)) == _expected(a)
    first = capsys.readouterr().out
    assert "built corpus from" in first and "rebuilding" not in first

    corpus.ensure(out, str(a))                                   # same key: reused, nothing printed
    assert capsys.readouterr().out == ""

    corpus.ensure(out, str(b))                                   # another source: rebuilt
    log = capsys.readouterr().out
    assert f"was built from {a}, this run's source is {b}: rebuilding" in log
    assert _documents(_all_tokens(out)) == _expected(b)

    (b / "f0.py").write_text("changed = True\n" * 7)              # same source, other contents
    corpus.ensure(out, str(b))
    assert "other contents" in capsys.readouterr().out
    assert _documents(_all_tokens(out)) == _expected(b)

    corpus.ensure(out, str(b), valid_fraction=0.5)                # other options
    assert "valid_fraction: 0.02 -> 0.5" in capsys.readouterr().out

    os.remove(os.path.join(out, corpus.MANIFEST))                 # a corpus from before the key existed
    corpus.ensure(out, str(b), valid_fraction=0.5)
    assert "has no cache key" in capsys.readouterr().out and os.path.exists(os.path.join(out, corpus.MANIFEST))


def test_sources_that_cannot_give_two_splits(tmp_path):
    one = _source(tmp_path, "one", ["x = 1\n"])
    with pytest.raises(corpus.CorpusError, match=r"--nvfp4-corpus-src .*only one text file \(f0.py\)"):
        corpus.ensure(str(tmp_path / "out"), str(one))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(corpus.CorpusError, match="no text files"):
        corpus.check_source(str(empty))
    with pytest.raises(corpus.CorpusError, match="--src .*directory not found"):
        corpus.build(str(tmp_path / "missing"), str(tmp_path / "out"), source_flag="--src")
    # two files always split into one train and one validation file, whatever their hashes
    two = _source(tmp_path, "two", ["a = 1\n", "b = 2\n"])
    info = corpus.build(str(two), str(tmp_path / "out2"), valid_fraction=0.99)
    assert info["counts"]["train_files"] == 1 and info["counts"]["valid_files"] == 1
