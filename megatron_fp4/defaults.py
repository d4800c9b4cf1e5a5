"""The main job's settings: the one table of defaults of both launcher routes.

`python -m megatron_fp4.pretrain_gpt` with no flags trains this small Llama-style GPT (RoPE, RMSNorm,
untied embeddings, no biases) with quartet2 on the byte-level corpus of the Python standard library;
every entry is a Megatron flag (`--num-layers` for `num_layers`) that the user's own value replaces.
The GPU route adds the missing ones to the argument list it hands Megatron (pretrain_support.launcher_argv);
the CPU route's parser takes them as its defaults (pretrain_gpt.cpu_parser); the CPU driver's
`GPTSettings` defaults to the same values.
"""
from __future__ import annotations

MAIN_JOB = {
    "num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 768, "num_attention_heads": 4, "seq_length": 128,
    "micro_batch_size": 8, "train_iters": 300, "lr": 2e-3, "min_lr": 2e-4, "lr_warmup_iters": 20,
    "lr_decay_style": "cosine", "weight_decay": 0.01, "clip_grad": 1.0, "seed": 1234,
    "position_embedding_type": "rope", "normalization": "RMSNorm", "log_interval": 10, "eval_interval": 100,
    "eval_iters": 4, "tokenizer_type": "NullTokenizer", "vocab_size": 256, "transformer_impl": "local",
}
# switches (flags without a value) the main job sets
MAIN_JOB_SWITCHES = ("untie_embeddings_and_output_weights", "disable_bias_linear")


def flag(name: str) -> str:
    """`num_layers` -> `--num-layers` (Megatron's flag for an argument name)."""
    return "--" + name.replace("_", "-")
