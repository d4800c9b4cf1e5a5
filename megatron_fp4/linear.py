"""The quantized linear as an autograd function: Y = X W^T (+ b) with all three GEMMs in NVFP4.

One autograd function serves `NVFP4Linear` (one device) and the tensor-parallel Megatron layers
(megatron/layers.py). What differs between them is the communication, which the call hands in as a
`LinearComm`: this module's is the no-op of one device; the Megatron layers' subclass gathers the
sequence (packed FP4 codes and scales, quantized per rank), reduces or reduce-scatters dX and MAX
all-reduces the amax of TP-sharded operands.

Forward quantizes X and W per the recipe and saves the *quantized* operands (packed codes + scales,
about 4.5 bits per element) of the local rows rather than BF16 copies; the NVIDIA recipe keeps the
original X instead, which its wgrad quantizes. Backward re-gathers the saved rows for wgrad (under
sequence parallelism), draws all its randomness itself (recompute-safe) from the call's stream key
and computes dgrad and wgrad exactly as the recipe's GEMM table says; dX is reduced asynchronously
while wgrad runs. With gradient-accumulation fusion the FP32 dW goes straight into `weight.main_grad`.

The token dimension T (all leading dims of X flattened) needs no padding in forward (blocks run
along K); backward zero-pads T to the recipe's multiple for the wgrad GEMM and strips nothing (dW
does not have a T dim). Features that cannot be blocked raise a clear error.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import backend
from . import outcontrol as oc
from . import stats
from .recipe import QuantContext, Recipe
from .registry import load_recipe
from .rng import derive_key


class LinearComm:
    """The communication of one linear call; this base class is one device's: nothing to do.

    Subclasses (megatron/layers.py: TPComm) override the methods. `gathers_rows`: the GEMM input is
    the all-gathered sequence (sequence parallelism); the *_amax_reduce attributes go into the call's
    QuantContext (MAX all-reduce of the amax of TP-sharded operands)."""

    gathers_rows = False
    input_amax_reduce = None
    weight_amax_reduce = None
    grad_output_amax_reduce = None

    def output_lead(self, input_lead: torch.Size) -> list:
        """Leading dims of Y for an input with these leading dims."""
        return list(input_lead)

    def gather_forward(self, xq, xm):
        """(FP4 operand, MXFP8 outlier operand or None) of the local rows -> those of the GEMM."""
        return xq, xm

    def gather_input(self, x: torch.Tensor) -> torch.Tensor:
        """High-precision input of the local rows -> the GEMM's (BF16 layers)."""
        return x

    def gather_saved(self, saved, quantized: bool):
        """What forward saved for wgrad (local rows) -> the wgrad GEMM's operand."""
        return saved

    def reduce_dgrad(self, dx: torch.Tensor, input_shape: torch.Size):
        """(grad_input, handle of an asynchronous reduction to wait for, or None)."""
        return dx, None


NO_COMM = LinearComm()


@dataclass
class LinearCall:
    """The non-tensor arguments of one call of the autograd function."""

    recipe: Optional[Recipe]          # None: high-precision GEMMs (Megatron BF16 layers without apex fusion)
    qctx: Optional[QuantContext]
    comm: LinearComm = NO_COMM
    fuse_wgrad: bool = False          # FP32 dW into weight.main_grad where the weight has one
    name: str = "NVFP4Linear"
    split: Optional[oc.ChannelSplit] = None   # OutControl: FP4 / MXFP8 input channels
    # --nvfp4-bf16-from ... --nvfp4-bf16-from-scope forward: the forward GEMM in high precision (the
    # operands are still quantized: the backward GEMMs use them as the recipe says)
    forward_bf16: bool = False


def _check_finite_debug(call: LinearCall, what: str, t: torch.Tensor):
    if call.recipe.debug_checks and not torch.isfinite(t).all():
        raise FloatingPointError(f"{call.name} (recipe {call.recipe.name!r}): non-finite values in {what}")


