"""The start table (issue #19 item 1): what runs where, per linear and GEMM.

- Recipe.operand_table() against numerics.md §6 by enumeration: for every built-in recipe and for knob
  overrides, each (GEMM, operand) has the spec's format, block direction, quantizer, rotation and
  rounding (the expectations below are transcribed from the spec's tables, not from the code).
- The backend column (precision.kernel_coverage, which runs nothing) against the real dispatch: under
  kernels="interpret" every call that wants a kernel goes through kernels/dispatch.py on CPU tensors,
  and the calls it sends to the torch twin are logged with their site and reason; the query must name
  exactly those sites with the same reasons.
- The table of a GPT built by the CPU driver: every linear present, BF16 exactly where the flags put
  it, gathered over pipeline stages onto global rank 0, and written as strict JSON.
"""
import json
import os
import subprocess
import sys

import precision_workers
import pytest

from megatron_fp4.megatron import precision
from megatron_fp4.registry import available_recipes, load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.timeout(300)


def _spec(recipe):
    """numerics.md §6 as {(gemm, operand): (format, along, quantizer words, rotation, rounding)}."""
    fam = recipe.family
    if fam == "bf16":
        return {(g, o): ("BF16", "-", "none", "none", "-") for g, o in
                [("fprop", "X"), ("fprop", "W"), ("dgrad", "E"), ("dgrad", "W^T"), ("wgrad", "E^T"), ("wgrad", "X^T")]}
    signs = "fixed" if recipe.rht_signs == "fixed" else "fresh"
    rht = f"RHT-{recipe.rht_size}"
    if fam == "quartet2":       # §6.1
        fwd = "RTN + 4/6" if recipe.four_over_six else "RTN"
        eden = f"MS-EDEN (correction per {recipe.eden_group})"
        table = {("fprop", "X"): ("NVFP4", "K", fwd, "none", "RN"), ("fprop", "W"): ("NVFP4", "K", fwd, "none", "RN"),
                 ("dgrad", "E"): ("NVFP4", "N", eden, rht, "unbiased"), ("dgrad", "W^T"): ("NVFP4", "N", eden, rht, "unbiased"),
                 ("wgrad", "E^T"): ("NVFP4", "T", eden, rht, "unbiased"), ("wgrad", "X^T"): ("NVFP4", "T", eden, rht, "unbiased")}
    elif fam == "tetrajet2":    # §6.2 Q1..Q6
        table = {("fprop", "X"): ("NVFP4", "K", "QDB RTN", "none", "RN"), ("fprop", "W"): ("NVFP4", "K", "QDB RTN", "none", "RN"),
                 ("dgrad", "E"): ("NVFP4", "N", "QDB SR", rht, "SR"), ("dgrad", "W^T"): ("NVFP4", "N", "QDB SR", rht, "SR"),
                 ("wgrad", "E^T"): ("NVFP4", "T", "QDB SR", rht, "SR"), ("wgrad", "X^T"): ("NVFP4", "T", "QDB SR", rht, "SR")}
    else:                       # §6.3
        fwd = "RTN + 4/6" if recipe.four_over_six else "RTN"
        table = {("fprop", "X"): ("NVFP4", "K", fwd, "none", "RN"), ("fprop", "W"): ("NVFP4", "K", fwd, "none", "RN"),
                 ("dgrad", "E"): ("NVFP4", "N", "SR", "none", "SR"),
                 ("dgrad", "W^T"): ("NVFP4", "N", "reused from forward", "none", "the forward's"),
                 ("wgrad", "E^T"): ("NVFP4", "T", "SR", rht, "SR"), ("wgrad", "X^T"): ("NVFP4", "T", "RTN", rht, "RN")}
    if fam in ("quartet2", "tetrajet2") and recipe.outcontrol:   # §6.2 OutControl split
        for key in (("fprop", "X[:, outliers]"), ("fprop", "W[:, outliers]")):
            table[key] = ("MXFP8", "K", "RTN", "none", "RN")
        for key in (("wgrad", "E^T (outlier columns of dW)"), ("wgrad", "X[:, outliers]^T")):
            table[key] = ("MXFP8", "T", "RTN", "none", "RN")
    return table, signs


