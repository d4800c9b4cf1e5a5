"""OsciReset (TetraJet-v2; optimizer-hooks.md §1): find master weights that oscillate between two FP4
grid points while barely moving, and snap them to the grid point the forward pass uses.

Per element, over a window of T optimizer updates (one window per period P, from update S on):

    Dist_FP = sum_t |w_t - w_{t-1}|            Dist_Q = sum_t |Q_D(w_t) - Q_D(w_{t-1})|
    flag    = Dist_FP > 0 and Dist_Q >= thr * Dist_FP
    reset   : w[flag] <- Q_D(w)[flag]          (Adam moments and step count untouched)

Q_D is the active recipe's forward weight quantizer, dequantized, applied to the FP32 master.

This module is optimizer-agnostic: a `WeightTracker` sees one master tensor (a full TP-local weight,
or the flat shard a DistributedOptimizer rank owns) through a `MasterQuantizer`, which knows how to
compute Q_D on exactly that tensor. `ShardedMasterQuantizer` computes Q_D on a flat shard exactly:
Q_D(w)_i depends only on w_i and on maxima over its block / tile / outer block / tensor, so the
shard's partial 16-block maxima are MAX-all-reduced (numel/16 floats) and every derived maximum is
taken from that buffer. The result is bit-identical to Q_D of the unsharded master. For 4/6 the two
candidates' block SSEs are SUM-all-reduced partial sums of FP64 squares of FP32-exact errors, which
are exact in practice, so the sharded choice equals the unsharded one (tests compare bitwise).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import format as fmt
from . import stats
from . import quantizers as Q
from .recipe import QuantContext, Recipe
from .tensor import BLOCK, OUTER_BLOCK

log = logging.getLogger(__name__)

# E2M1 bin width around each magnitude 0, .5, 1, 1.5, 2, 3, 4, 6 (distance between its rounding edges)
_BIN_WIDTH = (0.5, 0.5, 0.5, 0.5, 0.75, 1.0, 1.5, 2.0)


@dataclass
class OsciResetConfig:
    start: int                      # S: first update index whose window may start
    period: int = 200               # P
    window: int = 50                # T
    threshold: float = 8.0          # thr (every released config uses 8)
    variant: str = "full"           # "full" or "memeff" (track the sample closest to a rounding edge)
    sample_percent: float = 10.0    # memeff: tracked share of each weight
    memeff_ignore_start: bool = False  # mirror the release quirk (memeff runs from update 0)

    def validate(self):
        if self.variant not in ("full", "memeff"):
            raise ValueError(f"oscireset variant must be 'full' or 'memeff', got {self.variant!r}")
        if self.start < 0 or self.period < 2 or not 1 <= self.window <= self.period - 2:
            raise ValueError(f"oscireset needs start >= 0 and 1 <= window <= period - 2 "
                             f"(got start={self.start}, period={self.period}, window={self.window})")
        if self.threshold <= 0:
            raise ValueError(f"oscireset threshold must be positive, got {self.threshold}")
        if not 0 < self.sample_percent <= 100:
            raise ValueError(f"oscireset sample_percent must be in (0, 100], got {self.sample_percent}")

    def phase(self, it: int) -> str:
        """What update `it` (0-based index of the update just applied) does: idle/start/accumulate/reset."""
        ignore_start = self.variant == "memeff" and self.memeff_ignore_start
        r = it % self.period
        if it - r < self.start and not ignore_start:  # only windows whose start copy is at >= S
            return "idle"
        if r == 0:
            return "start"
        if r <= self.window:
            return "accumulate"
        if r == self.window + 1:
            return "reset"
        return "idle"


class MasterQuantizer:
    """Q_D on a full (TP-local) master weight [N, K]: the recipe's forward weight quantizer."""

    def __init__(self, recipe: Recipe, weight_amax_reduce=None):
        self.recipe = recipe
        self.ctx = QuantContext(seed=recipe.seed, weight_amax_reduce=weight_amax_reduce)

    def __call__(self, master: torch.Tensor):
        """(Q_D(master), effective scale per element)."""
        stats.set_layer(None)     # an optimizer-side quantization: no GEMM operand statistics (stats.py)
        q = self.recipe.quantize_weight(master, self.ctx)
        scale = q.expanded_block_scales()
        if q.outer_scales is not None:
            scale = scale * q.outer_scales.repeat_interleave(OUTER_BLOCK, dim=1)
        if q.tensor_scale is not None:
            scale = scale * q.tensor_scale
        return q.dequantize(), scale


