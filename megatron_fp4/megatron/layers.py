"""NVFP4 tensor-parallel linears for Megatron-Core: Column/RowParallelLinear subclasses.

Only `_forward_impl` (the GEMM + its communication) is replaced; init, TP attributes,
`sharded_state_dict`, `_extra_state` and `main_grad` plumbing stay the parent's. The GEMMs run in
the one autograd linear (megatron_fp4.linear.NVFP4LinearFunction) with this module's communication
object, `TPComm`; together they reproduce Megatron's `LinearWithGradAccumulationAndAsyncCommunication`:

- sequence parallel: the input is all-gathered along the sequence before the GEMM. Here each rank
  first quantizes its *own* rows (blocks run along K, the split is along tokens, and the tensor amax
  is MAX-all-reduced over TP first), then all-gathers packed E2M1 codes + E4M3 scales (~4.5 bits per
  element instead of 16); the result is bit-identical to gather-then-quantize. Only the local rows
  are saved; backward re-gathers them for wgrad (the NVIDIA recipe re-gathers the original input,
  as the stock code does, because its wgrad quantizes X^T from high precision);
- dgrad: all-reduce over TP (column-parallel without SP) or reduce-scatter along the sequence (SP),
  launched asynchronously before wgrad as the stock code does; dX itself is never quantized;
- wgrad: FP32 into `weight.main_grad` when gradient-accumulation fusion is on and the param has a
  main_grad (placeholder grad + `grad_added_to_main_grad`, as the stock code), otherwise returned in
  the param dtype. No apex extension is needed.

Operands that are TP-sharded get the MAX all-reduce of their amax (column-parallel: weight and
grad_output, plus the input under SP; row-parallel: weight and input), and random counters get the
rank's global feature offsets, so results do not depend on the TP size.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

from .. import backend
from .. import outcontrol as oc
from ..patches.megatron_tensor_parallel import fusion_available, init_allowing_fusion
from ..linear import LinearCall, LinearComm, NVFP4LinearFunction
from ..recipe import QuantContext, Recipe
from ..rng import TwoPieces, derive_key
from ..tensor import MXFP8Tensor, NVFP4Tensor
from . import state
from .config import check_supported, resolve_recipe

log = logging.getLogger(__name__)

_STOCK_ARG_ORDER = ("bias", "gradient_accumulation_fusion", "allreduce_dgrad", "sequence_parallel",
                    "grad_output_buffer", "wgrad_deferral_limit", "tp_group", "gtp_remat_size")


def _max_reducer(group):
    """MAX all-reduce of a 0-d amax over the TP group (returns a new tensor: callers keep theirs)."""
    def reduce(amax: torch.Tensor) -> torch.Tensor:
        out = amax.detach().float().clone()
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out
    return reduce


def _gather_rows(t: torch.Tensor, group, world: int, async_op: bool = False):
    """All-gather along dim 0 (Megatron's sequence dim); float8 travels as bytes."""
    src = t.contiguous()
    as_bytes = src.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if as_bytes:
        src = src.view(torch.uint8)
    out = torch.empty((src.shape[0] * world, *src.shape[1:]), dtype=src.dtype, device=src.device)
    handle = dist.all_gather_into_tensor(out, src, group=group, async_op=async_op)
    if as_bytes:
        out = out.view(t.dtype)
    return (out, handle) if async_op else out


def gather_nvfp4_rows(t: NVFP4Tensor, group, world: int) -> NVFP4Tensor:
    """All-gather a 1x16-block operand quantized per rank along its rows (the token dim)."""
    if t.block_rows != 1:
        raise ValueError("only 1x16-block operands can be gathered along rows")
    tensor_scale = None
    if t.tensor_scale is not None:
        # identical on all ranks after the amax MAX-reduce, except for the non-finite poison, which is
        # local: a NaN on any rank must poison the gathered operand everywhere
        scales = _gather_rows(t.tensor_scale.reshape(1).float(), group, world)
        tensor_scale = torch.where(torch.isfinite(scales).all(), scales[0],
                                   torch.full((), float("nan"), device=scales.device))
    return NVFP4Tensor(
        packed=_gather_rows(t.packed, group, world),
        block_scales=_gather_rows(t.block_scales, group, world),
        tensor_scale=tensor_scale,
        outer_scales=None if t.outer_scales is None else _gather_rows(t.outer_scales, group, world),
        block_rows=1,
    )


def gather_mxfp8_rows(t: MXFP8Tensor, group, world: int) -> MXFP8Tensor:
    """All-gather an MXFP8 operand (OutControl outlier columns) quantized per rank along its rows."""
    return MXFP8Tensor(data=_gather_rows(t.data, group, world),
                       scale_exponents=_gather_rows(t.scale_exponents, group, world))


class TPComm(LinearComm):
    """The communication of a tensor-parallel call (megatron_fp4.linear's autograd function runs it):

    - sequence parallel: the GEMM input is the sequence all-gathered from the ranks' local rows, as
      packed operands quantized per rank (forward) and re-gathered for wgrad (backward); every
      gather is counted per layer (state.record_comm) against the BF16 bytes it replaces;
    - dgrad: all-reduce over TP (column-parallel without SP) or reduce-scatter along the sequence
      (SP), asynchronous, so it overlaps wgrad;
    - amax: MAX all-reduce for the operands that are TP-sharded (reducers from the layer kind)."""

    def __init__(self, group, world: int, sequence_parallel: bool, allreduce_dgrad: bool, name: str,
                 reducers=(None, None, None)):
        self.group, self.world, self.name = group, world, name
        self.gathers_rows = sequence_parallel
        self.allreduce_dgrad = allreduce_dgrad
        self.input_amax_reduce, self.weight_amax_reduce, self.grad_output_amax_reduce = reducers

    def _record(self, kind: str, quantized_bytes: int, bf16_elements: int):
        state.record_comm(self.name, kind, quantized_bytes, 2 * bf16_elements)

    def output_lead(self, input_lead):
        lead = list(input_lead)
        if self.gathers_rows:
            lead[0] *= self.world
        return lead

    def gather_forward(self, xq, xm):
        if not self.gathers_rows:
            return xq, xm
        if xm is not None:
            xm = gather_mxfp8_rows(xm, self.group, self.world)
        xq = gather_nvfp4_rows(xq, self.group, self.world)
        bf16_elements, sent = xq.packed.numel() * 2, xq.nbytes()
        if xm is not None:
            bf16_elements += xm.data.numel()
            sent += xm.nbytes()
        self._record("fwd_x", sent, bf16_elements)
        return xq, xm

    def gather_input(self, x):
        return _gather_rows(x, self.group, self.world) if self.gathers_rows else x

    def gather_saved(self, x, quantized: bool):
        if not self.gathers_rows:
            return x
        if isinstance(x, NVFP4Tensor):
            x_full = gather_nvfp4_rows(x, self.group, self.world)
            self._record("bwd_x", x_full.nbytes(), x_full.packed.numel() * 2)
            return x_full
        if isinstance(x, tuple):   # OutControl: (NVFP4 FP4 columns, MXFP8 outlier columns)
            xq_full = gather_nvfp4_rows(x[0], self.group, self.world)
            xm_full = gather_mxfp8_rows(x[1], self.group, self.world)
            self._record("bwd_x", xq_full.nbytes() + xm_full.nbytes(),
                         xq_full.packed.numel() * 2 + xm_full.data.numel())
            return xq_full, xm_full
        x_full = _gather_rows(x, self.group, self.world)
        if quantized:   # the original input of a recipe whose wgrad quantizes X^T itself
            self._record("bwd_x_original", x_full.numel() * x_full.element_size(), x_full.numel())
        return x_full

    def reduce_dgrad(self, dx, input_shape):
        if self.allreduce_dgrad:
            return dx, dist.all_reduce(dx, group=self.group, async_op=True)
        if self.gathers_rows:
            grad_input = torch.empty(input_shape, dtype=dx.dtype, device=dx.device)
            return grad_input, dist.reduce_scatter_tensor(grad_input, dx, group=self.group, async_op=True)
        return dx, None


_fallback_ids = itertools.count()


class _NVFP4LinearMixin:
    """Shared by the column and row classes: identity (layer number, name), keys, refusals."""

    _nvfp4_kind = ""

    def _nvfp4_init(self, recipe, is_expert: bool):
        check_supported(self.config, is_expert=is_expert)
        self.nvfp4_recipe: Recipe = resolve_recipe(self.config, recipe)
        # identity: set by NVFP4TransformerLayer (or tag_model) after build; a construction-order id
        # stands in for layer modules built outside a plugin TransformerLayer
        fallback = next(_fallback_ids)
        self.nvfp4_layer_number = 0
        self.nvfp4_name = f"{self._nvfp4_kind}_{fallback}"
        self.nvfp4_bf16 = not self.nvfp4_recipe.quantized
        self._nvfp4_checked = False
        self._nvfp4_iteration = -1
        self._nvfp4_calls = 0
        self._nvfp4_pending = deque()   # keys of checkpointed (no-grad) forwards, for recompute
        self._nvfp4_recomputing = False
        self._nvfp4_counter = state.CallCounter()   # the call index on the device (graph-safe keys)
        self.nvfp4_last_key = None
        if self.nvfp4_recipe.outcontrol:
            self._nvfp4_init_outcontrol()

    # -- OutControl (optimizer-hooks.md §2) ------------------------------------------------------------
    def _nvfp4_init_outcontrol(self):
        """Persistent, replicated state (it travels in checkpoints outside the TP axis map, so a resumed
        run continues exactly): the recorded full-K sums of per-micro-batch column norms (already
        summed over DP and, for row-parallel layers, gathered over TP at every recorded micro-batch),
        how many iterations were recorded and the last one, the frozen outlier mask and whether it
        was selected."""
        device = self.weight.device
        self.register_buffer("nvfp4_outlier_mask", torch.zeros(self.input_size, dtype=torch.bool, device=device))
        self.register_buffer("nvfp4_outliers_selected", torch.zeros(1, dtype=torch.uint8, device=device))
        self.register_buffer("nvfp4_norm_sums", torch.zeros(self.input_size, dtype=torch.float32, device=device))
        # [iterations recorded, last recorded iteration + 1 (0: none), micro-batches recorded]
        self.register_buffer("nvfp4_record_state", torch.zeros(3, dtype=torch.int64, device=device))
        self._nvfp4_split_cache = (None, None)
        self._nvfp4_selected_flag = False     # host copy of the buffer, so forwards need no device sync
        self._nvfp4_record_host = None        # host copy of nvfp4_record_state
        self.nvfp4_outcontrol_stats: Optional[dict] = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._nvfp4_forget_selection())

    def _nvfp4_forget_selection(self):
        self._nvfp4_selected_flag = False
        self._nvfp4_record_host = None
        self._nvfp4_split_cache = (None, None)

    def _nvfp4_selected(self) -> bool:
        if not self._nvfp4_selected_flag:
            self._nvfp4_selected_flag = bool(self.nvfp4_outliers_selected.item())
        return self._nvfp4_selected_flag

    def _nvfp4_local_in_range(self) -> tuple[int, int]:
        raise NotImplementedError

    def nvfp4_channel_split(self) -> Optional[oc.ChannelSplit]:
        """This rank's FP4 / outlier split of its input channels, once selected (else None)."""
        if not self.nvfp4_recipe.outcontrol or not self._nvfp4_selected():
            return None
        key = (self.nvfp4_outlier_mask._version, self.nvfp4_outlier_mask.data_ptr())
        if self._nvfp4_split_cache[0] != key:
            start, end = self._nvfp4_local_in_range()
            mask = self.nvfp4_outlier_mask
            fp4_offset = int((~mask[:start]).sum())   # FP4 channels of lower ranks, in gathered order
            self._nvfp4_split_cache = (key, oc.ChannelSplit.from_mask(mask[start:end].clone(), fp4_offset))
        return self._nvfp4_split_cache[1]

    def _nvfp4_outcontrol_step(self, input, group, world: int, sequence_parallel: bool):
        """Record input column norms during the window; select the outliers once it is complete."""
        if not self.training or self._nvfp4_recomputing or self._nvfp4_selected():
            return
        sched = state.stabilizer_schedule(self.nvfp4_recipe)
        iteration = state.get_iteration()
        if iteration < sched["outcontrol_record_start"]:
            return
        if self._nvfp4_record_host is None:
            self._nvfp4_record_host = [int(v) for v in self.nvfp4_record_state.tolist()]
        recorded, last_plus_one, micro_batches = self._nvfp4_record_host
        if iteration + 1 != last_plus_one and recorded >= sched["outcontrol_record_iters"]:
            self._nvfp4_select_outliers()
            return
        # per micro-batch: the L2 norm over its tokens of every column of the GEMM input as the layer
        # sees it (under SP the column-parallel input is the gathered sequence: squared norms add over
        # ranks), summed over DP ranks; row-parallel layers gather their K shards into full K
        x2d = input.reshape(-1, input.shape[-1]).float()
        squared = (x2d * x2d).sum(dim=0)
        if sequence_parallel and world > 1:
            dist.all_reduce(squared, group=group)
        norms = squared.sqrt()
        dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True) \
            if parallel_state.model_parallel_is_initialized() else None
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(norms, group=dp_group)
        if self._nvfp4_kind == "row" and world > 1:
            parts = [torch.empty_like(norms) for _ in range(world)]
            dist.all_gather(parts, norms.contiguous(), group=group)
            norms = torch.cat(parts)
        with torch.no_grad():
            self.nvfp4_norm_sums += norms
        if iteration + 1 != last_plus_one:
            recorded += 1
        self._nvfp4_record_host = [recorded, iteration + 1, micro_batches + 1]
        self.nvfp4_record_state.copy_(torch.tensor(self._nvfp4_record_host))

    def _nvfp4_select_outliers(self):
        sums = self.nvfp4_norm_sums
        count = oc.outlier_count(sums.numel(), self.nvfp4_recipe.outcontrol_ratio,
                                 self.nvfp4_recipe.outcontrol_k_mode)
        mask = oc.select_outliers(sums, count)
        with torch.no_grad():
            self.nvfp4_outlier_mask.copy_(mask)
            self.nvfp4_outliers_selected.fill_(1)
        self._nvfp4_selected_flag = True
        total = float(sums.sum())
        self.nvfp4_outcontrol_stats = {
            "outliers": count, "channels": sums.numel(),
            "norm_share": float(sums[mask].sum()) / total if total > 0 else 0.0,
            "iteration": state.get_iteration(), "micro_batches": int(self.nvfp4_record_state[2]),
            "channels_selected": mask.nonzero().squeeze(1).tolist()}
        log.info("%s: OutControl keeps %d of %d input channels in MXFP8 (%.1f%% of the recorded input "
                 "norm): %s", self.nvfp4_name, count, sums.numel(), 100 * self.nvfp4_outcontrol_stats["norm_share"],
                 self.nvfp4_outcontrol_stats["channels_selected"])
        writer = state.tensorboard_writer()
        if writer is not None:
            it = self.nvfp4_outcontrol_stats["iteration"]
            writer.add_scalar(f"nvfp4/outcontrol_norm_share/{self.nvfp4_name}",
                              self.nvfp4_outcontrol_stats["norm_share"], it)
            writer.add_text(f"nvfp4/outcontrol_channels/{self.nvfp4_name}",
                            str(self.nvfp4_outcontrol_stats["channels_selected"]), it)

    def set_nvfp4_identity(self, layer_number: int, name: str, bf16: bool = False) -> None:
        """Tag with the global 1-based layer number and canonical name; validate shapes now."""
        self.nvfp4_layer_number = int(layer_number)
        self.nvfp4_name = name
        self.nvfp4_bf16 = bool(bf16) or not self.nvfp4_recipe.quantized
        self._nvfp4_check_shapes()

    def _nvfp4_local_shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _nvfp4_check_shapes(self):
        if self.nvfp4_bf16:
            return
        k, n = self._nvfp4_local_shape()
        try:
            self.nvfp4_recipe.check_shapes(k, n)
        except ValueError as err:
            raise ValueError(
                f"{self.nvfp4_name}: per-TP-rank weight is [{n}, {k}] ({self._nvfp4_kind}-parallel, "
                f"global in={self.input_size}, out={self.output_size}): {err}. Change the model "
                "dims or the TP size, or keep this layer in BF16 (--nvfp4-bf16-modules)") from None
        self._nvfp4_checked = True

    @property
    def nvfp4_quantized(self) -> bool:
        return not self.nvfp4_bf16

    def _nvfp4_next_key(self, device) -> tuple:
        """Per-call stream (static key, device state [iteration, call]): recompute-safe (a recomputed
        forward reuses its checkpointed key and state) and graph-safe (state.py: the state is made and
        the call counter advanced on the device, so a replayed graph reads the replay's iteration and
        call). nvfp4_last_key: the host int the state folds to (eager runs; diagnostics)."""
        iteration = state.get_iteration()
        if iteration != self._nvfp4_iteration:
            self._nvfp4_iteration, self._nvfp4_calls = iteration, 0
            self._nvfp4_pending.clear()
        self._nvfp4_recomputing = False
        if torch.is_grad_enabled() and self._nvfp4_pending:
            self._nvfp4_recomputing = True
            key, call_state, self.nvfp4_last_key = self._nvfp4_pending.popleft()   # backward runs in forward order
            return key, call_state
        dp_rank = 0
        if parallel_state.model_parallel_is_initialized():
            dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        key = state.static_key(self.nvfp4_recipe.seed, self.nvfp4_layer_number, self.nvfp4_name, dp_rank)
        call_state = self._nvfp4_counter.next_state(device)
        self.nvfp4_last_key = derive_key(key, iteration, self._nvfp4_calls)
        self._nvfp4_calls += 1
        if not torch.is_grad_enabled() and self.training:
            # activation checkpointing: forward under no_grad
            self._nvfp4_pending.append((key, call_state, self.nvfp4_last_key))
        return key, call_state

    def _nvfp4_offsets(self, tp_rank: int) -> tuple[int, int]:
        raise NotImplementedError

    def _nvfp4_reducers(self, group, sequence_parallel: bool):
        raise NotImplementedError

    def _forward_impl(self, input, weight, *args, **kwargs):
        kw = dict(zip(_STOCK_ARG_ORDER, args))
        kw.update(kwargs)
        if kw.get("grad_output_buffer") is not None or kw.get("wgrad_deferral_limit") is not None:
            raise NotImplementedError(
                f"{self.nvfp4_name}: deferred wgrad (grad_output_buffer / wgrad_deferral_limit, i.e. "
                "--defer-embedding-wgrad-compute) is not supported by megatron_fp4 layers")
        if kw.get("gtp_remat_size", 1) > 1:
            raise NotImplementedError(f"{self.nvfp4_name}: GTP weight sharding is not supported by "
                                      "megatron_fp4 layers")
        group = kw.get("tp_group") or self.tp_group
        fuse = bool(kw.get("gradient_accumulation_fusion", False))
        switch = state.bf16_switch()          # --nvfp4-bf16-from (None before the switch)
        hp = self.nvfp4_bf16 or switch == "all"
        if hp and (not fuse or fusion_available()):
            return super()._forward_impl(input, weight, *args, **kwargs)   # stock BF16 path
        if not hp and not self._nvfp4_checked:
            self._nvfp4_check_shapes()
        world = dist.get_world_size(group) if group is not None and dist.is_initialized() else 1
        sp = bool(kw.get("sequence_parallel", False))
        reducers = self._nvfp4_reducers(group, sp) if not hp and world > 1 and self.nvfp4_recipe.tp_amax_reduce \
            else (None, None, None)
        comm = TPComm(group, world, sp, bool(kw.get("allreduce_dgrad", False)), self.nvfp4_name, reducers)
        qctx = None
        if not hp:
            rank = dist.get_rank(group) if world > 1 else 0
            in_off, out_off = self._nvfp4_offsets(rank)
            key, call_state = self._nvfp4_next_key(weight.device)
            qctx = QuantContext(key=key, state=call_state, seed=self.nvfp4_recipe.seed,
                                input_amax_reduce=comm.input_amax_reduce, weight_amax_reduce=comm.weight_amax_reduce,
                                grad_output_amax_reduce=comm.grad_output_amax_reduce, in_offset=in_off,
                                out_offset=out_off, backend=backend.current())
        split = None
        if not hp and self.nvfp4_recipe.outcontrol:
            self._nvfp4_outcontrol_step(input, group, world, sp)
            split = self.nvfp4_channel_split()
        call = LinearCall(recipe=None if hp else self.nvfp4_recipe, qctx=qctx, comm=comm, fuse_wgrad=fuse,
                          name=self.nvfp4_name, split=split, forward_bf16=switch == "forward")
        return NVFP4LinearFunction.apply(input, weight, kw.get("bias"), call)

    def backward_dw(self) -> None:
        """Weight gradients are computed in the main backward (delay_wgrad_compute is refused)."""


