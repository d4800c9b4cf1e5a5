"""Per-rank bodies of the OsciReset / OutControl tests (run under megatron_fp4.testing.dist.run)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import driver_settings


def _build(settings_kwargs):
    from megatron_fp4.megatron import driver
    from megatron_fp4.megatron.state import set_train_iters
    s = driver_settings.settings(**settings_kwargs)
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    set_train_iters(s.train_steps)
    return s, chunks, optimizer, scheduler


def _teardown():
    from megatron.core import parallel_state
    parallel_state.destroy_model_parallel()


def train_with_stabilizers(rank, world, settings_kwargs):
    """run_training with a stabilizer recipe: loss history, OsciReset events, OutControl stats."""
    from megatron_fp4.megatron import driver
    hist = driver.run_training(driver_settings.settings(**settings_kwargs))
    masks = {}
    for chunk in hist["chunks"]:
        for module in chunk.modules():
            if hasattr(module, "nvfp4_outlier_mask"):
                masks[module.nvfp4_name] = module.nvfp4_outlier_mask.nonzero().squeeze(1).tolist()
    stats = {k: {kk: vv for kk, vv in v.items() if kk != "channels_selected"} for k, v in hist["outcontrol"].items()}
    return {"losses": hist["losses"], "oscireset": hist["oscireset"], "outcontrol": stats, "masks": masks}


def _gather_master(param, member):
    """The full FP32 master of a (possibly DP-sharded) weight, on every rank."""
    full = torch.zeros(param.numel(), dtype=torch.float32)
    if hasattr(member, "_get_model_param_range_map"):
        try:
            rng = member._get_model_param_range_map(param)["param"]
            if getattr(param, "main_param", None) is not None:
                full[rng.start:rng.end] = param.main_param.float()
            else:   # FP32 params: the optimizer's shard is a view of the param itself
                full[rng.start:rng.end] = param.data.view(-1)[rng.start:rng.end].float()
        except KeyError:
            pass
        dist.all_reduce(full, group=member.data_parallel_group)   # shards are disjoint: exact
    else:
        master = param.main_param if getattr(param, "main_param", None) is not None else param.data
        full.copy_(master.reshape(-1).float())
    return full.view(param.shape)


def oscireset_sharded_vs_full(rank, world, settings_kwargs):
    """Distributed optimizer (DP-sharded masters, exact block-maximum reductions) against a shadow
    OsciReset on the gathered full FP32 masters with the unsharded Q_D, on the same run: at every
    update the masters after the real hook must equal the shadow's reset copy bit for bit."""
    from megatron_fp4.megatron import driver
    from megatron_fp4.megatron.optimizer_hooks import _managed_layers, _members, install_stabilizers, plugin_recipe
    from megatron_fp4.oscireset import MasterQuantizer, WeightTracker
    s, chunks, optimizer, scheduler = _build(settings_kwargs)
    hooks = install_stabilizers(optimizer, chunks, s.train_steps)
    recipe = plugin_recipe(chunks)
    from megatron_fp4.megatron.optimizer_hooks import _member_owns
    layers = list(_managed_layers(chunks))
    shadow_master, shadow = {}, {}
    for name, _ in layers:
        shadow[name] = WeightTracker(name, lambda n=name: shadow_master[n], MasterQuantizer(recipe), hooks.config)
    report = {"mismatches": 0, "compared": 0, "shadow_resets": 0, "real_resets": 0}

    def wrap(member, owned):
        inner = member._copy_main_params_to_model_params

        def checked_copy(*args, **kwargs):
            active = hooks.current is not None
            if active:
                for name, module in owned:
                    shadow_master[name] = _gather_master(module.weight, member).clone()
                    stats = shadow[name].on_update(hooks.current)
                    if stats:
                        report["shadow_resets"] += stats["reset"]
            result = inner(*args, **kwargs)
            if active:
                for name, module in owned:
                    after = _gather_master(module.weight, member)
                    report["mismatches"] += int((after != shadow_master[name]).sum())
                    report["compared"] += after.numel()
            return result
        member._copy_main_params_to_model_params = checked_copy

    members = _members(optimizer)
    for member in members:   # a chained optimizer's members each copy (and reset) their own params
        wrap(member, [(n, m) for n, m in layers if _member_owns(member, m.weight)])
    report["members"] = len(members)
    it = driver.synthetic_batches(s, dp_rank=dist.get_rank() if s.tp == 1 else 0, seed=s.seed)
    for i in range(s.train_steps):
        driver.train_step(s, chunks, optimizer, scheduler, [it], i)
    report["real_resets"] = sum(h["reset"] for h in hooks.history)
    report["events"] = [h["update"] for h in hooks.history]
    _teardown()
    return report


