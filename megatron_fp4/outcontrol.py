"""OutControl (TetraJet-v2; optimizer-hooks.md §2, numerics.md §6.2): keep the input channels with
the largest activation norms in MXFP8 and quantize the rest with the recipe's NVFP4 quantizers.

Selection: during a recording window each layer sums, per micro-batch, the L2 norm of every input
column of its GEMM input; at the end the top-k channels (descending, ties to the lower index) form a
frozen boolean mask. The GEMMs then split the input channels K into an FP4 set and an outlier set,
each gathered in ascending channel order (blocks form in that order):

    fwd   : Y = NVFP4(X[:, fp4]) NVFP4(W[:, fp4])^T + MXFP8(X[:, out]) MXFP8(W[:, out])^T   (one FP32 sum)
    dgrad : all FP4: W_hat^T is rebuilt from both dequantized parts, then the recipe's dgrad
    wgrad : dW[:, fp4] by the recipe's wgrad; dW[:, out] = MXFP8(dY^T along T) MXFP8(X_hat_out^T along T)

The FP4 set is zero-padded to a multiple of 128 and the outlier set to a multiple of 32 (zeros change
no amax and add nothing to the products), so any k works.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import quantizers as Q
from .gemm import matmul_mxfp8
from .recipe import QuantContext, Recipe, pad_cols
from .tensor import MXFP8Tensor, NVFP4Tensor

FP4_PAD = 128
MXFP8_PAD = 32


def outlier_count(k: int, ratio: float, mode: str = "exact") -> int:
    """k = round(ratio K) ("exact", default) or the released kernels' multiple of 128 ("release128")."""
    if mode == "exact":
        return int(round(ratio * k))
    if mode == "release128":
        return min((k // 128) * 128, math.ceil(math.floor(ratio * k) / 128) * 128)
    raise ValueError(f"outcontrol_k_mode must be 'exact' or 'release128', got {mode!r}")


def select_outliers(column_norm_sums: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` largest entries (descending, ties broken by the lower index)."""
    k = column_norm_sums.numel()
    # stable sort on the negated values keeps ascending index order among equal values
    order = torch.sort(-column_norm_sums.double(), stable=True).indices
    mask = torch.zeros(k, dtype=torch.bool, device=column_norm_sums.device)
    mask[order[:count]] = True
    return mask


@dataclass
class ChannelSplit:
    """The FP4 / outlier split of one GEMM's (local) input channels."""

    fp4_index: torch.Tensor      # ascending local channel indices in NVFP4
    outlier_index: torch.Tensor  # ascending local channel indices in MXFP8
    in_features: int
    fp4_offset: int = 0          # global position of this rank's first FP4 channel in gathered order

    @classmethod
    def from_mask(cls, mask: torch.Tensor, fp4_offset: int = 0) -> "ChannelSplit":
        idx = torch.arange(mask.numel(), device=mask.device)
        return cls(idx[~mask], idx[mask], mask.numel(), fp4_offset)

    def gather(self, t: torch.Tensor):
        """(FP4 part padded to 128 columns, outlier part padded to 32 columns) of [rows, K]."""
        return (pad_cols(t.index_select(1, self.fp4_index), FP4_PAD),
                pad_cols(t.index_select(1, self.outlier_index), MXFP8_PAD))

    def scatter(self, fp4_part: torch.Tensor, outlier_part: torch.Tensor) -> torch.Tensor:
        """Inverse of gather (padding stripped): [rows, K]."""
        out = fp4_part.new_zeros(fp4_part.shape[0], self.in_features)
        out[:, self.fp4_index] = fp4_part[:, : self.fp4_index.numel()]
        out[:, self.outlier_index] = outlier_part[:, : self.outlier_index.numel()].to(out.dtype)
        return out


@dataclass
class SplitOperands:
    """What the split forward saves for backward."""

    x_fp4: object                 # recipe's saved FP4 input (NVFP4Tensor, or original X for NVIDIA)
    x_outlier: MXFP8Tensor
    w_fp4: NVFP4Tensor
    w_outlier: MXFP8Tensor


def split_context(ctx: QuantContext, split: ChannelSplit) -> QuantContext:
    """The FP4 part's context: input features are counted in gathered FP4 order."""
    return QuantContext(key=ctx.key, seed=ctx.seed, state=ctx.state, input_amax_reduce=ctx.input_amax_reduce,
                        weight_amax_reduce=ctx.weight_amax_reduce,
                        grad_output_amax_reduce=ctx.grad_output_amax_reduce,
                        in_offset=split.fp4_offset, out_offset=ctx.out_offset, backend=ctx.backend)


def check_recipe(recipe: Recipe):
    if recipe.family not in ("tetrajet2", "quartet2"):
        raise ValueError(f"OutControl needs a recipe whose dgrad re-quantizes W from its dequantized "
                         f"forward values (tetrajet2, quartet2); {recipe.name!r} is {recipe.family}")


def quantize_split_input(recipe: Recipe, x2d: torch.Tensor, split: ChannelSplit, ctx: QuantContext):
    """(NVFP4 of the gathered FP4 columns, MXFP8 of the gathered outlier columns) of an input."""
    check_recipe(recipe)
    x_fp4, x_out = split.gather(x2d)
    return recipe.quantize_input(x_fp4, split_context(ctx, split)), Q.quantize_mxfp8(x_out)


def quantize_split_weight(recipe: Recipe, weight: torch.Tensor, split: ChannelSplit, ctx: QuantContext):
    check_recipe(recipe)
    w_fp4, w_out = split.gather(weight)
    return recipe.quantize_weight(w_fp4, split_context(ctx, split)), Q.quantize_mxfp8(w_out)


def split_fprop(recipe: Recipe, saved: SplitOperands, split: ChannelSplit, ctx: QuantContext) -> torch.Tensor:
    """Y = NVFP4 part + MXFP8 part, accumulated in FP32 before the single output cast."""
    return (recipe.fprop(saved.x_fp4, saved.w_fp4, split_context(ctx, split))
            + matmul_mxfp8(saved.x_outlier, saved.w_outlier))


def split_forward(recipe: Recipe, x2d: torch.Tensor, weight: torch.Tensor, split: ChannelSplit,
                  ctx: QuantContext):
    """Forward GEMM with the channel split: (Y in FP32, SplitOperands)."""
    xq, xm = quantize_split_input(recipe, x2d, split, ctx)
    wq, wm = quantize_split_weight(recipe, weight, split, ctx)
    saved = SplitOperands(xq, xm, wq, wm)
    return split_fprop(recipe, saved, split, ctx), saved


def split_dgrad(recipe: Recipe, dy: torch.Tensor, saved: SplitOperands, split: ChannelSplit, ctx: QuantContext):
    """dgrad entirely in FP4 from W_hat rebuilt from both dequantized parts (numerics.md §6.2)."""
    w_hat = split.scatter(saved.w_fp4.dequantize(), saved.w_outlier.dequantize())
    return recipe.dgrad_dense(dy, w_hat, ctx)


def split_wgrad(recipe: Recipe, dy: torch.Tensor, saved: SplitOperands, split: ChannelSplit, ctx: QuantContext):
    """dW[:, fp4] by the recipe; dW[:, out] = MXFP8(dY^T) x MXFP8(X_hat_out^T), both along T (padded to 32)."""
    dw_fp4 = recipe.wgrad(dy, saved.x_fp4, split_context(ctx, split))
    dyt = pad_cols(dy.t().float(), MXFP8_PAD)
    xt = pad_cols(saved.x_outlier.dequantize().t(), MXFP8_PAD)
    dw_out = matmul_mxfp8(Q.quantize_mxfp8(dyt), Q.quantize_mxfp8(xt))
    return split.scatter(dw_fp4, dw_out)


class ColumnNormRecorder:
    """Sums per-micro-batch L2 norms of the GEMM input's columns, in FP32."""

    def __init__(self, in_features: int, device=None):
        self.sums = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.micro_batches = 0

    def record(self, x2d: torch.Tensor):
        self.sums += torch.linalg.vector_norm(x2d.float(), dim=0)
        self.micro_batches += 1