def _high_precision_fprop(comm: LinearComm, input: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Y = X W^T in the input's precision over the GEMM's rows (gathered under sequence parallelism), as
    [rows, N] like the recipe's fprop: the forward of --nvfp4-bf16-from-scope forward."""
    return torch.matmul(comm.gather_input(input).reshape(-1, weight.shape[1]), weight.t())


def _main_grad_placeholder(weight, ctx, device):
    """The grad returned for a weight whose dW went into main_grad (Megatron's convention): a
    placeholder when the weight carries `grad_added_to_main_grad` (Megatron's DDP sets it), else None."""
    marked = hasattr(weight, "grad_added_to_main_grad")
    weight.grad_added_to_main_grad = True
    if not marked:
        return None
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    return make(ctx.main_grad.shape, dtype=ctx.input_dtype, device=device)


class NVFP4LinearFunction(torch.autograd.Function):
    """apply(input [..., K] (local rows under sequence parallelism), weight [N, K], bias [N] or None,
    call: LinearCall)."""

    @staticmethod
    def forward(ctx, input, weight, bias, call: LinearCall):
        k, n = weight.shape[1], weight.shape[0]
        if input.shape[-1] != k:
            raise ValueError(f"{call.name}: input has {input.shape[-1]} features, weight expects {k}")
        comm, recipe, qctx = call.comm, call.recipe, call.qctx
        if stats.active:      # quantization statistics (stats.py): name the layer its operands belong to
            stats.set_layer(call.name)
        out_lead = comm.output_lead(input.shape[:-1])
        ctx.main_grad = getattr(weight, "main_grad", None) if call.fuse_wgrad else None
        ctx.call, ctx.use_bias = call, bias is not None
        ctx.input_shape, ctx.input_dtype = input.shape, input.dtype
        if recipe is None:
            y = torch.matmul(comm.gather_input(input), weight.t())
            ctx.x_saved, ctx.wq = input, None
        else:
            x_local = input.reshape(-1, k)
            if x_local.shape[0] == 0:
                raise ValueError(f"{call.name}: empty input of shape {tuple(input.shape)}")
            split = call.split
            xm_local = None
            if split is not None:
                # OutControl: both column sets are quantized on the local rows, then gathered
                xq_local, xm_local = oc.quantize_split_input(recipe, x_local, split, qctx)
            else:
                # without a gather the local rows are the GEMM operand (with one the gathered codes are)
                xq_local = recipe.quantize_input(x_local, qctx, for_gemm=not comm.gathers_rows)
            xq, xm = comm.gather_forward(xq_local, xm_local)
            if split is not None:
                wq_fp4, wm = oc.quantize_split_weight(recipe, weight, split, qctx)
                y = _high_precision_fprop(comm, input, weight) if call.forward_bf16 else \
                    oc.split_fprop(recipe, oc.SplitOperands(xq, xm, wq_fp4, wm), split, qctx)
                # save the local rows of both parts; the saved weight part drops the gathered input
                saved_x, wq = (xq_local, xm_local), oc.SplitOperands(None, None, wq_fp4, wm)
            else:
                wq = recipe.quantize_weight(weight, qctx, for_gemm=True)
                y = _high_precision_fprop(comm, input, weight) if call.forward_bf16 else \
                    recipe.fprop(xq, wq, qctx, out_dtype=input.dtype)
                saved_x = xq_local
            _check_finite_debug(call, "forward output", y)
            y = y.to(input.dtype).reshape(*out_lead, n)
            # local rows only: packed codes (or the original X for recipes whose wgrad needs it)
            ctx.x_saved = x_local if recipe.wgrad_needs_original_input else saved_x
            ctx.wq = wq
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        call: LinearCall = ctx.call
        comm, recipe, qctx, split = call.comm, call.recipe, call.qctx, call.split
        if stats.active:
            stats.set_layer(call.name)
        n, k = weight.shape
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dy = grad_output.reshape(-1, n)

        # wgrad operand: re-gathered along the sequence (as the stock code re-gathers X)
        x_full = comm.gather_saved(ctx.x_saved, quantized=recipe is not None) if need_dw else None

        handle = grad_input = None
        if need_dx:
            if recipe is None:
                dx = dy.matmul(weight)
            else:
                if split is not None:
                    dx = oc.split_dgrad(recipe, dy, ctx.wq, split, qctx)
                else:
                    dx = recipe.dgrad(dy, ctx.wq, qctx, out_dtype=ctx.input_dtype)
                _check_finite_debug(call, "dgrad", dx)
            dx = dx.to(ctx.input_dtype).reshape(*grad_output.shape[:-1], k)
            grad_input, handle = comm.reduce_dgrad(dx, ctx.input_shape)   # overlaps wgrad

        grad_weight = None
        if need_dw:
            if recipe is None:
                x2d = x_full.reshape(-1, k)
                dw = dy.float().t().matmul(x2d.float()) if ctx.main_grad is not None else dy.t().matmul(x2d)
            else:
                if split is not None:
                    saved = oc.SplitOperands(x_full[0], x_full[1], ctx.wq.w_fp4, ctx.wq.w_outlier)
                    dw = oc.split_wgrad(recipe, dy, saved, split, qctx)
                else:
                    dw = recipe.wgrad(dy, x_full, qctx)
                _check_finite_debug(call, "wgrad", dw)
            if ctx.main_grad is not None:
                # gradient-accumulation fusion: FP32 dW straight into main_grad
                ctx.main_grad.add_(dw.to(ctx.main_grad.dtype))
                grad_weight = _main_grad_placeholder(weight, ctx, dy.device)
            else:
                grad_weight = dw.to(weight.dtype)
        grad_bias = dy.sum(dim=0).to(grad_output.dtype) if ctx.use_bias and ctx.needs_input_grad[2] else None
        if handle is not None:
            handle.wait()
        ctx.x_saved = ctx.wq = ctx.main_grad = None
        return grad_input, grad_weight, grad_bias, None


def with_backend(qctx: QuantContext) -> QuantContext:
    """qctx with the process's backend config (backend.current()) where it carries none, so forward
    and backward of the call run on the same one."""
    return qctx if qctx.backend is not None else dataclasses.replace(qctx, backend=backend.current())


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: Recipe,
                 qctx: Optional[QuantContext] = None, accumulate_into_main_grad: bool = False,
                 split: Optional[oc.ChannelSplit] = None) -> torch.Tensor:
    """Functional form on one device. With the bf16 recipe this is a plain linear."""
    if not recipe.quantized:
        return torch.nn.functional.linear(x, weight, bias)
    if x.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(x.shape)}")
    recipe.check_shapes(weight.shape[1], weight.shape[0])
    if split is not None:
        oc.check_recipe(recipe)
        if split.in_features != weight.shape[1]:
            raise ValueError(f"OutControl split covers {split.in_features} channels, weight has {weight.shape[1]}")
    call = LinearCall(recipe=recipe, qctx=with_backend(qctx or QuantContext(seed=recipe.seed)),
                      fuse_wgrad=accumulate_into_main_grad, split=split)
    return NVFP4LinearFunction.apply(x, weight, bias, call)


