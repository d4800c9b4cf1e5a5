"""The quantized linear as an autograd function: Y = X W^T (+ b) with all three GEMMs in NVFP4.

Forward quantizes X and W per the recipe and saves the *quantized* operands (packed codes + scales,
about 4.5 bits per element) rather than BF16 copies; the NVIDIA recipe also keeps the original X,
which its wgrad quantizes. Backward draws all its randomness itself (recompute-safe) from the call's
stream key and computes dgrad and wgrad exactly as the recipe's GEMM table says.

The token dimension T (all leading dims of X flattened) needs no padding in forward (blocks run
along K); backward zero-pads T to the recipe's multiple for the wgrad GEMM and strips nothing (dW
does not have a T dim). Features that cannot be blocked raise a clear error.
"""
from __future__ import annotations

import itertools
from typing import Optional, Union

import torch

from . import outcontrol
from .recipe import QuantContext, Recipe
from .registry import load_recipe
from .rng import derive_key


def _check_finite_debug(recipe: Recipe, what: str, t: torch.Tensor):
    if recipe.debug_checks and not torch.isfinite(t).all():
        raise FloatingPointError(f"recipe {recipe.name!r}: non-finite values in {what}")


class NVFP4LinearFunction(torch.autograd.Function):
    """apply(x [..., K], weight [N, K], bias [N] or None, recipe, ctx: QuantContext, main_grad_fusion,
    split: an OutControl ChannelSplit or None)."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, qctx: QuantContext, accumulate_into_main_grad: bool,
                split: Optional[outcontrol.ChannelSplit] = None):
        in_features = weight.shape[1]
        if x.shape[-1] != in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {in_features}")
        x2d = x.reshape(-1, in_features)
        if split is not None:
            y, saved = outcontrol.split_forward(recipe, x2d, weight, split, qctx)
            xq, wq = saved, saved
        else:
            xq = recipe.quantize_input(x2d, qctx, for_gemm=True)
            wq = recipe.quantize_weight(weight, qctx, for_gemm=True)
            y = recipe.fprop(xq, wq, qctx, out_dtype=x.dtype)
        _check_finite_debug(recipe, "forward output", y)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.recipe, ctx.qctx, ctx.split = recipe, qctx, split
        ctx.wq = wq
        ctx.x_saved = x2d if recipe.wgrad_needs_original_input and split is None else xq
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.accumulate_into_main_grad = accumulate_into_main_grad
        ctx.save_for_backward(weight)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensors
        recipe, qctx = ctx.recipe, ctx.qctx
        dy = grad_output.reshape(-1, weight.shape[0])
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.split is not None:
                dx = outcontrol.split_dgrad(recipe, dy, ctx.wq, ctx.split, qctx)
            else:
                dx = recipe.dgrad(dy, ctx.wq, qctx, out_dtype=ctx.x_dtype)
            _check_finite_debug(recipe, "dgrad", dx)
            grad_input = dx.to(ctx.x_dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            if ctx.split is not None:
                dw = outcontrol.split_wgrad(recipe, dy, ctx.x_saved, ctx.split, qctx)
            else:
                dw = recipe.wgrad(dy, ctx.x_saved, qctx)
            _check_finite_debug(recipe, "wgrad", dw)
            if ctx.accumulate_into_main_grad and getattr(weight, "main_grad", None) is not None:
                # Megatron's gradient-accumulation fusion: FP32 dW straight into main_grad
                weight.main_grad.add_(dw.to(weight.main_grad.dtype))
                weight.grad_added_to_main_grad = True
                grad_weight = torch.zeros_like(weight) if getattr(weight, "zero_out_wgrad", False) else None
            else:
                grad_weight = dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy.sum(dim=0).to(grad_output.dtype)
        ctx.wq = ctx.x_saved = None
        return grad_input, grad_weight, grad_bias, None, None, None, None


def nvfp4_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: Recipe,
                 qctx: Optional[QuantContext] = None, accumulate_into_main_grad: bool = False,
                 split: Optional[outcontrol.ChannelSplit] = None) -> torch.Tensor:
    """Functional form. With the bf16 recipe this is a plain linear."""
    if not recipe.quantized:
        return torch.nn.functional.linear(x, weight, bias)
    if x.numel() == 0:
        raise ValueError(f"empty input of shape {tuple(x.shape)}")
    recipe.check_shapes(weight.shape[1], weight.shape[0])
    if split is not None:
        outcontrol.check_recipe(recipe)
        if split.in_features != weight.shape[1]:
            raise ValueError(f"OutControl split covers {split.in_features} channels, weight has {weight.shape[1]}")
    return NVFP4LinearFunction.apply(x, weight, bias, recipe, qctx or QuantContext(seed=recipe.seed),
                                     accumulate_into_main_grad, split)


_layer_ids = itertools.count()


class NVFP4Linear(torch.nn.Module):
    """A drop-in nn.Linear whose three GEMMs follow an NVFP4 recipe (outside Megatron).

    Each forward call gets a fresh random stream key from (seed, layer_id, call index, dp_rank); set
    `step` from the training loop (e.g. the iteration) to make keys resumable without saving state.
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
        self.dp_rank = dp_rank
        self.step = 0
        self.calls = 0

    def forward(self, x):
        key = derive_key(self.recipe.seed, self.step, self.layer_id, self.calls, self.dp_rank)
        self.calls += 1
        return nvfp4_linear(x, self.weight, self.bias, self.recipe,
                            QuantContext(key=key, seed=self.recipe.seed))

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, recipe={self.recipe.name}"
