"""The benchmarks' timing rules: GPU time, the median of CUDA-event-timed calls after warm-up; host
time, the median over rounds of calls issued back to back without a sync."""
from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, warmup: int = 3, reps: int = 20, dryrun: bool = False) -> float:
    """Median milliseconds of `reps` calls of fn after `warmup` calls. dryrun (CPU, Triton
    interpreter checks of the benchmark's code paths): one wall-clock call, no warm-up."""
    if dryrun:
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return statistics.median(times)


def host_issue_ms(fn, warmup: int = 3, rounds: int = 5, calls: int = 10, dryrun: bool = False) -> float:
    """Host milliseconds per call of fn: `rounds` rounds of `calls` calls issued back to back (no sync
    inside a round, one after it), the median round. Meaningful where the GPU keeps up with the host
    (small problems), else the host waits on a full launch queue. dryrun: one wall-clock call."""
    if dryrun:
        return median_ms(fn, dryrun=True)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - begin) * 1e3 / calls)
        torch.cuda.synchronize()
    return statistics.median(times)
