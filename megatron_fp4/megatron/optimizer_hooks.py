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
    """Q_D of an OutControl layer's full master: FP4 columns in gathered order; outliers excluded."""

    def __init__(self, base: MasterQuantizer, split):
        self.base, self.split = base, split

    def __call__(self, master):
        fp4, _ = self.split.gather(master.float())
        qd_fp4, scale_fp4 = self.base(fp4)
        qd = master.float().clone()
        scale = torch.zeros_like(qd)
        n_fp4 = self.split.fp4_index.numel()
        qd[:, self.split.fp4_index] = qd_fp4[:, :n_fp4]
        scale[:, self.split.fp4_index] = scale_fp4[:, :n_fp4]
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
            if getattr(module, "mfp4_quantized", False) and getattr(module, "weight", None) is not None:
                yield getattr(module, "mfp4_name", name), module


def _make_tracker(name, module, member, recipe: Recipe, config: OsciResetConfig) -> WeightTracker:
    param = module.weight
    split_fn = getattr(module, "mfp4_channel_split", None)
    split = split_fn() if split_fn is not None else None
    full = MasterQuantizer(recipe, weight_amax_reduce=_tp_max_reducer(module))
    if split is not None:
        full = _SplitMasterQuantizer(full, split)
    if getattr(param, "main_param_sharded", False):
        try:
            rng = member._get_model_param_range_map(param)["param"]
            start, end = rng.start, rng.end
        except KeyError:
            start = end = 0        # no elements of this weight on this rank: still joins collectives
        group = member.data_parallel_group
        if split is not None:
            quantizer = _GatheringShardQuantizer(full, tuple(param.shape), start, end, group)
        else:
            quantizer = ShardedMasterQuantizer(recipe, tuple(param.shape), start, end, group=group,
                                               weight_amax_reduce=_tp_max_reducer(module))
        empty = torch.zeros(0, dtype=torch.float32, device=param.device)
        get_master = (lambda: param.main_param if param.main_param is not None else empty)
    elif getattr(param, "main_param", None) is not None:
        quantizer, get_master = full, (lambda: param.main_param)
    else:                            # FP32 training: the parameter is its own master
        quantizer, get_master = full, (lambda: param.data)
    return WeightTracker(name, get_master, quantizer, config)


def _member_owns(member, param) -> bool:
    if hasattr(member, "model_param_gbuf_map"):
        return param in member.model_param_gbuf_map
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
    if getattr(optimizer, "_mfp4_oscireset", None) is not None:
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
    optimizer._mfp4_oscireset = hooks
    log.info("OsciReset installed on %d weights (%s); schedule %s", sum(map(len, hooks.trackers.values())),
             recipe.name, config)
    return hooks


def _wrap_member(member, hooks: OsciResetHooks):
    original_step = member.step_with_ready_grads
    in_step = {"flag": False}

    def step_with_ready_grads(*args, **kwargs):
        in_step["flag"] = True
        try:
            result = original_step(*args, **kwargs)
        finally:
            in_step["flag"] = False
        if not hasattr(member, "_copy_main_params_to_model_params"):
            hooks.run_member(member)   # FP32Optimizer: the params are the masters
        return result

    member.step_with_ready_grads = step_with_ready_grads
    if hasattr(member, "_copy_main_params_to_model_params"):
        original_copy = member._copy_main_params_to_model_params

        def copy_main_params_to_model_params(*args, **kwargs):
            if in_step["flag"]:
                hooks.run_member(member)
            return original_copy(*args, **kwargs)

        member._copy_main_params_to_model_params = copy_main_params_to_model_params


def _wrap_top(optimizer, hooks: OsciResetHooks):
    original = optimizer.step

    def step(*args, **kwargs):
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

    optimizer.step = step


def plugin_recipe(model_chunks) -> Optional[Recipe]:
    """The recipe of the model's plugin layers (one per run), or None if it has none."""
    for chunk in model_chunks:
        for module in chunk.modules():
            recipe = getattr(module, "mfp4_recipe", None)
            if recipe is not None:
                return recipe
    return None


def install_stabilizers(optimizer, model_chunks, train_iters: int, iteration: int = 0):
    """Install what the recipe's stabilizers need on a built Megatron optimizer: OsciReset hooks when
    `recipe.oscireset` (OutControl lives in the layers and needs nothing here). `iteration` is the
    resumed iteration (updates already applied). Returns the OsciResetHooks or None."""
    recipe = plugin_recipe(model_chunks)
    if recipe is None or not recipe.oscireset:
        return None
    return install_oscireset(optimizer, model_chunks, recipe, train_iters, first_update=iteration,
                             on_reset=_tensorboard_logger())


def _tensorboard_logger():
    """Log reset statistics to Megatron's TensorBoard writer when one is configured."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer
        writer = get_tensorboard_writer()
    except Exception:   # megatron.training not initialised (CPU driver, tests)
        writer = None
    if writer is None:
        return None

    def log_reset(layer: str, stats: dict):
        writer.add_scalar(f"mfp4/oscireset_reset_fraction/{layer}", stats["reset_fraction"], stats["update"])
        writer.add_scalar(f"mfp4/oscireset_median_ratio/{layer}", stats["median_ratio"], stats["update"])
    return log_reset
