"""The quality campaign's data on both launcher routes, with megatron-core's own classes on CPU:
--nvfp4-data-seed fixes the data order whatever --seed is (GPU route: Megatron's GPTDataset, which
--seed alone would reshuffle), --full-validation reads the whole held-out split once, and BPE
(uint16) corpora go through GPTDataset and the CPU driver's windows."""
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_fp4.data import corpus, tokenizer

pytestmark = pytest.mark.timeout(300)

TINY = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--swiglu"]


@pytest.fixture(scope="module")
def bpe_corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bpe")
    src = tmp / "src"
    src.mkdir()
    for name in ("argparse.py", "shutil.py", "textwrap.py", "string.py", "glob.py", "fnmatch.py"):
        shutil.copy(os.path.join(corpus.default_source(), name), src / name)
    info = corpus.build([str(src)], str(tmp / "c"), valid_fraction=0.3, tokenizer_vocab=500)
    return info


@pytest.fixture
def megatron_globals():
    from megatron.training.global_vars import unset_global_variables
    unset_global_variables()
    yield
    unset_global_variables()


def _datasets(info, extra, samples):
    from megatron.training.global_vars import unset_global_variables

    from megatron_fp4.pretrain_support import build_config, gpt_dataset_config, train_valid_test_datasets_provider
    unset_global_variables()
    p = info["prefixes"]
    args, _ = build_config(TINY + ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(info["vocab_size"]),
                                   "--null-tokenizer-eod-id", "0", "--train-data-path", p["train"],
                                   "--valid-data-path", p["valid"], "--test-data-path", p["valid"], *extra])
    from megatron.training import get_tokenizer
    seed = gpt_dataset_config(args, get_tokenizer()).random_seed
    train, valid, _ = train_valid_test_datasets_provider(samples)
    return seed, train, valid


def test_gpu_route_data_order_follows_the_data_seed_not_the_init_seed(bpe_corpus, tmp_path, megatron_globals):
    def first(extra, cache):
        seed, train, _ = _datasets(bpe_corpus, extra + ["--data-cache-path", str(tmp_path / cache)], [16, 4, 4])
        return seed, torch.stack([train[i]["tokens"] for i in range(8)])

    s1, a = first(["--seed", "3", "--nvfp4-data-seed", "7"], "a")
    s2, b = first(["--seed", "4", "--nvfp4-data-seed", "7"], "b")
    s3, c = first(["--seed", "4"], "c")
    assert (s1, s2, s3) == (7, 7, 4)
    assert torch.equal(a, b)                       # other init seed, same data order
    assert not torch.equal(a, c)                   # the control: --seed alone reshuffles the data
    # BPE tokens through GPTDataset: ids below the vocabulary, pieces of text of the corpus's files
    assert int(a.max()) < bpe_corpus["vocab_size"]
    tok = tokenizer.load(os.path.dirname(bpe_corpus["prefixes"]["train"]))
    sources = "".join(open(os.path.join(corpus.default_source(), n), encoding="utf-8").read()
                      for n in ("argparse.py", "shutil.py", "textwrap.py", "string.py", "glob.py", "fnmatch.py"))
    for sample in a:
        for piece in tokenizer.decode(tok, sample.tolist()).split(tokenizer.EOD_TOKEN):
            assert piece in sources


def test_gpu_route_full_validation_reads_the_whole_held_out_split_once(bpe_corpus, tmp_path, megatron_globals):
    _, _, valid = _datasets(bpe_corpus, ["--full-validation", "--data-cache-path", str(tmp_path / "v")],
                            [16, None, None])
    tokens = corpus.load_tokens(bpe_corpus["prefixes"]["valid"])
    # one epoch of consecutive samples: every token but the last (partial) sample's is predicted once
    assert len(valid) == (len(tokens) - 1) // 32
    labels = sorted(tuple(valid[i]["labels"].tolist()) for i in range(len(valid)))
    windows = sorted(tuple(tokens[1 + 32 * i: 1 + 32 * (i + 1)].tolist()) for i in range(len(valid)))
    assert labels == windows


def test_cpu_driver_full_validation_batches_cover_the_split_in_order():
    from types import SimpleNamespace

    from megatron_fp4.errors import UsageError
    from megatron_fp4.pretrain_gpt import _full_split_batches
    s = SimpleNamespace(seq_length=8, micro_batch_size=3)
    tokens = np.arange(100, dtype=np.uint16)                  # 12 windows of 8 predictions: 4 micro-batches
    batches = _full_split_batches(tokens, s)
    assert len(batches) == 4 and all(b["tokens"].shape == (3, 8) for b in batches)
    labels = torch.cat([b["labels"].reshape(-1) for b in batches])
    assert torch.equal(labels, torch.arange(1, 97))           # each of tokens 1..96 predicted once, in order
    inputs = torch.cat([b["tokens"].reshape(-1) for b in batches])
    assert torch.equal(inputs, torch.arange(0, 96))
    with pytest.raises(UsageError, match="--full-validation: the held-out split has 20 tokens"):
        _full_split_batches(np.arange(20), s)


def test_megatron_parses_every_flag_of_a_campaign_run(bpe_corpus, tmp_path, megatron_globals):
    """The GPU route's command of a campaign run (benchmarks/quality.py --preset campaign) goes through
    Megatron's own argument parsing and the plugin's checks unchanged."""
    from benchmarks import quality
    from megatron_fp4.pretrain_support import build_config
    a = quality.parse_args(["--preset", "campaign", "--out", str(tmp_path)])
    corpus_dir = os.path.dirname(bpe_corpus["prefixes"]["train"])
    flags = quality.run_flags(a, "quartet2-seed2", "quartet2", a.seed + 1, corpus_dir, vocab=16384)
    args, _ = build_config(flags)
    assert (args.seed, args.nvfp4_data_seed, args.full_validation) == (1235, 1234, True)
    assert (args.num_layers, args.hidden_size, args.ffn_hidden_size, args.num_attention_heads) == (6, 384, 1024, 3)
    assert (args.seq_length, args.micro_batch_size, args.global_batch_size, args.train_iters) == (512, 128, 256, 1620)
    assert args.padded_vocab_size >= 16384 and args.nvfp4_recipe == "quartet2" and args.load == args.save
