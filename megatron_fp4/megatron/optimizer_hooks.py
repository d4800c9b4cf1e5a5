"""OsciReset inside Megatron's optimizers (optimizer-hooks.md §1.6).

`install_oscireset(optimizer, model_chunks, recipe, train_iters)` wraps, at instance level, each
underlying optimizer of a (possibly chained) Megatron optimizer:

- the top-level `step` counts applied updates (a skipped step, e.g. non-finite gradients, does not
  advance the counter; the counter starts from the resumed iteration);
- each member's `step_with_ready_grads` marks that a real step is in progress, so that
- each member's `_copy_main_params_to_model_params` runs OsciReset on the updated FP32 masters
  *before* they are copied into the BF16 params (and, with the distributed optimizer, before the param
  all-gather): the reset reaches the model in the same step. Copies from checkpoint-reload paths do not
  run it. FP32Optimizer (no separate masters) runs it right after its step.

Masters: `Float16OptimizerWithFloat16Params` keeps a full FP32 `param.main_param` (Q_D by the recipe's
forward weight quantizer, TP amax MAX-reduced as in forward); `DistributedOptimizer` keeps a flat shard
(Q_D exactly through block-maximum all-reduces over its data-parallel group; every rank joins the
collectives for every managed weight, also when its shard of that weight is empty).
OutControl layers quantize only their FP4 columns (in gathered order); MXFP8 columns are never
tracked or reset.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from ..oscireset import MasterQuantizer, OsciResetConfig, ShardedMasterQuantizer, WeightTracker
from ..recipe import Recipe

log = logging.getLogger(__name__)


def _members(optimizer):
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _tp_max_reducer(module):
    group = getattr(module, "tp_group", None)
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return None

    def reduce(amax):
        out = amax.detach().float().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out
    return reduce


class _SplitMasterQuantizer:
    """Q_D of an OutControl layer's full master: while the layer has an outlier split, the FP4
    columns are quantized in gathered order and outlier columns are excluded (scale 0, Q_D = w: their
    quantized travel equals their master travel, and the tracker never flags scale-0 elements)."""

    def __init__(self, base: MasterQuantizer, module):
        self.base, self.module = base, module

    def __call__(self, master):
        split = self.module.nvfp4_channel_split()
        if split is None:
            return self.base(master)
        fp4, _ = split.gather(master.float())
        qd_fp4, scale_fp4 = self.base(fp4)
        qd = master.float().clone()
        scale = torch.zeros_like(qd)
        n_fp4 = split.fp4_index.numel()
        qd[:, split.fp4_index] = qd_fp4[:, :n_fp4]
        scale[:, split.fp4_index] = scale_fp4[:, :n_fp4]
        return qd, scale


class _GatheringShardQuantizer:
    """Q_D on a DistributedOptimizer shard of an OutControl layer: the FP4 columns form blocks in
    gathered order, which the flat shard does not preserve, so the FP32 master of this one weight is
    all-gathered (transient, one weight at a time) and Q_D taken on it."""

    def __init__(self, full_quantizer, shape, start, end, group):
        self.full, self.shape, self.start, self.end, self.group = full_quantizer, shape, start, end, group

    def __call__(self, shard):
        numel = self.shape[0] * self.shape[1]
        full = torch.zeros(numel, dtype=torch.float32, device=shard.device)
        full[self.start:self.end] = shard.float()
        if self.group is not None and dist.get_world_size(self.group) > 1:
            dist.all_reduce(full, op=dist.ReduceOp.SUM, group=self.group)  # shards are disjoint
        qd, scale = self.full(full.view(self.shape))
        return qd.reshape(-1)[self.start:self.end], scale.reshape(-1)[self.start:self.end]


class OsciResetHooks:
    """Trackers for every plugin-managed weight, driven by the optimizer's applied-update counter."""

    def __init__(self, config: OsciResetConfig, first_update: int = 0,
                 on_reset: Optional[Callable[[str, dict], None]] = None):
        config.validate()
        self.config = config
        self.applied = first_update      # index of the next update to be applied
        self.current: Optional[int] = None
        self.trackers: dict[int, list[WeightTracker]] = {}   # id(member optimizer) -> trackers
        self.history: list[dict] = []
        self.on_reset = on_reset

    # -- checkpointing (rank-local: the trackers of a DistributedOptimizer hold shards) ---------------
    def state_dict(self) -> dict:
        return {"applied": self.applied,
                "trackers": [{t.name: t.state_dict() for t in trackers} for trackers in self.trackers.values()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore the update counter and in-window buffers (collective: every rank calls it)."""
        self.applied = int(state["applied"])
        saved = state.get("trackers", [])
        for i, trackers in enumerate(self.trackers.values()):
            member_state = saved[i] if i < len(saved) else {}
            for tracker in trackers:
                tracker.load_state_dict(member_state.get(tracker.name, {"window_start": None}))

    # -- driving ----------------------------------------------------------------------------------
    def run_member(self, member) -> None:
        if self.current is None:
            return
        for tracker in self.trackers.get(id(member), []):
            stats = tracker.on_update(self.current)
            if stats is not None:
                stats = dict(stats, layer=tracker.name)
                self.history.append(stats)
                log.info("OsciReset update %d %s: reset %d of %d tracked (%.4f%% of the weight), "
                         "median ratio %.3f", stats["update"], tracker.name, stats["reset"],
                         stats["tracked"], 100 * stats["reset_fraction"], stats["median_ratio"])
                if self.on_reset is not None:
                    self.on_reset(tracker.name, stats)


def _managed_layers(model_chunks: Iterable[torch.nn.Module]):
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            if getattr(module, "nvfp4_quantized", False) and getattr(module, "weight", None) is not None:
                yield getattr(module, "nvfp4_name", name), module


class _ShardQuantizer:
    """Q_D on a DistributedOptimizer shard: block-maximum reductions normally; while an OutControl
    split is active the FP4 blocks follow gathered column order, which a flat shard does not
    preserve, so the weight's FP32 master is all-gathered (transient, one weight at a time)."""

    def __init__(self, module, recipe, shape, start, end, group):
        self.module = module
        self.sharded = ShardedMasterQuantizer(recipe, shape, start, end, group=group,
                                              weight_amax_reduce=_tp_max_reducer(module))
        full = _SplitMasterQuantizer(MasterQuantizer(recipe, weight_amax_reduce=_tp_max_reducer(module)), module)
        self.gathering = _GatheringShardQuantizer(full, shape, start, end, group)

    def __call__(self, shard):
        split_fn = getattr(self.module, "nvfp4_channel_split", None)
        if split_fn is not None and split_fn() is not None:
            return self.gathering(shard)
        return self.sharded(shard)


def _make_tracker(name, module, member, recipe: Recipe, config: OsciResetConfig) -> WeightTracker:
    param = module.weight
    full = MasterQuantizer(recipe, weight_amax_reduce=_tp_max_reducer(module))
    if getattr(module, "nvfp4_channel_split", None) is not None:
        full = _SplitMasterQuantizer(full, module)
    if hasattr(member, "_get_model_param_range_map"):   # DistributedOptimizer: this rank's flat shard
        try:
            rng = member._get_model_param_range_map(param)["param"]
            start, end = rng.start, rng.end
        except KeyError:
            start = end = 0        # no elements of this weight on this rank: still joins collectives
        quantizer = _ShardQuantizer(module, recipe, tuple(param.shape), start, end, member.data_parallel_group)
        empty = torch.zeros(0, dtype=torch.float32, device=param.device)

        def get_master():
            if getattr(param, "main_param", None) is not None:   # BF16/FP16 params: FP32 shard copy
                return param.main_param
            if end > start:   # FP32 params: the optimizer steps a view of the param's own shard
                return param.data.view(-1)[start:end]
            return empty
    elif getattr(param, "main_param", None) is not None:
        quantizer, get_master = full, (lambda: param.main_param)
    else:                            # FP32 training: the parameter is its own master
        quantizer, get_master = full, (lambda: param.data)
    return WeightTracker(name, get_master, quantizer, config)


def _member_owns(member, param) -> bool:
    if hasattr(member, "buffers") and hasattr(member, "model_param_gbuf_map"):
        # DistributedOptimizer: model_param_gbuf_map holds only params overlapping this rank's shard;
        # ownership must be the same on every DP rank (they all join the Q_D collectives)
        return any(param in getattr(buffer, "param_index_map", {}) for buffer in member.buffers)
    for group in member.optimizer.param_groups if hasattr(member, "optimizer") else []:
        for p in group["params"]:
            if p is param or getattr(param, "main_param", None) is p:
                return True
    for group in getattr(member, "float16_groups", []):
        if any(p is param for p in group):
            return True
    return False


def install_oscireset(optimizer, model_chunks, recipe: Recipe, train_iters: int, first_update: int = 0,
                      on_reset=None) -> OsciResetHooks:
    """Wrap `optimizer` (Megatron optimizer or ChainedOptimizer) so OsciReset runs on every step."""
    if getattr(optimizer, "_nvfp4_oscireset", None) is not None:
        raise RuntimeError("OsciReset hooks are already installed on this optimizer")
    sched = recipe.stabilizer_schedule(train_iters)
    config = OsciResetConfig(start=sched["oscireset_start"], period=sched["oscireset_period"],
                             window=sched["oscireset_window"], threshold=recipe.oscireset_threshold,
                             variant=recipe.oscireset_variant,
                             sample_percent=recipe.oscireset_sample_percent)
    hooks = OsciResetHooks(config, first_update, on_reset)
    members = _members(optimizer)
    layers = list(_managed_layers(model_chunks))
    for member in members:
        if getattr(getattr(member, "config", None), "use_precision_aware_optimizer", False):
            raise ValueError("OsciReset cannot run with --use-precision-aware-optimizer "
                             "(master weights live inside TE FusedAdam)")
        trackers = [_make_tracker(name, module, member, recipe, config)
                    for name, module in layers if _member_owns(member, module.weight)]
        hooks.trackers[id(member)] = trackers
        _wrap_member(member, hooks)
    _wrap_top(optimizer, hooks)
    optimizer._nvfp4_oscireset = hooks
    log.info("OsciReset installed on %d weights (%s); schedule %s", sum(map(len, hooks.trackers.values())),
             recipe.name, config)
    return hooks


def _wrap_member(member, hooks: OsciResetHooks):
    from ..patches.megatron_optimizer import after_member_update
    after_member_update(member, lambda: hooks.run_member(member))


def _wrap_top(optimizer, hooks: OsciResetHooks):
    from ..patches.megatron_optimizer import wrap_step

    def around(original, *args, **kwargs):
        hooks.current = hooks.applied
        try:
            result = original(*args, **kwargs)
        finally:
            hooks.current = None
        success = result[0] if isinstance(result, tuple) else bool(result)
        if success:
            hooks.applied += 1
        else:
            log.info("OsciReset: optimizer step skipped; update counter stays at %d", hooks.applied)
        return result

    wrap_step(optimizer, around)


def plugin_recipe(model_chunks) -> Optional[Recipe]:
    """The recipe of the model's plugin layers (one per run), or None if it has none."""
    for chunk in model_chunks:
        for module in chunk.modules():
            recipe = getattr(module, "nvfp4_recipe", None)
            if recipe is not None:
                return recipe
    return None


def install_stabilizers(optimizer, model_chunks, train_iters: int, iteration: int = 0):
    """Install what the recipe's stabilizers need on a built Megatron optimizer: OsciReset hooks when
    `recipe.oscireset` (OutControl lives in the layers and needs nothing here). `iteration` is the
    resumed iteration (updates already applied). Returns the OsciResetHooks or None.

    Also declares the run length to `state`, so that schedules given as fractions of the run (the
    layers' OutControl window too) resolve in Megatron's own training loop."""
    recipe = plugin_recipe(model_chunks)
    _last_run.update(model_chunks=list(model_chunks), hooks=None)
    if train_iters > 0:
        from .state import set_train_iters
        set_train_iters(train_iters)
    if recipe is None or not recipe.oscireset:
        return None
    hooks = install_oscireset(optimizer, model_chunks, recipe, train_iters, first_update=iteration,
                              on_reset=_tensorboard_logger())
    _last_run["hooks"] = hooks
    return hooks


_last_run: dict = {}


def stabilizer_report() -> dict:
    """This rank's stabilizer statistics of the run set up last: OsciReset events (per layer: update,
    elements reset and their fraction, median distance ratio) and OutControl selections (per layer:
    outlier count and their share of the recorded input norm)."""
    hooks = _last_run.get("hooks")
    outcontrol = {}
    for chunk in _last_run.get("model_chunks", []):
        for name, module in chunk.named_modules():
            stats = getattr(module, "nvfp4_outcontrol_stats", None)
            if stats is not None:
                outcontrol[getattr(module, "nvfp4_name", name)] = {k: v for k, v in stats.items()
                                                                  if k != "channels_selected"}
    return {"oscireset_events": [] if hooks is None else list(hooks.history), "outcontrol": outcontrol}


def _tensorboard_logger():
    """Log reset statistics to Megatron's TensorBoard writer when one is configured."""
    from .state import tensorboard_writer
    writer = tensorboard_writer()
    if writer is None:
        return None

    def log_reset(layer: str, stats: dict):
        writer.add_scalar(f"nvfp4/oscireset_reset_fraction/{layer}", stats["reset_fraction"], stats["update"])
        writer.add_scalar(f"nvfp4/oscireset_median_ratio/{layer}", stats["median_ratio"], stats["update"])
    return log_reset


# -- checkpoint files ----------------------------------------------------------------------------------

def _state_file(checkpoint_dir: str) -> str:
    import os
    rank = dist.get_rank() if dist.is_initialized() else 0
    return os.path.join(checkpoint_dir, f"nvfp4_oscireset_rank{rank:05d}.pt")


def save_oscireset_state(optimizer, checkpoint_dir: str) -> Optional[str]:
    """Write this rank's OsciReset state (update counter, in-window buffers) beside a checkpoint.
    Rank-local, because a DistributedOptimizer rank tracks only its shard."""
    hooks = getattr(optimizer, "_nvfp4_oscireset", None)
    if hooks is None:
        return None
    import os
    os.makedirs(checkpoint_dir, exist_ok=True)
    path = _state_file(checkpoint_dir)
    torch.save(hooks.state_dict(), path)
    return path


def load_oscireset_state(optimizer, checkpoint_dir: str, iteration: int) -> bool:
    """Restore OsciReset state saved beside a checkpoint (collective: every rank calls it). Without a
    file for this rank (e.g. another layout), the counter resumes from `iteration` and the window in
    progress, if any, is skipped (logged). Returns whether the saved state was restored."""
    hooks = getattr(optimizer, "_nvfp4_oscireset", None)
    if hooks is None:
        return False
    import os
    path = _state_file(checkpoint_dir)
    if os.path.isfile(path):
        hooks.load_state_dict(torch.load(path, weights_only=False))
        return True
    log.info("OsciReset: no saved state at %s; resuming the update counter at %d (a window in "
             "progress is skipped)", path, iteration)
    hooks.load_state_dict({"applied": iteration, "trackers": []})
    return False
