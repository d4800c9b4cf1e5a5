"""OpenBLAS kernels this machine can run, for tests that must give the same bits whichever one numpy
(the Triton interpreter's tl.dot) picks: OPENBLAS_CORETYPE=NAME in a fresh process selects one."""
from __future__ import annotations


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def core_types() -> list:
    """None (the CPU's own choice), then the baseline SSE3 kernel and, where the CPU has AVX2 and FMA,
    the AVX2 one (OpenBLAS's choice on CPUs without AVX-512); on other architectures only None."""
    flags = _cpu_flags()
    if "pni" not in flags and "sse3" not in flags:
        return [None]
    kinds = [None, "Prescott"]
    if {"avx2", "fma"} <= flags:
        kinds.append("Haswell")
    return kinds


def env_for(core, base: dict) -> dict:
    env = dict(base)
    env.pop("OPENBLAS_CORETYPE", None)
    if core is not None:
        env["OPENBLAS_CORETYPE"] = core
    return env
