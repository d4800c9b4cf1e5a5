"""The backend config (megatron_fp4/backend.py): parsed from the environment once, set explicitly,
changed for a block, carried by each layer call, never read from the environment on a hot path; and
the kernel-to-twin fallback, logged once per (recipe, operand) or raised.

The fallback of a real dispatch call needs a call that wants a kernel: a CUDA tensor, which this
machine has not, or kernels="interpret", which runs the same decision on CPU tensors in Triton's
interpreter; those cases run in a subprocess (TRITON_INTERPRET=1 must be set before the kernels are
imported)."""
import logging
import os
import subprocess
import sys

import pytest
import torch

from megatron_fp4 import backend
from megatron_fp4.backend import BackendConfig, BackendError, KernelFallbackError
from cpu_blas import core_types, env_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("env, expected", [
    ({}, BackendConfig("auto", "cublas", True, "warn")),
    ({"MEGATRON_FP4_KERNELS": "0"}, BackendConfig(kernels="reference")),
    ({"MEGATRON_FP4_KERNELS": "1"}, BackendConfig(kernels="auto")),
    ({"MEGATRON_FP4_KERNELS": "reference"}, BackendConfig(kernels="reference")),
    ({"MEGATRON_FP4_KERNELS": "interpret"}, BackendConfig(kernels="interpret")),
    ({"MEGATRON_FP4_GEMM": "triton"}, BackendConfig(gemm="triton")),
    ({"MEGATRON_FP4_EMIT_OPERANDS": "0"}, BackendConfig(emit_operands=False)),
    ({"MEGATRON_FP4_EMIT_OPERANDS": "true"}, BackendConfig(emit_operands=True)),
    ({"MEGATRON_FP4_ON_FALLBACK": "error"}, BackendConfig(on_fallback="error")),
    ({"MEGATRON_FP4_KERNELS": "", "MEGATRON_FP4_GEMM": ""}, BackendConfig()),   # empty: unset
])
def test_environment_spellings(env, expected):
    assert BackendConfig.from_env(env) == expected


@pytest.mark.parametrize("var, value", [("MEGATRON_FP4_KERNELS", "yes"), ("MEGATRON_FP4_GEMM", "fastest"),
                                        ("MEGATRON_FP4_EMIT_OPERANDS", "2"), ("MEGATRON_FP4_ON_FALLBACK", "ignore")])
def test_bad_environment_values_name_the_variable_and_the_choices(var, value):
    with pytest.raises(BackendError, match=f"{var}='{value}' is not valid: use one of"):
        BackendConfig.from_env({var: value})


def test_bad_knobs_name_the_knob():
    with pytest.raises(BackendError, match="'kernels' must be one of"):
        BackendConfig(kernels="gpu")
    with pytest.raises(BackendError, match="'emit_operands' must be true or false"):
        BackendConfig(emit_operands="no")
    with pytest.raises(BackendError, match=r"unknown backend knob\(s\) \['kernel'\]"):
        BackendConfig().replace(kernel="reference")


def test_use_and_reference_only_change_the_config_for_a_block_without_touching_the_environment():
    before, env_before = backend.current(), dict(os.environ)
    with backend.reference_only() as cfg:
        assert backend.current() is cfg and cfg == before.replace(kernels="reference")
        with backend.use(gemm="triton", on_fallback="error"):
            assert backend.current() == before.replace(kernels="reference", gemm="triton", on_fallback="error")
        assert backend.current() is cfg
        assert dict(os.environ) == env_before
    assert backend.current() is before
    with backend.use(BackendConfig(emit_operands=False)):
        assert backend.current() == BackendConfig(emit_operands=False)
    assert backend.current() is before


def test_configure_sets_the_process_config():
    with backend.use():      # restores the config afterwards
        cfg = backend.configure(kernels="reference", gemm="triton")
        assert backend.current() is cfg
        assert cfg == BackendConfig.from_env().replace(kernels="reference", gemm="triton")
        assert backend.configure(BackendConfig(on_fallback="error")) == backend.current() == BackendConfig(on_fallback="error")


_READ_ONCE = """
import os
from megatron_fp4 import backend
first = backend.current()
os.environ["MEGATRON_FP4_KERNELS"] = "interpret"
os.environ["MEGATRON_FP4_GEMM"] = "cublas"
print(first.kernels, first.gemm, backend.current().kernels, backend.current().gemm, backend.current() is first)
"""


