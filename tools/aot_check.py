"""Compile every kernel variant for sm_90 without a GPU (Triton's bundled ptxas): catches
GPU-only compile errors before spending device time. Prints shared memory and which tensor-core
instruction the PTX uses (wgmma: Hopper warpgroup MMA; mma: the older warp-level MMA).

    TRITON_INTERPRET=0 python -m tools.aot_check

Signatures are derived from each kernel's argument names, so a new runtime argument does not need an
edit here: `*_ptr` arguments are pointers (u8 unless named in the call's `ptrs`), the FP32 scalars are
listed in FP32_SCALARS, every other runtime argument is an i32. Only the constexprs are given per call.
"""
import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from megatron_fp4.kernels import dequant, double_block, eden, eden16, gemm, rtn  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FP32_SCALARS = {"SMAX_V", "V", "INV_V", "INV_SQRT"}


def signature(fn, ptrs):
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr") or p.name in ptrs:
            sig[p.name] = ptrs.get(p.name, "*u8")
        elif p.name in FP32_SCALARS:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig




VARIANTS = []   # (fn, constexprs, pointer types, num_warps, num_stages)


def attempt(fn, const, ptrs=None, num_warps=4, num_stages=3):
    VARIANTS.append((fn, const, ptrs or {}, num_warps, num_stages))


def compile_variant(fn, const, ptrs, num_warps=4, num_stages=3):
    # The launcher specializes every pointer aligned to 16 bytes and every integer divisible by 16
    # (Triton's "D" hint), which is what lets it vectorize loads; at the benchmark shapes that is every
    # pointer and integer but the random key, so the AOT build gets the same hints.
    sig = signature(fn, ptrs)
    # constexprs the call leaves out take their defaults, as at a launch
    const = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default and p.name not in const},
             **const}
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name] != "constexpr" and sig[name] != "fp32" and name != "key"}
    src = ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": num_stages,
                                                       "enable_fp_fusion": False})


I32 = {"amax_bits_ptr": "*i32", "nonfinite_ptr": "*i32", "part_ptr": "*i32", "flushed_ptr": "*i32",
       "clamped_ptr": "*i32", "gout_ptr": "*fp32"}

for partials in (True, False):
    attempt(rtn._amax_kernel, {"BLOCK_N": rtn.AMAX_BLOCK, "PARTIALS": partials}, {**I32, "x_ptr": "*bf16"}, 8)
attempt(rtn._amax_reduce_kernel, {"BLOCK": 1024}, I32)
base = {k: v for k, v in rtn.DEFAULTS.items() if k != "AMAX_MODE"}
for sr, four_six, var in [(False, False, base), (False, False, dict(base, FAST_RN=1)),
                          (False, True, dict(base, FAST_RN=1, LOAD3D=False)), (True, False, base),
                          (False, True, dict(FAST_DIV=False, FAST_RN=0, SSE_MODE=0, LOAD3D=False)),
                          (False, True, dict(base, FAST_RN=2, LOAD3D=False))]:
    attempt(rtn._rtn_kernel, {"SR": sr, "FOUR_SIX": four_six, "TIES_AWAY": False, "SCALAR_RECIP": False,
                              "BR": 32, "BC": 128, "INTERP": False, **var}, {**I32, "x_ptr": "*bf16"})
attempt(rtn._rtn_kernel, {"SR": False, "FOUR_SIX": False, "TIES_AWAY": False, "SCALAR_RECIP": False, "BR": 32,
                          "BC": 128, "INTERP": False, "TILE16": True, **base}, {**I32, "x_ptr": "*bf16"})
for tiles in (1, 4):      # the amax pass with several tiles per program (AMAX_TILES)
    attempt(rtn._amax_kernel, {"BLOCK_N": 4096, "PARTIALS": False, "TILES": tiles}, {**I32, "x_ptr": "*bf16"}, 8)
attempt(rtn._rtn_kernel, {"SR": False, "FOUR_SIX": True, "TIES_AWAY": False, "SCALAR_RECIP": False, "BR": 16,   # nvidia-46 W
                          "BC": 128, "INTERP": False, "TILE16": True, **dict(base, FAST_RN=1, LOAD3D=False)},
        {**I32, "x_ptr": "*bf16"})
for sr, four_six in ((True, False), (False, False), (False, True)):   # operands that also write their GEMM operand
    attempt(rtn._rtn_kernel, {"SR": sr, "FOUR_SIX": four_six, "TIES_AWAY": False, "SCALAR_RECIP": False, "BR": 32,
                              "BC": 128, "INTERP": False, "EMIT": True,
                              **(dict(base, FAST_RN=1, LOAD3D=False) if four_six else base)},
            {**I32, "x_ptr": "*bf16", "operand_ptr": "*bf16"})

evar = {k: v for k, v in eden.DEFAULTS.items() if k in ("FAST_DIV", "FAST_RN", "TREE")}
for mode, dt, split, br in ((0, "*bf16", 1, 64), (1, "*bf16", 1, 64), (0, "*fp32", 3, 64), (2, "*u8", 1, 64)):
    ptrs = {**I32, "src_ptr": dt, "ssc_ptr": "*u8" if mode == 2 else dt, "h_ptr": "*bf16", "bamax_ptr": "*fp32",
            "operand_ptr": "*bf16"}
    for bamax in (False, True):
        attempt(eden._rht_amax_kernel, {"SRC": mode, "SPLIT": split, "INTERP": False, "BR": br, "PARTIALS": True,
                                        "TILES": eden.DEFAULTS["TILES"], "BAMAX": bamax}, ptrs)
        for emit in (False, True):
            attempt(eden._eden_kernel, {"SRC": mode, "SPLIT": split, "INTERP": False, "TIES_AWAY": False,
                                        "SCALAR_RECIP": False, "BR": br, "TILES": eden.DEFAULTS["TILES"],
                                        "EMIT": emit, "BAMAX": bamax, **evar}, ptrs)

