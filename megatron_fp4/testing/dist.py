"""Run a function on N CPU processes with a real gloo process group (tests and the CPU driver).

Processes come from a `forkserver` with torch and megatron.core preloaded, so each run pays a fork
instead of the ~4 s import. `fn(rank, world_size, *args)` must be importable by module name (a
top-level function); its return value must be picklable. A run that exceeds `timeout` is killed
(a hung collective, e.g. a distributed-checkpoint save without psutil, must not hang the suite).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta

PRELOAD = ["torch", "megatron.core", "megatron.core.models.gpt", "megatron.core.optimizer",
           "megatron.core.distributed", "megatron.core.pipeline_parallel",
           "megatron_fp4.megatron", "megatron_fp4.spec", "megatron_fp4.patches.torch_cpu"]

_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        _ctx = mp.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, kwargs, results, threads, shim):
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=120))
        if shim:
            from megatron_fp4.patches import torch_cpu
            torch_cpu.install()
        out = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, out))
    except BaseException:  # report everything, including assertion failures, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state
            parallel_state.destroy_model_parallel()
        except Exception:
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


class DistributedError(RuntimeError):
    pass


def run(fn, world_size: int = 2, *args, timeout: float = 120.0, threads: int = 1, shim: bool = True,
        **kwargs):
    """Run fn on `world_size` gloo ranks; return the list of per-rank results (rank order)."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, kwargs, results, threads, shim),
                         daemon=False) for r in range(world_size)]   # checkpoint writers fork children
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{getattr(fn, '__name__', fn)} on {world_size} ranks did not finish "
                                   f"in {timeout:.0f} s (ranks done: {sorted(out)})")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        raise DistributedError(f"rank process exited with code {dead[0].exitcode}")
                continue
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break   # the other ranks are likely stuck in a collective: stop now
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise DistributedError("\n".join(errors))
    return [out[r] for r in range(world_size)]
