"""megatron.core.dist_checkpointing's file writers: results through a thread queue (CPU route saves).

The writers of `dist_checkpointing.save` hand their results back through
`strategies.filesystem_async._results_queue`, which megatron-core creates as a multiprocessing Manager
queue on first use: a spawned server process (seconds to start, and left running when a run is
killed). The CPU route's saves (megatron_fp4/megatron/checkpoint.py) are synchronous and write from
threads of the saving process, so a plain `queue.Queue` carries the same results. Megatron's async
saves (GPU route, `--async-save`) are not touched: this runs only before the CPU route's saves.
Written for megatron-core 0.19 (`filesystem_async._results_queue`, None until first use).
"""
from __future__ import annotations


def in_process_write_results() -> None:
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    if getattr(filesystem_async, "_results_queue", False) is None:
        import queue
        filesystem_async._results_queue = queue.Queue()