CASES = [(name, {}) for name in available_recipes()] + [
    ("quartet2", {"four_over_six": False}), ("quartet2", {"rht_size": 32, "rht_signs": "fixed", "eden_group": 16}),
    ("nvidia", {"rht_signs": "fresh", "rht_size": 128, "four_over_six": True}),
    ("tetrajet2", {"outer_block": "tensor", "sr_headroom": 17 / 16})]


@pytest.mark.parametrize("name, overrides", CASES, ids=[f"{n}-{'-'.join(o) or 'builtin'}" for n, o in CASES])
def test_operand_table_follows_the_spec_gemm_table(name, overrides):
    recipe = load_recipe(name, overrides=overrides)
    table = recipe.operand_table()
    spec = _spec(recipe)
    spec, signs = spec if isinstance(spec, tuple) else (spec, None)
    assert {(r["gemm"], r["operand"]) for r in table} == set(spec)
    assert [r["gemm"] for r in table] == sorted((r["gemm"] for r in table), key=["fprop", "dgrad", "wgrad"].index)
    for row in table:
        fmt, along, quantizer, rotation, rounding = spec[(row["gemm"], row["operand"])]
        assert (row["format"], row["along"], row["quantizer"]) == (fmt, along, quantizer), row
        assert row["rotation"].split(",")[0] == rotation, row
        assert row["rounding"].startswith(rounding), row
        if rotation != "none":
            assert signs in row["rotation"], row
        if fmt == "NVFP4":
            assert row["sites"], row        # each quantized operand names the dispatch calls that make it
        if row["rounding"].startswith("SR (headroom"):
            assert row["rounding"] == f"SR (headroom {recipe.sr_headroom:g})"
        if recipe.family == "quartet2" and row["gemm"] == "fprop" and fmt == "NVFP4":
            assert f"Smax {256 if recipe.four_over_six else 448}" in row["block"]
        if recipe.family == "tetrajet2":
            assert row["format"] == "MXFP8" or ("1x128" in row["block"]) == (recipe.outer_block == 128)
    by = {(r["gemm"], r["operand"]): r for r in table}
    if recipe.family == "nvidia":
        assert "16x16 tiles" in by["fprop", "W"]["block"] and "no re-quantization" in by["dgrad", "W^T"]["source"]
        assert "original X" in by["wgrad", "X^T"]["source"]
    if recipe.family in ("quartet2", "tetrajet2"):   # W^T and X^T come from the forward operands
        assert "forward W_hat" in by["dgrad", "W^T"]["source"] and "forward X_hat" in by["wgrad", "X^T"]["source"]


_AGREEMENT = r"""
import json, logging, re, sys, torch
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("megatron_fp4.backend").addHandler(Keep())
from megatron_fp4 import backend, outcontrol as oc
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.megatron.precision import kernel_coverage
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
out = []
for name, overrides, k, n, tokens in json.loads(sys.argv[1]):
    recipe = load_recipe(name, overrides=overrides)
    g = torch.Generator().manual_seed(3)
    splits = [None]
    if recipe.outcontrol:
        mask = torch.zeros(k, dtype=torch.bool)
        mask[::9] = True
        splits.append(oc.ChannelSplit.from_mask(mask))
    backend.reset_fallback_log()
    records.clear()
    for split in splits:
        x = torch.randn(tokens, k, generator=g).requires_grad_()
        w = (torch.randn(n, k, generator=g) * 0.05).requires_grad_()
        nvfp4_linear(x, w, None, recipe, QuantContext(key=5, seed=recipe.seed), split=split).sum().backward()
    seen = {}
    for message in records:
        m = re.match(r"megatron_fp4: recipe '[^']*', (.*?): no kernel covers this call \((.*)\); it runs", message)
        seen[m.group(1)] = m.group(2)
    sites = {s for row in recipe.operand_table() for s in row["sites"]} | {f"{g} GEMM" for g in ("fprop", "dgrad", "wgrad")}
    predicted = {}
    for site in sorted(sites):
        ok, why = kernel_coverage(recipe, site, k=k, n=n, tokens=tokens, device="cpu")
        if not ok:
            predicted[site] = why
    out.append({"case": [name, overrides, k, n, tokens], "seen": seen, "predicted": predicted})
print("OUT=" + json.dumps(out))
"""

