"""Which implementation runs the quantizers and GEMMs: one small config object, set once.

`BackendConfig` (immutable):

- `kernels`: "auto" (the Triton kernels on CUDA tensors, the torch twins elsewhere), "reference" (the
  twins everywhere) or "interpret" (the kernels on every tensor, CPU ones in Triton's interpreter;
  needs TRITON_INTERPRET=1 before the kernels are imported — the tests drive whole recipes and TP/SP
  layers through the kernel path this way);
- `gemm`: "cublas" (dequant + cuBLAS with FP32 output, one epilogue pass) or "triton" (the
  packed-operand Triton GEMM) for per-tensor-scaled GEMMs;
- `emit_operands`: quantizer kernels also write the BF16 operand of the GEMM that consumes them next;
- `on_fallback`: "warn" or "error" when a call that would run a kernel (a CUDA tensor under "auto",
  any tensor under "interpret") is not covered by one and takes the twin instead (`fallback`).

Set once: `configure(...)` at start, else the environment is read once, at the first use
(`MEGATRON_FP4_KERNELS` = 1/auto, 0/reference or interpret; `MEGATRON_FP4_GEMM` = cublas/triton;
`MEGATRON_FP4_EMIT_OPERANDS` = 1/0; `MEGATRON_FP4_ON_FALLBACK` = warn/error). The layers put the
current config into each call's QuantContext, so forward and backward of one call use the same one;
`use(...)` / `reference_only()` change it for a block (tests, benchmarks). Nothing here is read from
the environment after the first use.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

log = logging.getLogger(__name__)

KERNELS = ("auto", "reference", "interpret")
GEMMS = ("cublas", "triton")
ON_FALLBACK = ("warn", "error")

# environment variable -> (knob, accepted spellings -> value)
ENV = {
    "MEGATRON_FP4_KERNELS": ("kernels", {"1": "auto", "auto": "auto", "0": "reference",
                                         "reference": "reference", "interpret": "interpret"}),
    "MEGATRON_FP4_GEMM": ("gemm", {g: g for g in GEMMS}),
    "MEGATRON_FP4_EMIT_OPERANDS": ("emit_operands", {"1": True, "true": True, "0": False, "false": False}),
    "MEGATRON_FP4_ON_FALLBACK": ("on_fallback", {v: v for v in ON_FALLBACK}),
}


class BackendError(ValueError):
    """A backend knob or environment variable has a value outside its choices."""


class KernelFallbackError(RuntimeError):
    """on_fallback="error": a call that should run a kernel is not covered by one."""


@dataclass(frozen=True)
class BackendConfig:
    kernels: str = "auto"
    gemm: str = "cublas"
    emit_operands: bool = True
    on_fallback: str = "warn"

    def __post_init__(self):
        for knob, choices in (("kernels", KERNELS), ("gemm", GEMMS), ("on_fallback", ON_FALLBACK)):
            if getattr(self, knob) not in choices:
                raise BackendError(f"backend knob {knob!r} must be one of {list(choices)}, got "
                                   f"{getattr(self, knob)!r}")
        if not isinstance(self.emit_operands, bool):
            raise BackendError(f"backend knob 'emit_operands' must be true or false, got {self.emit_operands!r}")

    def replace(self, **changes) -> "BackendConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise BackendError(f"unknown backend knob(s) {unknown}; known: "
                               f"{[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "BackendConfig":
        """The config the MEGATRON_FP4_* variables describe (unset ones keep the defaults)."""
        environ = os.environ if environ is None else environ
        knobs = {}
        for var, (knob, spellings) in ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            value = spellings.get(raw.strip().lower())
            if value is None:
                raise BackendError(f"{var}={raw!r} is not valid: use one of {sorted(spellings)} "
                                   f"(or unset it for the default, {getattr(cls, knob)!r})")
            knobs[knob] = value
        return cls(**knobs)


_current: Optional[BackendConfig] = None


def current() -> BackendConfig:
    """The process's config: what `configure` set, else the environment, read at the first call."""
    global _current
    if _current is None:
        _current = BackendConfig.from_env()
    return _current


def configure(config: Optional[BackendConfig] = None, **knobs) -> BackendConfig:
    """Set the process's config once at start (a launcher, a script): a BackendConfig, or knobs
    changed from the environment's config. Returns it."""
    global _current
    if config is None:
        config = BackendConfig.from_env().replace(**knobs)
    elif knobs:
        config = config.replace(**knobs)
    if _current is not None and _current != config:
        log.info("megatron_fp4 backend: %s (was %s)", config, _current)
    _current = config
    return config


@contextlib.contextmanager
def use(config: Optional[BackendConfig] = None, **changes):
    """Inside this block the process's config is `config` (or the current one with `changes`);
    calls that already carry a config (a layer call's QuantContext) keep theirs."""
    global _current
    previous = current()
    _current = (config or previous).replace(**changes) if changes else (config or previous)
    try:
        yield _current
    finally:
        _current = previous


def reference_only():
    """A block in which every dispatch call runs the torch twin, also on CUDA tensors (what
    MEGATRON_FP4_KERNELS=0 does for a whole process); benchmarks time both paths this way."""
    return use(kernels="reference")


_interpret_checked = False


def wants_kernel(config: BackendConfig, on_accelerator: bool) -> bool:
    """Whether a call should run a kernel (if one covers it): "auto" on an accelerator tensor,
    "interpret" on any tensor, "reference" never."""
    if config.kernels == "auto":
        return on_accelerator
    if config.kernels == "interpret":
        global _interpret_checked
        if not _interpret_checked:
            from .kernels._common import INTERPRET
            if not INTERPRET:
                raise BackendError("kernels='interpret' (MEGATRON_FP4_KERNELS=interpret) needs "
                                   "TRITON_INTERPRET=1 set before megatron_fp4.kernels is imported")
            _interpret_checked = True
        return True
    return False


_reported: set = set()


def fallback(config: BackendConfig, site, reason: str) -> None:
    """A call that wants a kernel (wants_kernel) takes the torch twin because no kernel covers it.

    `site` = (recipe name, operand), e.g. ("nvidia-46", "forward W"); "warn" logs once per site with
    the reason, "error" raises KernelFallbackError."""
    recipe, operand = site if site is not None else ("(direct call)", "?")
    where = "interpreter" if config.kernels == "interpret" else "GPU"
    message = (f"megatron_fp4: recipe {recipe!r}, {operand}: no kernel covers this call ({reason}); "
               f"it runs the torch twin on the {where}")
    if config.on_fallback == "error":
        raise KernelFallbackError(message + ". Change the recipe knob or the shape, or run the twins "
                                  "deliberately with kernels='reference' (MEGATRON_FP4_KERNELS=0); "
                                  "on_fallback='warn' (MEGATRON_FP4_ON_FALLBACK=warn) only logs it")
    key = (recipe, operand)
    if key not in _reported:
        _reported.add(key)
        log.warning("%s (logged once per recipe and operand; MEGATRON_FP4_ON_FALLBACK=error makes it "
                    "an error)", message)


def reset_fallback_log() -> None:
    """Forget which fallbacks were logged (tests)."""
    _reported.clear()
