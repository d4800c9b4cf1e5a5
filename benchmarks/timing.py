"""The one GPU timing rule of the benchmarks: median of CUDA-event-timed calls after warm-up."""
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