AGREEMENT_CASES = (
    [[name, {}, 128, 128, 96] for name in available_recipes() if name != "bf16"]
    + [["nvidia", {}, 48, 32, 128], ["quartet2", {}, 48, 128, 128], ["nvidia", {"rht_size": 32}, 128, 128, 128],
       ["quartet2", {"rht_size": 16}, 128, 128, 128], ["tetrajet2", {"outer_block": "tensor"}, 128, 128, 96],
       ["tetrajet2", {"rht_size": 32, "gemm_emulation": "fp32"}, 128, 128, 96]])


# the default run keeps one case per kind of decision (a T-dependent rotation, a knob without a kernel,
# a covered recipe end to end, a GEMM mode); the slow run checks every built-in recipe and override
FAST_AGREEMENT = [["nvidia", {}, 128, 128, 96], ["nvidia", {}, 48, 32, 128], ["quartet2-kernel", {}, 128, 128, 96],
                  ["tetrajet2", {"rht_size": 32, "gemm_emulation": "fp32"}, 128, 128, 96]]


def _agreement(cases):
    env = dict(os.environ, TRITON_INTERPRET="1", MEGATRON_FP4_KERNELS="interpret")
    env.pop("MEGATRON_FP4_ON_FALLBACK", None)
    proc = subprocess.run([sys.executable, "-c", _AGREEMENT, json.dumps(cases)], env=env, capture_output=True,
                          text=True, cwd=ROOT, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads([line for line in proc.stdout.splitlines() if line.startswith("OUT=")][-1][4:])
    assert len(results) == len(cases)
    for result in results:
        assert result["seen"] == result["predicted"], result["case"]
    return results


def test_kernel_coverage_names_the_calls_the_dispatch_sends_to_the_twin():
    results = _agreement(FAST_AGREEMENT)
    assert any(r["seen"] for r in results) and not all(r["seen"] for r in results)   # both outcomes occur


@pytest.mark.slow
def test_kernel_coverage_agrees_with_the_dispatch_for_every_recipe():
    _agreement(AGREEMENT_CASES)


def test_kernel_coverage_on_cpu_and_under_reference():
    from megatron_fp4.backend import BackendConfig
    recipe = load_recipe("quartet2")
    assert precision.kernel_coverage(recipe, "dgrad E", k=128, n=128, tokens=128, device="cpu",
                                     backend=BackendConfig()) == (False, "torch twin (CPU)")
    assert precision.kernel_coverage(recipe, "dgrad E", k=128, n=128, tokens=128, device="cuda",
                                     backend=BackendConfig(kernels="reference")) == \
        (False, "torch twin (kernels='reference', MEGATRON_FP4_KERNELS=0)")
    # a CUDA device under "auto" wants the kernel: covered, or the dispatch's reason
    assert precision.kernel_coverage(recipe, "dgrad E", k=128, n=128, tokens=128, device="cuda",
                                     backend=BackendConfig()) == (True, "")
    assert precision.kernel_coverage(load_recipe("quartet2-kernel"), "dgrad E", k=128, n=128, tokens=128,
                                     device="cuda", backend=BackendConfig()) == (True, "")
    assert precision.kernel_coverage(load_recipe("quartet2", {"rht_size": 16}), "dgrad E", k=128, n=128,
                                     tokens=128, device="cuda", backend=BackendConfig()) == \
        (False, "RHT size 16 (the MS-EDEN kernels rotate by 128)")


def _names(num_layers):
    return [f"decoder.layers.{i}.{rel}" for i in range(num_layers) for rel in
            ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]


def test_table_of_a_pipelined_gpt_with_bf16_layers(tmp_path):
    """PP=2 (each stage holds 2 of 4 layers): rank 0 prints and writes all 16 linears x 3 GEMMs;
    Megatron's first/last-layer flag and --nvfp4-bf16-modules put exactly their linears in BF16."""
    from megatron_fp4.testing import dist
    kwargs = dict(num_layers=4, hidden_size=128, num_attention_heads=4, seq_length=64, pp=2, recipe="tetrajet2",
                  first_last_layers_bf16=True, bf16_modules=("decoder.layers.1.mlp.linear_fc2",))
    results = dist.run(precision_workers.precision_rows, 2, kwargs, str(tmp_path), timeout=240)
    rows = results[0]["rows"]
    assert {r["linear"] for r in results[0]["local"]} == set(_names(4)[:8])      # stage 0 holds layers 0, 1
    assert [r["linear"] for r in rows[::3]] == sorted(_names(4), key=lambda n: (int(n.split(".")[2]), n))
    assert [r["gemm"] for r in rows] == ["fprop", "dgrad", "wgrad"] * 16
    expected_bf16 = {n: "--first-last-layers-bf16" for n in _names(4) if n.split(".")[2] in ("0", "3")}
    expected_bf16["decoder.layers.1.mlp.linear_fc2"] = "--nvfp4-bf16-modules 'decoder.layers.1.mlp.linear_fc2'"
    for row in rows:
        assert row["bf16_reason"] == expected_bf16.get(row["linear"]), row["linear"]
        assert row["format"] == ("BF16" if row["linear"] in expected_bf16 else "NVFP4")
        assert all(op["backend"] == ("BF16 GEMM (torch)" if row["bf16_reason"] else "torch twin (CPU)")
                   for op in row["operands"])
        assert row["recipe"] == "tetrajet2" and row["device"] == "cpu" and row["tokens"] == 128
    assert results[1]["printed"] == []                                            # rank 1 stays quiet
    text = "\n".join(results[0]["printed"])
    assert text.startswith("megatron_fp4 precision: recipe tetrajet2; device cpu")
    assert "mlp.linear_fc2" in text and "layers 1-2" in text and "(--first-last-layers-bf16)" in text
    with open(tmp_path / "precision.json") as fh:
        data = json.load(fh)
    assert data == {"schema": precision.SCHEMA, "rows": rows}
    assert precision.load_precision_table(str(tmp_path / "precision.json")) == rows
    assert precision.format_precision_table(rows) == text.split("\nmegatron_fp4 precision table written")[0]


def test_table_lines_group_alike_layers_and_name_the_recipe_knobs():
    from megatron_fp4.testing import dist
    kwargs = dict(num_layers=3, hidden_size=128, num_attention_heads=4, seq_length=64, recipe="nvidia-46",
                  bf16_modules=("decoder.layers.0.*",))
    rows = dist.run(precision_workers.precision_rows, 1, kwargs, None, timeout=240)[0]["rows"]
    assert len(rows) == 3 * 12
    lines = precision.format_precision_table(rows).splitlines()
    qkv = [line for line in lines if "linear_qkv" in line]
    assert len(qkv) == 4        # layer 0 in BF16 (one line), layers 1-2 alike: one line per GEMM
    assert "layers 0 " in qkv[0] and "all   BF16" in qkv[0] and "'decoder.layers.0.*'" in qkv[0]
    fprop, dgrad, wgrad = qkv[1:]
    assert "layers 1-2" in fprop and "X 1x16 RTN + 4/6" in fprop and "W 16x16-tiles RTN + 4/6" in fprop
    assert "E 1x16 SR/1.0625" in dgrad and "reused from forward" in dgrad
    assert "RHT-16-fixed" in wgrad and fprop.endswith("[torch twin (CPU)]")


def test_bad_precision_file_is_named(tmp_path):
    path = tmp_path / "precision.json"
    path.write_text("{}")
    with pytest.raises(precision.PrecisionTableError, match="not a megatron_fp4 precision table"):
        precision.load_precision_table(str(path))

