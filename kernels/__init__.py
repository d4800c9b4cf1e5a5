"""Triton kernels (installed as megatron_fp4.kernels). Each kernel has a pure-torch reference twin
in megatron_fp4 (quantizers, hadamard, rng) that the tests compare it against."""