def _train_range(settings_kwargs, start, stop, state=None, ckpt_dir=None):
    from megatron.core import parallel_state as ps
    from megatron_fp4.megatron import driver
    from megatron_fp4.megatron.optimizer_hooks import (install_stabilizers, load_oscireset_state,
                                                       save_oscireset_state)
    s, chunks, optimizer, scheduler = _build(settings_kwargs)
    hooks = install_stabilizers(optimizer, chunks, s.train_steps, iteration=start)
    model = chunks[0].module
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        assert load_oscireset_state(optimizer, ckpt_dir, start)
    batches = driver.synthetic_batches(s, dp_rank=ps.get_data_parallel_rank(), seed=s.seed)
    for _ in range(start * s.num_microbatches):   # the data a resumed run has already consumed
        next(batches)
    losses = []
    for i in range(start, stop):
        loss, _ = driver.train_step(s, chunks, optimizer, scheduler, [batches], i)
        losses.append(loss)
    out = {"losses": losses, "events": list(hooks.history),
           "model": {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
           "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if ckpt_dir is not None and state is None:
        save_oscireset_state(optimizer, ckpt_dir)
    _teardown()
    return out


def resume_equivalence(rank, world, settings_kwargs, split_at, ckpt_path):
    """Uninterrupted run against save at `split_at` (mid-window, mid-recording) + fresh resume."""
    total = settings_kwargs["train_steps"]
    straight = _train_range(settings_kwargs, 0, total)
    first = _train_range(settings_kwargs, 0, split_at, ckpt_dir=ckpt_path)
    torch.save({k: first[k] for k in ("model", "optimizer", "scheduler")}, f"{ckpt_path}/state.pt")
    second = _train_range(settings_kwargs, split_at, total,
                          torch.load(f"{ckpt_path}/state.pt", weights_only=False), ckpt_dir=ckpt_path)
    mismatched = [k for k, v in straight["model"].items() if not torch.equal(v, second["model"][k])]
    return {"straight_losses": straight["losses"], "resumed_losses": first["losses"] + second["losses"],
            "mismatched": mismatched, "straight_events": straight["events"],
            "resumed_events": first["events"] + second["events"]}


def oscireset_chained(rank, world, settings_kwargs):
    """A ChainedOptimizer of two FP32Optimizers over disjoint halves of the model: OsciReset hooks
    every member, and each member resets the weights it owns."""
    import torch.optim
    from megatron.core.optimizer import ChainedOptimizer, FP32Optimizer, OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core import parallel_state as ps
    from megatron_fp4.megatron import driver
    from megatron_fp4.megatron.optimizer_hooks import install_stabilizers
    from megatron_fp4.megatron.state import set_train_iters
    s = driver_settings.settings(**settings_kwargs)
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    params = [p for p in chunks[0].parameters() if p.requires_grad]
    halves = [params[: len(params) // 2], params[len(params) // 2:]]
    opt_config = OptimizerConfig(optimizer="adam", lr=s.lr, weight_decay=0.0, clip_grad=0.0, bf16=False)
    members = [FP32Optimizer(torch.optim.Adam(h, lr=s.lr), opt_config, lambda opt, config=None: None)
               for h in halves]
    optimizer = ChainedOptimizer(members)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=s.lr, max_lr=s.lr, min_lr=s.lr, lr_warmup_steps=0,
                                        lr_decay_steps=s.train_steps, lr_decay_style="constant", start_wd=0.0,
                                        end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant")
    driver.setup_model_hooks(config, chunks, optimizer)
    set_train_iters(s.train_steps)
    hooks = install_stabilizers(optimizer, chunks, s.train_steps)
    batches = driver.synthetic_batches(s, ps.get_data_parallel_rank(), s.seed)
    for i in range(s.train_steps):
        driver.train_step(s, chunks, optimizer, scheduler, [batches], i)
    per_member = [sorted(t.name for t in trackers) for trackers in hooks.trackers.values()]
    reset_layers = sorted({e["layer"] for e in hooks.history})
    _teardown()
    return {"per_member": per_member, "reset_layers": reset_layers,
            "events": sorted({e["update"] for e in hooks.history})}


def bf16_layer_flags(rank, world, settings_kwargs):
    """Which plugin linears of a built GPT run in BF16 (recipe-level per-layer overrides)."""
    from megatron_fp4.megatron import driver
    s = driver_settings.settings(**settings_kwargs)
    driver.initialize_parallel(s)
    chunks, _ = driver.build_model(s)
    flags = {m.nvfp4_name: m.nvfp4_bf16 for c in chunks for m in c.modules() if hasattr(m, "nvfp4_bf16")}
    _teardown()
    return flags
