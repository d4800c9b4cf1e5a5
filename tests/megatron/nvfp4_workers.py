"""Per-rank bodies of the multi-process tests (run under megatron_fp4.testing.dist.run)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import driver_settings

RECIPES = ("bf16", "nvidia", "tetrajet2", "quartet2")


def _init_tp(world, sp=False, pp=1, vpp=None):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    ps.initialize_model_parallel(tensor_model_parallel_size=world // pp if pp > 1 else world,
                                 pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp)
    model_parallel_cuda_manual_seed(123)


def _config(world, recipe, sp=False, fusion=False, **extra):
    from megatron_fp4.megatron import NVFP4TransformerConfig
    return NVFP4TransformerConfig(
        num_layers=1, hidden_size=256, num_attention_heads=4, use_cpu_initialization=True,
        params_dtype=torch.float32, sequence_parallel=sp, tensor_model_parallel_size=world,
        gradient_accumulation_fusion=fusion, nvfp4_recipe=recipe, **extra)


def _init(w):
    return torch.nn.init.normal_(w, std=0.05)


def _shard(t, dim, rank, world):
    return t.chunk(world, dim=dim)[rank].contiguous()


def _reference(layer, x, weight, bias, dy):
    """Single-device result with the layer's own stream key (what TP=1 computes)."""
    from megatron_fp4.linear import nvfp4_linear
    from megatron_fp4.recipe import QuantContext
    recipe = layer.nvfp4_recipe
    x = x.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    b = None if bias is None else bias.detach().clone().requires_grad_(True)
    if recipe.quantized and not layer.nvfp4_bf16:
        y = nvfp4_linear(x, w, b, recipe, QuantContext(key=layer.nvfp4_last_key, seed=recipe.seed))
    else:
        y = torch.nn.functional.linear(x, w, b)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, None if b is None else b.grad


def _maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


def layer_parity(rank, world, recipe_name, sp):
    """Column and row NVFP4 linears at TP=world (+SP) against the single-device reference."""
    from megatron.core import parallel_state as ps
    from megatron_fp4.megatron import NVFP4ColumnParallelLinear, NVFP4RowParallelLinear
    _init_tp(world)
    report = {}
    s, b, hidden, ffn = 32, 2, 256, 512
    cfg = _config(world, recipe_name, sp=sp)
    torch.manual_seed(7)
    x_full = torch.randn(s, b, hidden)
    dy_col = torch.randn(s, b, ffn)

    # column-parallel [hidden -> ffn]
    torch.manual_seed(11)
    col = NVFP4ColumnParallelLinear(hidden, ffn, config=cfg, init_method=_init, bias=True,
                                    gather_output=False, keep_master_weight_for_test=True)
    col.set_nvfp4_identity(1, "decoder.layers.0.mlp.linear_fc1")
    with torch.no_grad():
        col.bias.copy_(torch.randn(col.bias.shape))
    bias_full = torch.cat([t for t in _gather_list(col.bias.detach(), world)])
    x_in = (_shard(x_full, 0, rank, world) if sp else x_full).clone().requires_grad_(True)
    y, _ = col(x_in)
    y.backward(_shard(dy_col, 2, rank, world))
    ry, rdx, rdw, rdb = _reference(col, x_full, col.master_weight, bias_full, dy_col)
    report["col_fwd_bitexact"] = torch.equal(y, _shard(ry, 2, rank, world))
    report["col_fwd_maxdiff"] = _maxdiff(y, _shard(ry, 2, rank, world))
    report["col_dx_maxdiff"] = _maxdiff(x_in.grad, _shard(rdx, 0, rank, world) if sp else rdx)
    report["col_dx_scale"] = rdx.abs().max().item()
    report["col_dw_maxdiff"] = _maxdiff(col.weight.grad, _shard(rdw, 0, rank, world))
    report["col_dw_scale"] = rdw.abs().max().item()
    report["col_db_maxdiff"] = _maxdiff(col.bias.grad, _shard(rdb, 0, rank, world))

    # row-parallel [ffn -> hidden], input already split along features
    torch.manual_seed(13)
    row = NVFP4RowParallelLinear(ffn, hidden, config=cfg, init_method=_init, bias=True,
                                 input_is_parallel=True, skip_bias_add=False, keep_master_weight_for_test=True)
    row.set_nvfp4_identity(1, "decoder.layers.0.mlp.linear_fc2")
    torch.manual_seed(17)
    h_full = torch.randn(s, b, ffn)
    dy_row = torch.randn(s, b, hidden)
    h_in = _shard(h_full, 2, rank, world).clone().requires_grad_(True)
    y2, _ = row(h_in)
    y2.backward(_shard(dy_row, 0, rank, world) if sp else dy_row)
    ry2, rdh, rdw2, _ = _reference(row, h_full, row.master_weight, None, dy_row)
    ry2 = ry2 + row.bias.detach()
    report["row_fwd_maxdiff"] = _maxdiff(y2, _shard(ry2, 0, rank, world) if sp else ry2)
    report["row_fwd_scale"] = ry2.abs().max().item()
    report["row_dx_bitexact"] = torch.equal(h_in.grad, _shard(rdh, 2, rank, world))
    report["row_dx_maxdiff"] = _maxdiff(h_in.grad, _shard(rdh, 2, rank, world))
    report["row_dx_scale"] = rdh.abs().max().item()
    report["row_dw_maxdiff"] = _maxdiff(row.weight.grad, _shard(rdw2, 1, rank, world))
    report["row_dw_scale"] = rdw2.abs().max().item()
    report["tp_rank"] = ps.get_tensor_model_parallel_rank()
    return report


