"""Kernel tests run on CPU under the Triton interpreter unless a GPU is present and the test asks
for it (@pytest.mark.gpu). TRITON_INTERPRET must be set before any @triton.jit function is defined,
i.e. before megatron_fp4.kernels is imported; a GPU run sets MEGATRON_FP4_TEST_GPU=1 to keep it off."""
import os

if os.environ.get("MEGATRON_FP4_TEST_GPU", "0") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import sys  # noqa: E402

_already = [m for m in sys.modules if m.startswith("megatron_fp4.kernels.")]
if os.environ.get("TRITON_INTERPRET") == "1" and _already:
    raise RuntimeError(f"kernel modules imported before TRITON_INTERPRET was set: {_already}")