_layer_ids = itertools.count()


class NVFP4Linear(torch.nn.Module):
    """A drop-in nn.Linear whose three GEMMs follow an NVFP4 recipe (outside Megatron).

    Each forward call draws from the stream derive_key(derive_key(seed, layer_id, dp_rank), step, call)
    (rng.py), with `call` the forward calls since `step` was last set. Set `step` from the training
    loop (e.g. the iteration) to make the draws resumable without saving state.

    Graph-safe: (step, call) live in the non-persistent int64 buffer `stream_state` on the layer's
    device; a forward snapshots it and advances the call on the device, and setting `step` rewrites it
    in place (no host sync). So a forward+backward captured in a CUDA graph draws, at each replay after
    `layer.step = s`, exactly the bits an eager first call at step s draws.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 recipe: Union[str, Recipe] = "quartet2", layer_id: Optional[int] = None,
                 dp_rank: int = 0, device=None, dtype=None):
        super().__init__()
        self.recipe = load_recipe(recipe)
        self.recipe.check_shapes(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.layer_id = next(_layer_ids) if layer_id is None else layer_id
        if dp_rank < 0:
            raise ValueError(f"dp_rank must be >= 0, got {dp_rank}")
        self.dp_rank = dp_rank
        self.register_buffer("stream_state", torch.zeros(2, dtype=torch.int64, device=self.weight.device),
                             persistent=False)
        self._step = 0
        self.calls = 0      # host count of forward calls since `step` was set (the device state's mirror)

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        """Rewrites the device state in place ([value, 0]): a captured graph reads the new step."""
        value = int(value)
        if value < 0:
            raise ValueError(f"step must be >= 0, got {value}")
        self._step, self.calls = value, 0
        self.stream_state[0].fill_(value)
        self.stream_state[1].zero_()

    def stream_key(self) -> int:
        """The host-static part of this layer's stream key."""
        return derive_key(self.recipe.seed, self.layer_id, self.dp_rank)

    def forward(self, x):
        if not self.recipe.quantized:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        call_state = self.stream_state.clone()      # this call's [step, call], on the device
        self.stream_state[1:].add_(1)
        self.calls += 1
        return nvfp4_linear(x, self.weight, self.bias, self.recipe,
                            QuantContext(key=self.stream_key(), state=call_state, seed=self.recipe.seed,
                                         backend=backend.current()))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}"