def swiglu_fc1_parity(rank, world, recipe_name):
    """SwiGLU's fc1 as Megatron builds it (partition stride 2: rank r holds gate and up shards r) at
    TP=world against the single-device layer on the full [gate; up] weight, same stream key."""
    from megatron_fp4.megatron import NVFP4ColumnParallelLinear
    _init_tp(world)
    s, b, hidden, ffn = 32, 2, 256, 1024          # ffn = 2 x 512: gate and up halves
    cfg = _config(world, recipe_name, sp=False)
    torch.manual_seed(7)
    x_full = torch.randn(s, b, hidden)
    dy_full = torch.randn(s, b, ffn)
    torch.manual_seed(11)
    col = NVFP4ColumnParallelLinear(hidden, ffn, config=cfg, init_method=_init, bias=False, stride=2,
                                    gather_output=False, keep_master_weight_for_test=True)
    col.set_nvfp4_identity(1, "decoder.layers.0.mlp.linear_fc1")
    piece = ffn // 2 // world
    rows = torch.cat([torch.arange(rank * piece, (rank + 1) * piece),
                      ffn // 2 + torch.arange(rank * piece, (rank + 1) * piece)])
    x_in = x_full.clone().requires_grad_(True)
    y, _ = col(x_in)
    y.backward(dy_full[:, :, rows])
    ry, rdx, rdw, _ = _reference(col, x_full, col.master_weight, None, dy_full)
    return {"fwd_bitexact": torch.equal(y, ry[:, :, rows]),
            "weights_match": torch.equal(col.weight.detach(), col.master_weight[rows].to(col.weight.dtype)),
            "dw_maxdiff": _maxdiff(col.weight.grad, rdw[rows]),
            "dx_maxdiff": _maxdiff(x_in.grad, rdx), "dx_scale": rdx.abs().max().item()}


def _gather_list(t, world):
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def fp4_allgather_identity(rank, world):
    """Quantize-local-rows-then-gather equals gather-then-quantize, bit for bit, for every recipe."""
    from megatron.core import parallel_state as ps
    from megatron_fp4.megatron.layers import _max_reducer, gather_nvfp4_rows
    from megatron_fp4.recipe import QuantContext
    from megatron_fp4.registry import load_recipe
    _init_tp(world)
    group = ps.get_tensor_model_parallel_group()
    results = {}
    for name in ("nvidia", "nvidia-46", "tetrajet2", "quartet2", "quartet2-no46"):
        recipe = load_recipe(name)
        torch.manual_seed(100 + rank)   # different rows per rank, with a heavy-tailed rank 1
        x_local = torch.randn(48, 256) * (1.0 + 30.0 * rank)
        x_local[3, 5] = 1000.0 if rank == 1 else x_local[3, 5]
        x_local = x_local.to(torch.bfloat16)
        local = recipe.quantize_input(x_local, QuantContext(input_amax_reduce=_max_reducer(group)))
        gathered = gather_nvfp4_rows(local, group, world)
        x_full = torch.cat(_gather_list(x_local, world))
        ref = recipe.quantize_input(x_full, QuantContext())
        same = (torch.equal(gathered.packed, ref.packed)
                and torch.equal(gathered.block_scales.view(torch.uint8), ref.block_scales.view(torch.uint8))
                and ((gathered.tensor_scale is None and ref.tensor_scale is None)
                     or torch.equal(gathered.tensor_scale, ref.tensor_scale))
                and ((gathered.outer_scales is None and ref.outer_scales is None)
                     or torch.equal(gathered.outer_scales, ref.outer_scales)))
        results[name] = (same, gathered.nbytes(), x_full.numel() * 2)
    return results


def fusion_main_grad(rank, world, recipe_name):
    """gradient_accumulation_fusion: FP32 wgrad accumulates into main_grad; placeholder grad."""
    from megatron_fp4.megatron import NVFP4ColumnParallelLinear
    _init_tp(world)
    cfg = _config(world, recipe_name, fusion=True)
    torch.manual_seed(11)
    col = NVFP4ColumnParallelLinear(256, 256, config=cfg, init_method=_init, bias=False,
                                    gather_output=False)
    col.set_nvfp4_identity(1, "decoder.layers.0.self_attention.linear_qkv")
    col.weight.main_grad = torch.full_like(col.weight, 0.5, dtype=torch.float32)
    col.weight.grad_added_to_main_grad = False
    torch.manual_seed(3)
    x = torch.randn(16, 2, 256, requires_grad=True)
    y, _ = col(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    added = col.weight.grad_added_to_main_grad
    placeholder = col.weight.grad is not None and col.weight.grad.shape == col.weight.shape
    # unfused reference with the same key
    cfg2 = _config(world, recipe_name, fusion=False)
    torch.manual_seed(11)
    ref = NVFP4ColumnParallelLinear(256, 256, config=cfg2, init_method=_init, bias=False, gather_output=False)
    ref.set_nvfp4_identity(1, "decoder.layers.0.self_attention.linear_qkv")
    x2 = x.detach().clone().requires_grad_(True)
    y2, _ = ref(x2)
    y2.backward(dy)
    diff = _maxdiff(col.weight.main_grad - 0.5, ref.weight.grad)
    return {"added": added, "placeholder": placeholder, "diff": diff,
            "scale": ref.weight.grad.abs().max().item()}


def gpt_train(rank, world, settings_kwargs, steps=None):
    """Train the driver's GPT for a few steps; return losses and grad norms (on every rank)."""
    from megatron_fp4.megatron import driver
    s = driver_settings.settings(**settings_kwargs)
    if steps is not None:
        s.train_steps = steps
    hist = driver.run_training(s)
    from megatron_fp4.megatron.state import comm_stats
    stats = {k: (v.quantized_bytes, v.bf16_bytes) for k, v in comm_stats().items()}
    return {"losses": hist["losses"], "grad_norms": hist["grad_norms"], "step_times": hist["step_times"],
            "comm": stats, "overlap_grad_reduce": hist["chunks"][0].ddp_config.overlap_grad_reduce}


def _eval_batches(s, n=2):
    from megatron_fp4.megatron import driver
    it = driver.synthetic_batches(s, dp_rank=0, seed=99)
    return [next(it) for _ in range(n)]


def checkpoint_save(rank, world, settings_kwargs, ckpt_dir, steps):
    """Train at the given parallel layout, save a torch_dist checkpoint, return the eval loss."""
    from megatron.core import dist_checkpointing
    from megatron_fp4.megatron import driver
    s = driver_settings.settings(**settings_kwargs)
    s.train_steps = steps
    hist = driver.run_training(s)
    chunks = hist["chunks"]
    loss = driver.broadcast_from_last_stage(driver.evaluate(s, chunks, _eval_batches(s)))
    state = chunks[0].module.sharded_state_dict()
    dist_checkpointing.save(state, ckpt_dir)
    next_loss = _next_training_loss(s, chunks, hist["optimizer"], steps)
    return {"eval_loss": loss, "losses": hist["losses"], "next_loss": next_loss}


def _next_training_loss(s, chunks, optimizer, steps):
    """The training loss of iteration `steps` (on the data the run would see next)."""
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron_fp4.megatron import driver
    batches = driver.synthetic_batches(s, ps.get_data_parallel_rank(), s.seed)
    for _ in range(steps * s.num_microbatches):
        next(batches)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=s.lr, min_lr=s.min_lr, lr_warmup_steps=1,
                                        lr_decay_steps=2, lr_decay_style="constant", start_wd=0.0, end_wd=0.0,
                                        wd_incr_steps=1, wd_incr_style="constant")
    loss, _ = driver.train_step(s, chunks, optimizer, scheduler, [batches], steps)
    return driver.broadcast_from_last_stage(loss)


def checkpoint_load(rank, world, settings_kwargs, ckpt_dir, steps):
    """Build at another layout, load the checkpoint, return the eval loss and one more step's loss."""
    from megatron.core import dist_checkpointing
    from megatron_fp4.megatron import driver
    s = driver_settings.settings(**settings_kwargs)
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    model = chunks[0].module
    state = dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir)
    model.load_state_dict(state)
    loss = driver.broadcast_from_last_stage(driver.evaluate(s, chunks, _eval_batches(s)))
    optimizer, _ = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    return {"eval_loss": loss, "next_loss": _next_training_loss(s, chunks, optimizer, steps)}


def with_env(rank, world, env, fn_name, *args):
    """Run another worker of this module with extra environment variables set in the rank process
    first (the forkserver's environment is fixed when it starts), e.g. the kernel path in Triton's
    interpreter: TRITON_INTERPRET=1 must be set before the kernel modules are imported."""
    import os
    os.environ.update(env)
    return globals()[fn_name](rank, world, *args)


def first_step_gradients(rank, world, runs):
    """For each (settings kwargs, perturb) in `runs`, in turn on the same ranks: one forward-backward
    (no optimizer step) of the driver's GPT from its initial weights; returns, on rank 0, per run the
    loss, the reduced FP32 gradients at the TP=1 layout (`diagnostics.full_gradients`) and every
    plugin layer's random-stream key. `perturb` scales every initial weight matrix by (1 + perturb):
    the last-bit control."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_fp4.megatron import diagnostics, driver
    from megatron_fp4.megatron.state import set_iteration
    out = []
    for settings_kwargs, perturb in runs:
        s = driver_settings.settings(**settings_kwargs)
        driver.initialize_parallel(s)
        chunks, config = driver.build_model(s)
        optimizer, _ = driver.build_optimizer(s, chunks)
        driver.setup_model_hooks(config, chunks, optimizer)
        if perturb:
            diagnostics.perturb_initial_weights(chunks, optimizer, perturb)
        set_iteration(0)
        for m in chunks:
            m.zero_grad_buffer()
        batches = driver.synthetic_batches(s, ps.get_data_parallel_rank(), s.seed)
        losses = get_forward_backward_func()(
            forward_step_func=driver.forward_step, data_iterator=batches, model=chunks[0],
            num_microbatches=s.num_microbatches, seq_length=s.seq_length, micro_batch_size=s.micro_batch_size,
            forward_only=False)
        loss = torch.stack([x["lm loss"] for x in losses]).mean().item()
        grads = diagnostics.full_gradients(chunks, s.swiglu)
        keys = diagnostics.stream_keys(chunks)
        # numpy: plain pickling (torch tensors would travel as shared-memory handles of an exited process)
        out.append({"loss": loss, "grads": {k: v.numpy() for k, v in grads.items()}, "keys": keys})
        ps.destroy_model_parallel()
    return out if rank == 0 else None



def bf16_switch(rank, world, recipe_name):
    """Two identical column-parallel plugin linears (TP=1; same weights and identity, so the same random
    streams) at log iterations 2 and 3 around --nvfp4-bf16-from 3: one with the switch declared, one
    without. Per scope: is its output / dX / dW that of torch's F.linear, or that of the layer without the
    switch (the recipe)?"""
    from megatron_fp4.megatron import NVFP4ColumnParallelLinear, state
    _init_tp(world)
    cfg = _config(world, recipe_name)
    layers = []
    for _ in range(2):
        torch.manual_seed(11)
        layer = NVFP4ColumnParallelLinear(256, 512, config=cfg, init_method=_init, bias=False, gather_output=False)
        layer.set_nvfp4_identity(1, "decoder.layers.0.mlp.linear_fc1")
        layers.append(layer)
    torch.manual_seed(7)
    x0, dy = torch.randn(32, 2, 256), torch.randn(32, 2, 512)

    def run(layer, switch):
        state.set_bf16_from(*switch)
        layer.weight.grad = None
        x = x0.clone().requires_grad_(True)
        y, _ = layer(x)
        y.backward(dy)
        return y.detach(), x.grad, layer.weight.grad.clone()

    out = {}
    try:
        for scope in ("all", "forward"):
            for log_iteration in (2, 3):
                state.set_iteration(log_iteration - 1)
                switched = run(layers[0], (3, scope))
                plain = run(layers[1], (None,))
                w = layers[0].weight.detach().clone().requires_grad_(True)
                xr = x0.clone().requires_grad_(True)
                yr = torch.nn.functional.linear(xr, w)
                yr.backward(dy)
                reference = (yr.detach(), xr.grad, w.grad)
                out[f"{scope}_{log_iteration}"] = {
                    f"{what}_is_{name}": torch.equal(switched[i], other[i])
                    for i, what in enumerate(("fwd", "dx", "dw"))
                    for name, other in (("bf16", reference), ("recipe", plain))}
    finally:
        state.set_bf16_from(None)
    return out

