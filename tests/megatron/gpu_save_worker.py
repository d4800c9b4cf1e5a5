"""One process of the GPU route's checkpoint save, on CPU: Megatron's own
`megatron.training.checkpointing.save_checkpoint` / `load_checkpoint` (patched by
patches/megatron_checkpoint.py) on the plugin's GPT, with Megatron's global args parsed by the
launcher (`build_config`). Run as a script (a one-rank gloo group and the CPU shim), so that a test
can SIGKILL it in the middle of a save:

    python gpu_save_worker.py SAVE save ITER [ITER ...]   -> prints `saving ITER SUM` before and `saved ITER SUM` after each save
    python gpu_save_worker.py SAVE load                   -> prints `loaded ITER SUM`

Before the save of iteration i every parameter is set to (its initial value + i), so the sum of the
parameters tells which iteration a load restored (SUM: float64 sum of every parameter)."""
import os
import sys

TINY = ["--num-layers", "2", "--hidden-size", "128", "--ffn-hidden-size", "256", "--num-attention-heads", "4",
        "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "8",
        "--mock-data", "--nvfp4-recipe", "quartet2", "--nvfp4-fp32"]


def _param_sum(chunks) -> float:
    return float(sum(p.detach().double().sum() for m in chunks for p in m.parameters()))


def main(save: str, mode: str, iterations) -> None:
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(minutes=5))
    from megatron_fp4.patches import torch_cpu
    torch_cpu.install()
    from megatron.training import checkpointing

    from megatron_fp4.megatron import driver
    from megatron_fp4.patches import megatron_args, megatron_checkpoint
    from megatron_fp4.pretrain_support import build_config

    megatron_args.apply()
    megatron_checkpoint.apply()
    extra = ["--save", save] + (["--load", save] if mode == "load" else [])
    build_config(TINY + extra)
    s = driver.GPTSettings(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, seq_length=32,
                           micro_batch_size=2, recipe="quartet2")
    driver.initialize_parallel(s)
    chunks, _ = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    optimizer.step()        # zero gradients: Adam's state exists (a real run saves after steps)
    if mode == "load":
        iteration, _ = checkpointing.load_checkpoint(chunks, optimizer, scheduler)
        print(f"loaded {iteration} {_param_sum(chunks)!r}", flush=True)
        return
    initial = [p.detach().clone() for m in chunks for p in m.parameters()]
    for it in iterations:
        with torch.no_grad():
            for p, p0 in zip((p for m in chunks for p in m.parameters()), initial):
                p.copy_(p0 + it)
        # the main parameters the distributed/Float16 optimizer saves follow the model's
        optimizer.reload_model_params() if hasattr(optimizer, "reload_model_params") else None
        print(f"saving {it} {_param_sum(chunks)!r}", flush=True)
        checkpointing.save_checkpoint(it, chunks, optimizer, scheduler, 0)
        print(f"saved {it} {_param_sum(chunks)!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]])