for mode, dt, split in ((0, "*bf16", 1), (1, "*bf16", 1), (0, "*fp32", 3), (2, "*u8", 1)):   # per-16 MS-EDEN
    attempt(eden16._eden16_codes_kernel, {"SRC": mode, "SPLIT": split, "INTERP": False, "BR": 64, "TILES": 4,
                                          "TIES_AWAY": False},
            {**I32, "src_ptr": dt, "ssc_ptr": "*u8" if mode == 2 else dt, "h_ptr": "*bf16", "rmax_bits_ptr": "*i32",
             "r_ptr": "*fp32"})
attempt(eden16._eden16_scales_kernel, {"BR": 64, "NB": 64, "NSTATE": 0, "NROLE": 0},
        {**I32, "r_ptr": "*fp32", "rmax_bits_ptr": "*i32", "state_ptr": "*i64"})

for trans, rot, split, sr, dt in ((False, False, 1, False, "*bf16"), (False, False, 1, True, "*bf16"),
                                  (False, True, 1, True, "*bf16"), (True, True, 1, True, "*bf16"),
                                  (True, True, 3, True, "*fp32")):
    attempt(double_block._qdb_kernel, {"TRANS": trans, "ROT": rot, "SPLIT": split, "SR": sr, "TIES_AWAY": False,
                                       "INTERP": False, "BR": 32, "BC": 128},
            {**I32, "src_ptr": dt, "h_ptr": "*bf16", "outer_ptr": "*fp32"})
for emit in (False, True):
    attempt(double_block._qdb_kernel, {"TRANS": True, "ROT": True, "SPLIT": 3, "SR": True, "TIES_AWAY": False,
                                       "INTERP": False, "BR": 64, "BC": 128, "PACKED": True, "EMIT": emit},
            {**I32, "src_ptr": "*u8", "h_ptr": "*bf16", "outer_ptr": "*fp32", "src_sc_ptr": "*u8",
             "src_so_ptr": "*fp32", "operand_ptr": "*bf16"})
for rot, sr in ((False, False), (True, True)):
    attempt(double_block._qdb_kernel, {"TRANS": False, "ROT": rot, "SPLIT": 1, "SR": sr, "TIES_AWAY": False,
                                       "INTERP": False, "BR": 32, "BC": 128, "EMIT": True},
            {**I32, "src_ptr": "*bf16", "h_ptr": "*bf16", "outer_ptr": "*fp32", "operand_ptr": "*bf16"})
attempt(double_block._rht16_store_kernel, {"TRANS": True, "SPLIT": 1, "INTERP": False, "BR": 32, "BC": 128},
        {"src_ptr": "*bf16", "h_ptr": "*bf16", "z_ptr": "*fp32"})

for block_rows in (1, 16):
    attempt(dequant._dequant_kernel, {"BLOCK_ROWS": block_rows, "BR": 32, "BC": 256}, {"out_ptr": "*bf16"})
attempt(dequant._transpose_codes_kernel, {"BR": 64, "BC": 64}, {"src_ptr": "*u8", "dst_ptr": "*u8"})
for out_bf16 in (False, True):
    attempt(dequant._dequant_double_block_kernel, {"OUT_BF16": out_bf16, "INTERP": False, "BR": 32},
            {"outer_ptr": "*fp32", "out_ptr": "*bf16" if out_bf16 else "*fp32"})
attempt(dequant._scale_cast_kernel, {"HAS_EXTRA": True, "OUT_BF16": True, "INTERP": False, "BLOCK": 4096},
        {"p_ptr": "*fp32", "out_ptr": "*bf16", "ga_ptr": "*fp32", "gb_ptr": "*fp32", "gx_ptr": "*fp32"}, 8)

GEMM_PTRS = {"a_packed": "*u8", "a_scales": "*u8", "a_outer": "*fp32", "b_packed": "*u8", "b_scales": "*u8",
             "b_outer": "*fp32", "ga_ptr": "*fp32", "gb_ptr": "*fp32", "gx_ptr": "*fp32"}
for name, (bm, bn, bk, group_m, warps, stages) in gemm.CONFIGS.items():
    for double, b_rows, out_bf16 in ((False, 1, True), (False, 16, False), (True, 1, False)):
        attempt(gemm._nvfp4_gemm_kernel,
                {"DOUBLE_BLOCK": double, "A_BLOCK_ROWS": 1, "B_BLOCK_ROWS": b_rows, "HAS_EXTRA": True,
                 "OUT_BF16": out_bf16, "INTERP": False, "BM": bm, "BN": bn, "BK": 128 if double else bk,
                 "GROUP_M": group_m},
                {**GEMM_PTRS, "c_ptr": "*bf16" if out_bf16 else "*fp32"}, warps, stages)


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    failures = 0
    for fn, const, ptrs, num_warps, num_stages in VARIANTS:
        try:   # report and go on: one broken variant must not hide the others
            k = compile_variant(fn, const, ptrs, num_warps, num_stages)
            ptx = k.asm["ptx"]
            mma = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "-")
            print(f"ok  {fn.__name__:28s} shared={k.metadata.shared:6d} tensor-core={mma:5s} {const}", flush=True)
        except Exception as e:  # noqa: BLE001
            failures += 1
            print(f"ERR {fn.__name__} {const}: {type(e).__name__}: {str(e)[:2000]}", flush=True)
    print(f"{failures} failures", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(1 if main() else 0)
