"""Print the numerics sanity figures (numerics.md §8) beside their published values, as markdown.

    python -m benchmarks.sanity_figures            # CPU, ~1 minute, from the repo root

The same figures are asserted (within 5%) by tests/test_sanity_targets.py and
tests/test_unbiasedness.py; this script only reports them, computed by those tests' own helpers
(loaded from their files, so the figures and the assertions cannot drift apart).
"""
import argparse
import importlib.util
import math
import pathlib
import time

import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.rng import RandomStream, random_signs

TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"


def _test_module(name):
    """A test module of tests/ by its path (tests/ is no package and not on sys.path)."""
    spec = importlib.util.spec_from_file_location(f"_sanity_{name}", TESTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args(argv)
    targets, unbiasedness = _test_module("test_sanity_targets"), _test_module("test_unbiasedness")
    rel_mse, rotated_stats = targets.rel_mse, targets.rotated_stats
    b_values, recipe_gradients = unbiasedness.B_VALUES, unbiasedness.recipe_gradients
    start = time.time()
    x = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(2026))
    rows = [("1x16 RTN (v 6, Smax 448)", 9.0e-3, Q.quantize_nvfp4(x)),
            ("1x16 RTN + 4/6 (Smax 256)", 7.6e-3, Q.quantize_nvfp4(x, smax=256.0, four_over_six=True)),
            ("16x16 RTN", 12.4e-3, Q.quantize_nvfp4(x, block_rows=16)),
            ("16x16 RTN + 4/6", 12.4e-3, Q.quantize_nvfp4(x, block_rows=16, smax=256.0, four_over_six=True)),
            ("TetraJet-v2 QDB RN (computed)", 9.0e-3, Q.quantize_double_block(x)),
            ("TetraJet-v2 QDB SR, no headroom (computed)", 1.87e-2,
             Q.quantize_double_block(x, mode="sr", stream=RandomStream(11))),
            ("1x16 SR, v = 6 (computed)", 1.88e-2, Q.quantize_nvfp4(x, mode="sr", stream=RandomStream(5))),
            ("1x16 SR, v = 6*16/17 (computed)", 2.36e-2,
             Q.quantize_nvfp4(x, mode="sr", v=6 * 16 / 17, stream=RandomStream(5)))]
    print("### A. Forward quantizers on N(0,1), 2048x2048\n")
    print("| quantizer | relMSE measured | spec | ratio |\n|---|---|---|---|")
    for name, spec, q in rows:
        m = rel_mse(x, q.dequantize())
        print(f"| {name} | {m:.4e} | {spec:.3e} | {m / spec:.3f} |")

    n = 2 ** 15
    xr = torch.randn(n, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    xr = (xr * torch.exp2(8 * torch.arange(n, dtype=torch.float64) / (n - 1))[:, None]).float()
    sigma = random_signs(1234, 128)
    stream = RandomStream(99)
    print("\n### B. Rotated test (RHT-128, rows scaled 2^(8r/(R-1)), R = 2^15)\n")
    print("| mode | relMSE | spec | bits | misalignment | spec misalignment |\n|---|---|---|---|---|---|")
    for name, spec, spec_mis, fn in [
        ("RTN", 9.0e-3, "0.0079", lambda z: Q.quantize_nvfp4(z, v=Q.EDEN_V, smax=255.99)),
        ("SR (v = 6*16/17)", 23.5e-3, "~0", lambda z: Q.quantize_nvfp4(z, mode="sr", v=6 * 16 / 17, stream=stream)),
        ("MS-EDEN per-128", 9.8e-3, "0.00056 (< 1e-3)", lambda z: Q.quantize_ms_eden(z, stream=stream)),
        ("MS-EDEN per-16 (computed)", 9.4e-3, "~0", lambda z: Q.quantize_ms_eden(z, stream=stream, eden_group=16)),
    ]:
        err, mis = rotated_stats(xr, sigma, fn)
        print(f"| {name} | {err:.4e} | {spec:.3e} | {-math.log2(err) / 2:.3f} | {mis:.2e} | {spec_mis} |")

    print("\n### C. Averaging test, bits of the mean of B backward estimates (E 512x512, W 512x256)\n")
    print("| recipe | GEMM | " + " | ".join(f"B={b}" for b in b_values) + " | bits per 4x B | published |")
    print("|---|---|" + "---|" * (len(b_values) + 2))
    published = {("quartet2", "dgrad"): (2.85, 3.84, 4.84, 5.84), ("quartet2", "wgrad"): (2.83, 3.85, 4.83, 5.80)}
    layer = tuple(torch.randn(*s, generator=g) for g in [torch.Generator().manual_seed(42)]
                  for s in ((512, 256), (512, 256), (512, 512)))
    for name in ("quartet2", "tetrajet2", "nvidia"):
        dgrad, wgrad = recipe_gradients(name, layer)
        for which, series in (("dgrad", dgrad), ("wgrad", wgrad)):
            slope = (series[-1] - series[0]) / (len(series) - 1)
            cells = " | ".join(f"{v:.2f}" for v in series)
            ref = published.get((name, which))
            print(f"| {name} | {which} | {cells} | {slope:.3f} | {', '.join(map(str, ref)) if ref else '-'} |")
    print(f"\n({time.time() - start:.0f} s on CPU)")


if __name__ == "__main__":
    main()
