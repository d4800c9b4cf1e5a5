"""Compile every kernel variant for sm_90 without a GPU (Triton's bundled ptxas): catches
GPU-only compile errors before spending device time. Prints registers/spills per variant.

    TRITON_INTERPRET=0 python benchmarks/aot_check.py
"""
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_fp4.kernels import dequant, eden, rtn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, sig, const, num_warps=4):
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
    k = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "enable_fp_fusion": False})
    md = k.metadata
    regs = getattr(k, "n_regs", None)
    print(f"ok  {fn.__name__:20s} {const}  shared={md.shared}", flush=True)
    return k


failures = 0
def attempt(*a, **kw):
    global failures
    try:
        return build(*a, **kw)
    except Exception as e:  # report and go on: one broken variant must not hide the others
        failures += 1
        print(f"ERR {a[0].__name__} {a[2]}: {type(e).__name__}: {str(e)[:2000]}", flush=True)


for partials in (True, False):
    attempt(rtn._amax_kernel, {"x_ptr": "*bf16", "n": "i32", "amax_bits_ptr": "*i32", "nonfinite_ptr": "*i32",
                               "part_ptr": "*i32"}, {"BLOCK_N": 8192, "PARTIALS": partials}, num_warps=8)
attempt(rtn._amax_reduce_kernel, {"part_ptr": "*i32", "nparts": "i32", "amax_bits_ptr": "*i32",
                                  "nonfinite_ptr": "*i32"}, {"BLOCK": 1024})
RV = [dict(rtn.DEFAULTS), dict(FAST_DIV=False, FAST_RN=False, SSE_MODE=0, LOAD3D=False),
      dict(rtn.DEFAULTS, SSE_MODE=2)]
for v in RV:
    v.pop("AMAX_MODE", None)
for four_six, var in [(False, RV[0]), (True, RV[0]), (True, RV[1]), (True, RV[2])]:
    attempt(rtn._rtn_kernel, {"x_ptr": "*bf16", "stride_r": "i32", "R": "i32", "C": "i32",
                              "amax_bits_ptr": "*i32", "nonfinite_ptr": "*i32", "packed_ptr": "*u8",
                              "scales_ptr": "*u8", "gout_ptr": "*fp32", "flushed_ptr": "*i32",
                              "SMAX_V": "fp32", "V": "fp32", "INV_V": "fp32"},
            {"FOUR_SIX": four_six, "TIES_AWAY": False, "SCALAR_RECIP": True, "BR": 32, "BC": 128,
             "INTERP": False, **var})
for mode, dt, split, br in ((0, "*bf16", 1, 64), (1, "*bf16", 1, 64), (0, "*fp32", 3, 64), (2, "*u8", 1, 128)):
    base = {"src_ptr": dt, "ssc_ptr": "*u8" if mode == 2 else dt, "stride_s": "i32", "R": "i32"}
    attempt(eden._rht_amax_kernel, {**base, "h_ptr": "*bf16", "INV_SQRT": "fp32", "amax_bits_ptr": "*i32",
                                    "nonfinite_ptr": "*i32", "part_ptr": "*i32"},
            {"SRC": mode, "SPLIT": split, "INTERP": False, "BR": br, "PARTIALS": True, "TILES": 4})
    attempt(eden._eden_kernel, {**base, "C": "i32", "h_ptr": "*bf16", "INV_SQRT": "fp32",
                                "amax_bits_ptr": "*i32", "nonfinite_ptr": "*i32", "packed_ptr": "*u8",
                                "scales_ptr": "*u8", "gout_ptr": "*fp32", "flushed_ptr": "*i32",
                                "clamped_ptr": "*i32", "key": "i32", "row_off": "i32", "col_off": "i32",
                                "SMAX_V": "fp32", "V": "fp32", "INV_V": "fp32"},
            {"SRC": mode, "SPLIT": split, "INTERP": False, "TIES_AWAY": False, "SCALAR_RECIP": True,
             "BR": br, "FAST_DIV": True, "FAST_RN": True, "TILES": 4})
attempt(dequant._dequant_kernel, {"packed_ptr": "*u8", "scales_ptr": "*u8", "out_ptr": "*bf16", "R": "i32",
                                  "C": "i32"}, {"BR": 32, "BC": 256})
attempt(dequant._scale_cast_kernel, {"p_ptr": "*fp32", "out_ptr": "*bf16", "n": "i32", "ga_ptr": "*fp32",
                                     "gb_ptr": "*fp32", "gx_ptr": "*fp32"},
        {"HAS_EXTRA": True, "OUT_BF16": True, "INTERP": False, "BLOCK": 4096}, num_warps=8)
sys.exit(1 if failures else 0)
