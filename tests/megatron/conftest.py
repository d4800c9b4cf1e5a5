"""The rank processes come from one forkserver whose environment is fixed when it starts: set
TRITON_INTERPRET=1 before that (unless a GPU run asks otherwise), so tests can drive the kernel path
on CPU (MEGATRON_FP4_KERNELS=interpret in the rank). Triton reads it when triton.language is
imported, which the forkserver's preload does; without kernels enabled it changes nothing else."""
import os

if os.environ.get("MEGATRON_FP4_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