def test_the_environment_is_read_once_at_first_use():
    env = dict(os.environ, MEGATRON_FP4_KERNELS="0", MEGATRON_FP4_GEMM="triton")
    out = subprocess.run([sys.executable, "-c", _READ_ONCE], env=env, capture_output=True, text=True, check=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.split() == ["reference", "triton", "reference", "triton", "True"]


class _WatchedEnviron(dict):
    """os.environ stand-in that records every MEGATRON_FP4_* key looked up."""

    def __init__(self, base):
        super().__init__(base)
        self.reads = []

    def _note(self, key):
        if str(key).startswith("MEGATRON_FP4_"):
            self.reads.append(key)

    def get(self, key, default=None):
        self._note(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._note(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self._note(key)
        return super().__contains__(key)


@pytest.mark.parametrize("name", ["nvidia", "tetrajet2", "quartet2"])
def test_a_linear_call_reads_no_backend_environment_variable(name, monkeypatch):
    """The hot path (forward + backward of a quantized linear, every dispatch entry of the recipe)
    takes the config from the call, not from os.environ (the dispatch used to read it per call)."""
    from megatron_fp4.linear import NVFP4Linear
    backend.current()                               # the one read, at the first use
    layer = NVFP4Linear(128, 128, recipe=name)
    watched = _WatchedEnviron(os.environ)
    monkeypatch.setattr(os, "environ", watched)
    x = torch.randn(128, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    assert watched.reads == []


def test_a_layer_call_carries_the_config_into_backward():
    """The config the call started with is saved with it (QuantContext.backend), so its backward runs on
    the same backend even if the process's config changes in between."""
    from megatron_fp4.linear import NVFP4Linear
    layer = NVFP4Linear(128, 128, recipe="quartet2")
    with backend.use(kernels="reference", on_fallback="error") as cfg:
        y = layer(torch.randn(128, 128, requires_grad=True))
    node = y.grad_fn
    while type(node).__name__ != "NVFP4LinearFunctionBackward":
        node = node.next_functions[0][0]
    assert node.call.qctx.backend is cfg
    assert backend.current() is not cfg


@pytest.mark.parametrize("mode, on_gpu, wants", [("auto", True, True), ("auto", False, False),
                                                 ("reference", True, False), ("reference", False, False)])
def test_which_calls_want_a_kernel(mode, on_gpu, wants):
    assert backend.wants_kernel(BackendConfig(kernels=mode), on_accelerator=on_gpu) is wants


def test_a_fallback_warns_once_per_recipe_and_operand(caplog):
    backend.reset_fallback_log()
    cfg = BackendConfig()
    with caplog.at_level(logging.WARNING, logger="megatron_fp4.backend"):
        backend.fallback(cfg, ("quartet2-kernel", "dgrad E"), "eden_group=16 (the MS-EDEN kernels correct per 128)")
        backend.fallback(cfg, ("quartet2-kernel", "dgrad E"), "eden_group=16 (the MS-EDEN kernels correct per 128)")
        backend.fallback(cfg, ("quartet2-kernel", "wgrad E^T"), "another reason")
        backend.fallback(cfg, ("nvidia", "wgrad E^T"), "another reason")
    messages = [r.getMessage() for r in caplog.records if r.name == "megatron_fp4.backend"]
    assert len(messages) == 3
    assert "recipe 'quartet2-kernel', dgrad E: no kernel covers this call (eden_group=16 (the MS-EDEN kernels " \
           "correct per 128)); it runs the torch twin on the GPU" in messages[0]
    assert "MEGATRON_FP4_ON_FALLBACK=error" in messages[0]
    backend.reset_fallback_log()


def test_a_fallback_under_on_fallback_error_raises_with_the_reason_and_the_fix():
    with pytest.raises(KernelFallbackError, match=r"recipe 'quartet2-kernel', dgrad E: no kernel covers this call "
                                                  r"\(eden_group=16.*kernels='reference'"):
        backend.fallback(BackendConfig(on_fallback="error"), ("quartet2-kernel", "dgrad E"),
                         "eden_group=16 (the MS-EDEN kernel corrects per 128)")


_INTERPRETED = r"""
import json, logging, sys, torch
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger("megatron_fp4.backend").addHandler(Keep())
from megatron_fp4 import backend, quantizers as Q
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.linear import nvfp4_linear
from megatron_fp4.recipe import QuantContext
from megatron_fp4.registry import load_recipe
from megatron_fp4.rng import RandomStream, random_signs
out = {"config": backend.current().kernels}
recipe = load_recipe("tetrajet2", {"gemm_emulation": "fp32"})   # FP32 GEMM emulation: no kernel
g = torch.Generator().manual_seed(3)
x = torch.randn(128, 128, generator=g).bfloat16()
w = (torch.randn(128, 128, generator=g) * 0.05).bfloat16()
dy = torch.randn(128, 128, generator=g).bfloat16()

def grads(rec):
    xx, ww = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = nvfp4_linear(xx, ww, None, rec, QuantContext(key=5, seed=rec.seed))
    y.backward(dy)
    return y, xx.grad, ww.grad

runs = [grads(recipe) for _ in range(2)]
with backend.reference_only():
    ref = grads(recipe)
out["y_equal_twins"] = all(torch.equal(a, b) for r in runs for a, b in zip(r, ref))
out["twin_differences"] = [[name, i, (a.float() - b.float()).abs().max().item(), (a != b).sum().item()]
                           for i, r in enumerate(runs) for name, a, b in zip(("y", "dx", "dw"), r, ref)
                           if not torch.equal(a, b)]
out["warnings"] = list(records)
try:
    with backend.use(on_fallback="error"):
        grads(recipe)
    out["error"] = None
except backend.KernelFallbackError as err:
    out["error"] = str(err)
for name in ("nvidia-46", "quartet2-kernel"):   # 4/6 on 16x16 tiles, per-16 MS-EDEN: kernels since 2026-12-07
    with backend.use(on_fallback="error"):
        got = grads(load_recipe(name))
    with backend.reference_only():
        want = grads(load_recipe(name))
    out[name + "_kernel_equals_twin"] = all(torch.equal(a, b) for a, b in zip(got, want))
with backend.use(on_fallback="error"):   # covered calls run their kernel and raise nothing
    q = D.quantize_nvfp4(x, four_over_six=True, site=("direct", "1x16 RN + 4/6"))
    out["covered_matches_twin"] = torch.equal(q.packed, Q.quantize_nvfp4(x, four_over_six=True).packed)
    try:
        D.rht_ms_eden(x.float(), random_signs(7, 64), RandomStream(9), site=("direct", "dgrad E"))
    except backend.KernelFallbackError as err:
        out["rht64"] = str(err)
print("OUT=" + json.dumps(out))
"""


@pytest.mark.parametrize("core", [c for c in core_types() if c != "Prescott"])
def test_interpreted_kernel_path_falls_back_with_a_logged_reason_or_an_error(core):
    # core: the OpenBLAS kernel behind the interpreter's tl.dot (the AVX2 one made the interpreted
    # RHT-16 differ from the twin by an ulp on CPUs without AVX-512 before both summed in FP64)
    env = env_for(core, dict(os.environ, TRITON_INTERPRET="1", MEGATRON_FP4_KERNELS="interpret"))
    env.pop("MEGATRON_FP4_ON_FALLBACK", None)
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json
    out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("OUT=")][-1][4:])
    assert out["config"] == "interpret"
    assert out["y_equal_twins"], out["twin_differences"]   # the fallback returns exactly the twin's result
    # two runs, each falling-back site logged once, with its reason
    assert out["warnings"] and len(set(out["warnings"])) == len(out["warnings"]), out["warnings"]
    assert any("recipe 'tetrajet2', fprop GEMM: no kernel covers this call (gemm_emulation='fp32' (kernels cover "
               "'exact' and 'bf16')); it runs the torch twin on the interpreter" in m for m in out["warnings"])
    assert out["error"] is not None and "gemm_emulation='fp32'" in out["error"]
    # no fallback raised, and the twins' outputs and gradients bit for bit
    assert out["nvidia-46_kernel_equals_twin"] and out["quartet2-kernel_kernel_equals_twin"]
    assert out["covered_matches_twin"]
    assert "RHT size 64 (the MS-EDEN kernels rotate by 128)" in out["rht64"]


def test_interpret_without_the_interpreter_is_refused():
    program = ("from megatron_fp4 import backend; from megatron_fp4.kernels import dispatch as D; import torch; "
               "D.quantize_nvfp4(torch.ones(16, 16))")
    env = dict(os.environ, MEGATRON_FP4_KERNELS="interpret")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode != 0
    assert "needs TRITON_INTERPRET=1 set before megatron_fp4.kernels is imported" in proc.stderr
