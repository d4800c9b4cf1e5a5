"""Kernel-development tools, run from the repository root (not installed with the package):

    TRITON_INTERPRET=0 python -m tools.aot_check    # compile every kernel variant for sm_90, no GPU needed
    TRITON_INTERPRET=0 python -m tools.sass_stats   # SASS instruction counts and an issue-rate estimate, no GPU
    python -m tools.bench_variants --out DIR        # GPU: leave-one-out kernel variants and fast-path exactness
    python -m tools.host_profile                    # GPU: host time of one NVFP4 linear, cProfile
    python -m tools.stats_cost                      # GPU: the cost of one quantization-statistics iteration

`tools/device/` holds the scripts of a session on a lent GPU machine (`_device_env.sh`, sourced by the
others; `device_session.sh STAGE`, `device_step.sh`, `gpu_check.sh`, `stabilizers_gpu.sh`), run as
`bash tools/device/NAME.sh` from the repository root.
"""
