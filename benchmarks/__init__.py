"""The benchmarks a user runs, from the repository root (this folder is not installed with the
package; each harness prints its usage with `--help`):

    python -m benchmarks.sanity_figures       # CPU: the numerics sanity figures beside their published values
    python -m benchmarks.bench_kernels        # GPU: kernels and NVFP4 linears against BF16 (--results-md, --from-md)
    python -m benchmarks.bench_double_block   # GPU: the TetraJet-v2 double-block kernels
    python -m benchmarks.quality --out DIR    # training quality of every recipe against BF16 (--preset campaign)
    python -m benchmarks.multi_gpu --out DIR  # TP=2+SP, PP=2, DP=2 against one GPU (--cpu: 2 gloo ranks)
    python -m benchmarks.grad_quality         # CPU: each recipe's gradient against the FP32 gradient
    python -m benchmarks.fp4_perturbation     # CPU: how FP4 training amplifies last-bit weight differences

Shared by them: `_runs` (run summaries, launcher commands side by side, tables between markers),
`_stats` (Student-t intervals over seeds), `timing` (GPU and host timing rules). Kernel-development
tools are in `tools/` (`python -m tools.NAME`), the device-run scripts in `tools/device/`.
"""
