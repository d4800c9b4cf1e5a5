"""The interpreted kernels' rotations equal hadamard.rht bit for bit on the CPU, whichever sgemm/dgemm
kernel the BLAS picks. Under the interpreter tl.dot is numpy's matmul (OpenBLAS) and the twin is
torch's (MKL): with FP32 sums their orders differed on CPUs without AVX-512 (OpenBLAS's Haswell and
Zen kernels), which made a recipe's interpreted kernels and its torch twins differ by an ulp there
and nowhere else. Both now sum in FP64 and round once (see hadamard.rht). Each case runs in a fresh
process with OPENBLAS_CORETYPE naming a kernel this CPU can execute."""
import json
import os
import subprocess
import sys

import pytest

from cpu_blas import core_types, env_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_PROGRAM = r"""
import json, torch
from megatron_fp4.hadamard import rht
from megatron_fp4.kernels.double_block import rht16
from megatron_fp4.kernels.eden import rht128
from megatron_fp4.rng import random_signs
g = torch.Generator().manual_seed(11)
# rows over 24 binades, columns of mixed magnitude: FP32 sums of 16 or 128 such terms round
a = (torch.randn(128, 512, generator=g) * torch.exp2(torch.linspace(-12, 12, 128))[:, None]
     * torch.exp2(torch.randint(-6, 7, (1, 512), generator=g).float()))
out = {}
for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
    x = a.to(dtype)
    s16, s128 = random_signs(5, 16), random_signs(6, 128)
    out["rht16_" + name] = torch.equal(rht16(x, s16), rht(x, s16))
    out["rht16_t_" + name] = torch.equal(rht16(x, s16, transpose=True), rht(x.t(), s16))
    out["rht128_" + name] = torch.equal(rht128(x, s128), rht(x, s128))
    out["rht128_t_" + name] = torch.equal(rht128(x, s128, transpose=True), rht(x.t(), s128))
print("OUT=" + json.dumps(out))
"""


@pytest.mark.parametrize("core", core_types())
def test_interpreted_rotations_equal_the_twin_whatever_the_blas(core):
    env = env_for(core, dict(os.environ, TRITON_INTERPRET="1"))
    proc = subprocess.run([sys.executable, "-c", _PROGRAM], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("OUT=")][-1][4:])
    assert all(out.values()), out
