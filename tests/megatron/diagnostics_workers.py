"""Per-rank bodies of tests/megatron/test_diagnostics.py (run under megatron_fp4.testing.dist.run)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import driver_settings

SMALL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, seq_length=64,
             micro_batch_size=2, num_microbatches=1, swiglu=True)


def counted_collectives(rank, world):
    """Known collectives on the TP and DP groups (TP=2, DP=1 here; then TP=1, DP=2) and through
    Megatron's own sequence-parallel gather, with the counter installed; returns its records."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import mappings

    from megatron_fp4.megatron import state
    from megatron_fp4.megatron.diagnostics import CollectiveCounter
    ps.initialize_model_parallel(tensor_model_parallel_size=2)
    counter = CollectiveCounter().install()
    try:
        state.set_iteration(1)
        tp = ps.get_tensor_model_parallel_group()
        x = torch.randn(3, 5)                                   # float32: 60 bytes
        out = torch.empty(6, 5)
        dist.all_gather_into_tensor(out, x, group=tp)           # counted as the gathered 120 bytes
        y = torch.randn(4, 8, dtype=torch.bfloat16)             # 64 bytes
        mappings.gather_from_sequence_parallel_region(y, group=tp)   # Megatron's bound function: 128 bytes
        z = torch.randn(6, 2)                                   # 48 bytes reduce-scattered
        dist.reduce_scatter_tensor(torch.empty(3, 2), z, group=tp)
        w = torch.randn(7)
        dist.all_reduce(w, group=tp)                            # 28 bytes
        dist.all_reduce(w, group=ps.get_data_parallel_group())  # a one-rank group: nothing moves, not counted
        state.set_iteration(2)
        dist.all_reduce(w)                                      # the world group (2 ranks): 28 bytes
        report = counter.per_iteration(skip_first=1)
        installed = dist.all_gather_into_tensor is not counter._originals[0][2]
    finally:
        counter.uninstall()
    restored = not getattr(dist.all_gather_into_tensor, "_nvfp4_counted", False) and \
        not getattr(mappings.dist_all_gather_func, "_nvfp4_counted", False)
    return {"records": {f"{k[0]}:{k[1]}/{k[2]}": v for k, v in counter.records.items()}, "report": report,
            "installed": installed, "restored": restored}


def first_step(rank, world, settings, path, tp=1, sp=False, perturb=0.0):
    """One training step of the driver's GPT with the first-step gradient dump installed."""
    from megatron_fp4.megatron import diagnostics, driver
    s = driver_settings.settings(**settings, tp=tp, sequence_parallel=sp)
    s.train_steps = 1
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    if perturb:
        diagnostics.perturb_initial_weights(chunks, optimizer, perturb)
    diagnostics.install_first_step_grad_dump(optimizer, chunks, path, s.swiglu)
    before = optimizer.step
    driver.train_step(s, chunks, optimizer, scheduler, [driver.synthetic_batches(s, 0, s.seed)], 0)
    # the wrapper restored the optimizer's own step after its one use
    return {"restored": optimizer.step is not before}


def refusals(rank, world, settings, what):
    from megatron_fp4.megatron import diagnostics, driver
    s = driver_settings.settings(**settings)
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    optimizer, _ = driver.build_optimizer(s, chunks)
    try:
        if what == "perturb":
            diagnostics.perturb_initial_weights(chunks, optimizer, 2.0 ** -22)
        else:
            diagnostics.install_first_step_grad_dump(optimizer, chunks, "/nonexistent/x.pt", s.swiglu)
    except ValueError as err:
        return str(err)
    return None