class NVFP4ColumnParallelLinear(_NVFP4LinearMixin, ColumnParallelLinear):
    """ColumnParallelLinear (weight [out/tp, in]) whose GEMMs follow an NVFP4 recipe.

    `recipe`: a Recipe, a built-in name or a YAML path; default: read from `config.nvfp4_recipe`.
    """

    _nvfp4_kind = "column"

    def __init__(self, input_size, output_size, *, config, recipe=None, is_expert: bool = False, **kwargs):
        init_allowing_fusion(ColumnParallelLinear.__init__, self, config, input_size, output_size,
                              is_expert=is_expert, **kwargs)
        self._nvfp4_init(recipe, is_expert)
        if self.weight is None:
            raise NotImplementedError("megatron_fp4: skip_weight_param_allocation is not supported")

    def _nvfp4_local_shape(self):
        return self.input_size, self.output_size_per_partition

    def _nvfp4_local_in_range(self):
        return 0, self.input_size   # column-parallel: K is not sharded

    def _nvfp4_offsets(self, tp_rank):
        """(K offset, N offset) of this rank's shard in the unsplit operand, for the random counters.

        Megatron builds SwiGLU's fc1 with partition stride 2: each rank holds its shard of the gate
        half and its shard of the up half side by side, i.e. two pieces of the unsplit [gate; up]
        layout; the N offset is then an rng.TwoPieces, so every TP size draws the TP=1 bits
        (tests/megatron: SwiGLU GPT at TP=2 matches TP=1). Other strides keep the contiguous offset:
        valid draws, but not TP-invariant."""
        per_rank = self.output_size_per_partition
        stride = getattr(self.weight, "partition_stride", 1) if self.weight is not None else 1
        if stride == 2 and per_rank % 2 == 0:
            piece = per_rank // 2
            return 0, TwoPieces(offset=tp_rank * piece, split=piece,
                                offset_hi=self.output_size // 2 + tp_rank * piece)
        return 0, tp_rank * per_rank

    def _nvfp4_reducers(self, group, sequence_parallel):
        r = _max_reducer(group)
        # the input is replicated unless SP splits its rows; weight and dY are sharded along N
        return (r if sequence_parallel else None), r, r


class NVFP4RowParallelLinear(_NVFP4LinearMixin, RowParallelLinear):
    """RowParallelLinear (weight [out, in/tp]) whose GEMMs follow an NVFP4 recipe."""

    _nvfp4_kind = "row"

    def __init__(self, input_size, output_size, *, config, recipe=None, is_expert: bool = False, **kwargs):
        init_allowing_fusion(RowParallelLinear.__init__, self, config, input_size, output_size,
                              is_expert=is_expert, **kwargs)
        self._nvfp4_init(recipe, is_expert)

    def _nvfp4_local_shape(self):
        return self.input_size_per_partition, self.output_size

    def _nvfp4_local_in_range(self):
        rank = dist.get_rank(self.tp_group) if self.tp_group is not None and dist.is_initialized() else 0
        return rank * self.input_size_per_partition, (rank + 1) * self.input_size_per_partition

    def _nvfp4_offsets(self, tp_rank):
        return tp_rank * self.input_size_per_partition, 0

    def _nvfp4_reducers(self, group, sequence_parallel):
        r = _max_reducer(group)
        # input and weight are sharded along K; dY arrives full (after the output reduction)
        return r, r, None


NVFP4_LINEAR_TYPES = (NVFP4ColumnParallelLinear, NVFP4RowParallelLinear)
