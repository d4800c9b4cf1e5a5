"""Static instruction counts of the quantization kernels for sm_90, without a GPU.

    TRITON_INTERPRET=0 python -m tools.sass_stats [--filter NAME] [--dump DIR]

Compiles each kernel variant of tools/aot_check.py, disassembles the cubin with Triton's bundled
nvdisasm and counts SASS instructions by class. Why: these kernels are bound by instruction issue,
not by memory (docs/RESULTS_kernels.md: EDEN's rotate+amax pass alone ran at a quarter of copy
bandwidth), so the instructions each element costs predict what a change buys before device time is
spent on it. The estimate is an issue-rate model (H100 SXM: 132 SMs, 4 schedulers per SM; per-SM
throughput per class below), for the straight-line body of one program, i.e. it ignores memory
latency, occupancy and loop trip counts (kernels with a row-tile loop count one trip). It ranks
variants; only the GPU measures them.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
import triton  # noqa: E402

from tools import aot_check  # noqa: E402

NVDISASM = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
SMS, CLOCK_HZ = 132, 1.755e9          # H100 SXM under load
# warp instructions per SM per cycle by class (Hopper: 128 FP32 lanes, 64 INT32, 64 FP64, 16 MUFU
# and conversions per SM per cycle; 4 schedulers issue at most 4 warp instructions per cycle)
RATE = {"fp32": 4.0, "int": 2.0, "fp64": 2.0, "conv": 0.5, "mufu": 0.5, "mem": 1.0, "shared": 1.0,
        "tensor": 1.0, "other": 4.0}
CLASSES = [
    ("tensor", r"^(HGMMA|HMMA|WARPGROUP)"),
    ("fp64", r"^(DADD|DMUL|DFMA|DSETP|DMNMX)"),
    ("conv", r"^(F2F|F2I|I2F|I2I|F2FP|FRND)"),
    ("mufu", r"^MUFU"),
    ("fp32", r"^(FADD|FMUL|FFMA|FMNMX|FSETP|FSEL|FCHK|FSET|HADD2|HMUL2|HFMA2)"),
    ("shared", r"^(LDS|STS|LDSM|STSM|SHFL|BAR|ATOMS)"),
    ("mem", r"^(LDG|STG|ATOMG|ATOM|RED|LDGSTS|LDC|UBLKCP|UTMA)"),
    ("int", r"^(IMAD|IADD|LOP|SHF|ISETP|SEL|IMNMX|LEA|PRMT|POPC|FLO|BMSK|SGXT|IABS|VIADD|VIMNMX|IDP)"),
]


def classify(op: str) -> str:
    for name, pattern in CLASSES:
        if re.match(pattern, op):
            return name
    return "other"


def sass_counts(kernel) -> collections.Counter:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([NVDISASM, "-c", f.name], check=True, capture_output=True, text=True).stdout
    counts = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m and m.group(2) not in ("NOP",):
            counts[classify(m.group(2))] += 1
            counts["total"] += 1
    return counts


def elements_per_program(fn_name: str, const: dict):
    """Elements one program (one trip of its row-tile loop) handles, None where not element-wise."""
    if fn_name in ("_rtn_kernel", "_qdb_kernel", "_rht16_store_kernel", "_dequant_kernel"):
        return const["BR"] * const["BC"]
    if fn_name in ("_eden_kernel", "_rht_amax_kernel", "_eden16_codes_kernel"):
        return const["BR"] * 128
    if fn_name == "_eden16_scales_kernel":      # one scale per 16 elements
        return const["BR"] * const["NB"] * 16
    if fn_name == "_amax_kernel":
        return const["BLOCK_N"] * const.get("TILES", 1)
    if fn_name == "_dequant_double_block_kernel":
        return const["BR"] * 128
    if fn_name == "_scale_cast_kernel":
        return const["BLOCK"]
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--elements", type=float, default=16384 * 4096, help="tensor size for the time estimate")
    ap.add_argument("--dump", default=None, help="write each variant's SASS here")
    args = ap.parse_args()
    print(f"| kernel | variant | SASS instr | per element (thread instr) | fp32 | int | fp64 | conv | mufu | "
          f"shared | mem | tensor | issue-bound us at {args.elements:.3g} elements |")
    print("|---" * 13 + "|")
    for fn, const, ptrs, num_warps, num_stages in aot_check.VARIANTS:
        if args.filter not in fn.__name__:
            continue
        try:
            k = aot_check.compile_variant(fn, const, ptrs, num_warps, num_stages)
        except Exception as e:  # noqa: BLE001
            print(f"| {fn.__name__} | {const} | compile error: {type(e).__name__} |")
            continue
        c = sass_counts(k)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            tag = "_".join(f"{key}{val}" for key, val in const.items() if key not in ("INTERP",))
            with open(os.path.join(args.dump, f"{fn.__name__}_{tag}.ptx"), "w") as f:
                f.write(k.asm["ptx"])
        elems = elements_per_program(fn.__name__, const)
        per_elem = c["total"] * num_warps * 32 / elems if elems else float("nan")
        # cycles per program on one SM: each class bound by its rate, the sum as the (pessimistic) total
        cycles = sum(c[cls] * num_warps / rate for cls, rate in RATE.items())
        est = cycles * (args.elements / elems) / SMS / CLOCK_HZ * 1e6 if elems else float("nan")
        variant = {key: val for key, val in const.items() if key not in ("INTERP", "SCALAR_RECIP", "TIES_AWAY")}
        print(f"| {fn.__name__} | {variant} | {c['total']} | {per_elem:.1f} | {c['fp32']} | {c['int']} | "
              f"{c['fp64']} | {c['conv']} | {c['mufu']} | {c['shared']} | {c['mem']} | {c['tensor']} | {est:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
