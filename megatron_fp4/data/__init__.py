"""Data helpers: the corpus builder (text files -> Megatron indexed dataset, byte-level tokens)."""