class ShardedMasterQuantizer:
    """Q_D on a flat FP32 shard [start, end) of a row-major [N, K] master, exact (see module doc).

    group: the DistributedOptimizer's sharding group (MAX/SUM reductions of block statistics);
    weight_amax_reduce: the TP MAX-reduce of the tensor amax for per-tensor recipes.
    """

    def __init__(self, recipe: Recipe, shape, start: int, end: int, group=None, weight_amax_reduce=None):
        self.recipe, self.shape, self.start, self.end = recipe, tuple(shape), start, end
        self.group, self.weight_amax_reduce = group, weight_amax_reduce
        n, k = self.shape
        if k % BLOCK:
            raise ValueError(f"weight of shape {self.shape} cannot be blocked by {BLOCK}")

    def _all_reduce(self, t, op):
        if self.group is not None and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(t, op=op, group=self.group)
        return t

    def __call__(self, shard: torch.Tensor):
        recipe = self.recipe
        n, k = self.shape
        numel = n * k
        device = shard.device
        x = shard.float()
        idx = torch.arange(self.start, self.end, device=device)
        block = idx // BLOCK
        amax16 = torch.zeros(numel // BLOCK, device=device)
        amax16.scatter_reduce_(0, block, x.abs(), reduce="amax")
        self._all_reduce(amax16, dist.ReduceOp.MAX)
        if recipe.family == "tetrajet2":
            return self._double_block(x, idx, block, amax16)
        if recipe.family in ("quartet2", "nvidia"):
            return self._per_tensor(x, idx, block, amax16)
        raise ValueError(f"OsciReset has no weight quantizer for recipe family {recipe.family!r}")

    def _double_block(self, x, idx, block, amax16):
        recipe = self.recipe
        if recipe.outer_block == "tensor":
            outer = amax16.amax()
            if self.weight_amax_reduce is not None:
                outer = self.weight_amax_reduce(outer)
            outer = outer.expand(amax16.shape)
        else:
            outer = amax16.view(-1, OUTER_BLOCK // BLOCK).amax(dim=1).repeat_interleave(OUTER_BLOCK // BLOCK)
        s_in, s_out, divisor, _ = Q.double_block_scales(amax16, outer, 6.0)
        codes = Q.encode_rn(x / divisor[block], recipe.rtn_ties)
        return (fmt.decode_e2m1(codes) * s_in[block]) * s_out[block], s_in[block] * s_out[block]

    def _per_tensor(self, x, idx, block, amax16):
        recipe = self.recipe
        n, k = self.shape
        tiles = recipe.family == "nvidia"
        smax = Q.FOUR_OVER_SIX_SMAX if recipe.four_over_six else fmt.E4M3_MAX
        amax = amax16.amax()
        if self.weight_amax_reduce is not None:
            amax = self.weight_amax_reduce(amax)
        g, valid = Q._tensor_scale(amax, smax, 6.0)
        if tiles:  # 16x16 tiles: the max over the 16 rows of each 1x16 column block
            stat = amax16.view(n // BLOCK, BLOCK, k // BLOCK).amax(dim=1)
            unit = ((idx // k) // BLOCK) * (k // BLOCK) + (idx % k) // BLOCK
            stat = stat.reshape(-1)
        else:
            stat, unit = amax16, block

        def candidate(target):
            scale, divisor, _ = Q.nvfp4_block_scales(stat, target, g, valid)
            codes = Q.encode_rn(x / divisor[unit], recipe.rtn_ties)
            return fmt.decode_e2m1(codes) * scale[unit], scale

        q6, scale6 = candidate(6.0)
        if not recipe.four_over_six:
            return q6 * g, scale6[unit] * g
        q4, scale4 = candidate(4.0)
        sse = torch.zeros(2, stat.numel(), dtype=torch.float64, device=x.device)
        sse[0].index_add_(0, unit, Q.four_over_six_sse(x, q6, g))
        sse[1].index_add_(0, unit, Q.four_over_six_sse(x, q4, g))
        self._all_reduce(sse, dist.ReduceOp.SUM)
        use4 = (sse[1] < sse[0])[unit]
        q = torch.where(use4, q4, q6)
        return q * g, torch.where(use4, scale4[unit], scale6[unit]) * g


def edge_score(master: torch.Tensor, qd: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """|w/s - q| / binwidth(q): 0 at a grid point, 0.5 at a rounding edge (memeff sampling score)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale > 0, qd / safe, torch.zeros_like(qd))
    code = fmt.round_to_e2m1_code(q.abs())
    width = fmt.device_constant(tuple(_BIN_WIDTH), device=master.device)[code.long()]
    return torch.where(scale > 0, (master / safe - q).abs() / width, torch.zeros_like(q))


class WeightTracker:
    """OsciReset state of one master tensor (full weight or flat shard)."""

    def __init__(self, name: str, get_master: Callable[[], torch.Tensor], quantizer, config: OsciResetConfig):
        self.name, self.get_master, self.quantizer, self.config = name, get_master, quantizer, config
        self.window_start: Optional[int] = None
        self.index = self.w_prev = self.q_prev = self.dist_fp = self.dist_q = None
        self.last_stats: Optional[dict] = None

    def _view(self, t):
        return t.reshape(-1) if self.index is None else t.reshape(-1)[self.index]

    def on_update(self, it: int) -> Optional[dict]:
        """Advance after update `it`; returns reset statistics at the end of a window, else None."""
        phase = self.config.phase(it)
        if phase == "start":
            self._start(it)
            return None
        if phase == "idle":
            return None
        if self.window_start != it - it % self.config.period:
            # no start copy for this window: the run was resumed inside it (spec §1.6)
            if it % self.config.period == 1:
                log.info("OsciReset %s: window of update %d has no start copy (resumed mid-window); "
                         "skipping its reset", self.name, it - 1)
            return None
        if phase == "accumulate":
            self._accumulate()
            return None
        return self._reset(it)

    def _start(self, it):
        master = self.get_master()
        qd, scale = self.quantizer(master)
        self.index = None
        if self.config.variant == "memeff":
            score = edge_score(master.float(), qd, scale).reshape(-1)
            count = max(1, int(round(score.numel() * self.config.sample_percent / 100)))
            self.index = torch.topk(score, count, sorted=False).indices.sort().values.to(torch.int32)
        self.w_prev = self._view(master.float()).clone()
        self.q_prev = self._view(qd).clone()
        self.dist_fp = torch.zeros_like(self.w_prev)
        self.dist_q = torch.zeros_like(self.w_prev)
        self.window_start = it

    def _accumulate(self):
        master = self.get_master()
        qd, _ = self.quantizer(master)
        w, q = self._view(master.float()), self._view(qd)
        self.dist_fp += (w - self.w_prev).abs()
        self.dist_q += (q - self.q_prev).abs()
        self.w_prev, self.q_prev = w.clone(), q.clone()

    def _reset(self, it):
        master = self.get_master()
        qd, scale = self.quantizer(master)
        flagged = (self.dist_fp > 0) & (self.dist_q >= self.config.threshold * self.dist_fp)
        # elements without an FP4 scale (OutControl's MXFP8 columns, flushed blocks) are never reset
        flagged &= self._view(scale) > 0
        flat = master.view(-1)
        positions = flagged.nonzero().squeeze(1)
        if self.index is not None:
            positions = self.index[positions].long()
        flat[positions] = qd.reshape(-1)[positions].to(flat.dtype)
        ratio = self.dist_q / torch.where(self.dist_fp > 0, self.dist_fp, torch.ones_like(self.dist_fp))
        stats = {"update": it, "tracked": int(self.dist_fp.numel()), "reset": int(positions.numel()),
                 "numel": int(flat.numel()),
                 "median_ratio": float(ratio[self.dist_fp > 0].median()) if bool((self.dist_fp > 0).any()) else 0.0}
        stats["reset_fraction"] = stats["reset"] / max(stats["numel"], 1)
        self.index = self.w_prev = self.q_prev = self.dist_fp = self.dist_q = None
        self.window_start = None
        self.last_stats = stats
        return stats

    # -- checkpointing -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The in-window state of this tracker (rank-local under the distributed optimizer).

        w_prev and q_prev are not saved: at a checkpoint they equal the saved master and its Q_D,
        which `load_state_dict` recomputes from the loaded master."""
        if self.window_start is None:
            return {"window_start": None}
        return {"window_start": self.window_start, "dist_fp": self.dist_fp.clone(),
                "dist_q": self.dist_q.clone(), "index": None if self.index is None else self.index.clone(),
                "numel": int(self.get_master().numel())}

    def load_state_dict(self, state: dict) -> bool:
        """Restore a window; returns False (and abandons the window, logged) when the saved state
        does not fit this tracker's master (e.g. a different data-parallel layout). Collective under
        the distributed optimizer: every rank must call it."""
        self.window_start = self.index = self.w_prev = self.q_prev = self.dist_fp = self.dist_q = None
        master = self.get_master()
        qd, _ = self.quantizer(master)   # collective for sharded masters: computed on every rank
        if state.get("window_start") is None:
            return True
        if state.get("numel") != master.numel():
            log.info("OsciReset %s: saved window does not match this layout; restarting at the next window",
                     self.name)
            return False
        self.index = state["index"]
        self.w_prev = self._view(master.float()).clone()
        self.q_prev = self._view(qd).clone()
        self.dist_fp, self.dist_q = state["dist_fp"].clone(), state["dist_q"].clone()
        self.window_start = state["window_start"]
        return True
