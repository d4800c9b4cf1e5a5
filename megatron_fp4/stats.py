"""Per-operand quantization statistics (issue #19 items 2-3): what every quantized GEMM operand of
every plugin linear looked like on a statistics iteration, and where a non-finite value first appeared.

Why here: the quantizer entries of kernels/dispatch.py are the one place that sees every NVFP4
operand together with the tensor it was made from (on every backend: a kernel's result equals the
twin's), so dispatch wraps each entry with `observing` and this module needs nothing above the
numerics. The autograd linear (linear.py) names the layer (`set_layer`), the Megatron layer of
state.set_iteration switches collection on (`on_iteration`), and megatron/quant_stats.py writes and
logs what `collect()` returns.

Cost: off (interval 0, the default) or on any other iteration the wrappers test one module flag,
`active`. On a statistics iteration each observation costs 6-13 small device operations and no host
sync (the amax, the saturated count, the sampled rows of the source and of the operand); `collect()`
computes the errors and MS-EDEN corrections batched over the observations of one shape (a few dozen
operations per group, not per operand) and reads them back once per group.

Definitions (per operand, i.e. per quantizer call; one layer's calls of an iteration, e.g. its
micro-batches, are pooled: counts and squared norms add, extremes combine):
- source A: the tensor the quantizer entry receives, before its own Hadamard rotation (X, W, dY;
  for the operands re-quantized from a saved forward operand, that operand's represented values
  q*s*g; NVIDIA's wgrad operands are rotated by the recipe before its quantizer is called, so theirs
  is the rotated tensor). The quantized operand Q has rows [R, C]; its z = rht(pad(A rows)) (or A).
- amax: max |A| over the whole source (NaN / Inf when it holds one).
- flushed_fraction: blocks of Q whose E4M3 scale is 0 although the block of z is not all zero
  (the quantizer's own count, `NVFP4Tensor.flushed_blocks`), over all blocks of Q (16x16 tiles count
  once; blocks of zero padding count as blocks). An exact zero block is not flushed.
- saturated_fraction: block scales of Q stored at E4M3's largest value, 448, over all blocks. Where
  it is expected: TetraJet-v2's double blocks put the block holding each 128-block's maximum there
  (so at least 1/8), the NVIDIA forward / SR operands (Smax 448) the blocks at the tensor amax;
  Quartet II's forward (4/6, Smax 256) never reaches it, its MS-EDEN operands (Smax 255.99) only where
  the correction pushes a scale up to it.
- clamped_fraction: MS-EDEN corrected scales clamped at 448 (the quantizer's count; numerics.md §7.7:
  non-zero indicates a bug), None for other quantizers.
- rel_error: ||dequant(Q) - z|| / ||z|| over SAMPLE_ROWS fixed rows of Q (evenly spaced, first and
  last included), z computed from those rows of A the way the twin does (pad, rotate).
- eden_correction_min / _max: range of the MS-EDEN correction factors S = sum u^2 / sum u q
  (numerics.md §5.2 per 128-group, §5.3 per 16-block; u the block-normalised z before correction,
  q the operand's codes) over the sampled rows, groups whose sum u q is not a normal positive number
  left out (the quantizer uses 1 there); None for other quantizers or when no group qualifies.
- non-finite: an operand whose amax is not finite. `collect` returns the first such operand in
  execution order (forward operands before backward ones, layers in the order they ran).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import torch

from . import format as fmt
from . import quantizers as Q
from .hadamard import hadamard_matrix
from .tensor import BLOCK, OUTER_BLOCK, NVFP4Tensor

SAMPLE_ROWS = 8
E4M3_MAX_BITS = 0x7E      # 448 = 0 1111 110 (0x7F is NaN in float8_e4m3fn)
FIELDS = ("amax", "flushed_fraction", "saturated_fraction", "clamped_fraction", "rel_error",
          "eden_correction_min", "eden_correction_max")

# The dispatch site operand name (recipe.py passes it) -> "<gemm> <operand>" of the recipe's GEMM table
# (recipe.operand_table(): gemm, operand).
OPERAND_NAMES = {
    "forward X": "fprop X", "forward W": "fprop W", "forward W (16x16 tiles)": "fprop W",
    "dgrad E": "dgrad E", "dgrad W^T": "dgrad W^T", "dgrad W_hat^T": "dgrad W^T",
    "wgrad E^T": "wgrad E^T", "wgrad X^T": "wgrad X^T",
}

# -- module state (read on every quantizer call: keep it to plain globals) ------------------------
active = False            # collect on this iteration
layer: Optional[str] = None    # the linear whose forward / backward runs now (linear.py sets it)
_interval = 0
_iteration: Optional[int] = None
_collected: Optional[int] = None   # the last iteration collect() returned
_pending: list = []               # (layer, operand, Observation)


def configure(interval: int) -> None:
    """Statistics every `interval` iterations (the log's 1-based numbering); 0 turns them off."""
    global _interval, active, _iteration, _collected
    if int(interval) < 0:
        raise ValueError(f"the statistics interval must be >= 0, got {interval}")
    _interval, active, _iteration, _collected = int(interval), False, None, None
    _pending.clear()


def interval() -> int:
    return _interval


def on_iteration(iteration: int) -> None:
    """The training loop starts (or, per micro-batch, continues) iteration `iteration` (1-based).
    Collection runs on multiples of the interval, once: an iteration already collected (e.g. its
    evaluation after the log line) is not collected again."""
    global active, _iteration
    if iteration == _iteration:
        return
    _iteration = iteration
    active = bool(_interval) and iteration % _interval == 0 and iteration != _collected
    if not active:
        _pending.clear()


def set_layer(name: Optional[str]) -> None:
    global layer
    layer = name


# -- pure statistics ------------------------------------------------------------------------------

def sample_rows(rows: int, count: int = SAMPLE_ROWS) -> list:
    """Evenly spaced row indices, first and last included (all rows when there are fewer)."""
    if rows <= count:
        return list(range(rows))
    return sorted({round(i * (rows - 1) / (count - 1)) for i in range(count)})


_INDEX: dict = {}


def _index(rows: list, device) -> torch.Tensor:
    """`rows` as a long tensor on `device`, made once per (rows, device): building it from a list is a
    host-to-device copy from pageable memory, which waits for the GPU's queue (a sync per operand made
    a statistics iteration cost 2-3 steps on the H100, docs/RESULTS.md)."""
    key = (tuple(rows), str(device))
    idx = _INDEX.get(key)
    if idx is None:
        idx = _INDEX[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return idx


class Observation:
    """What one operand leaves for collect(): a few small device tensors taken at the quantizer call
    (the sampled source rows, the operand's sampled packed rows and scales, its amax and counts); the
    errors and corrections are computed in collect(), batched over observations of one shape."""
    __slots__ = ("amax", "flushed", "clamped", "saturated", "blocks", "src", "cols", "sigma", "packed",
                 "scales", "outer", "tensor_scale", "block_rows", "eden")

    def __init__(self, q: NVFP4Tensor, amax: torch.Tensor, src_rows: torch.Tensor, sigma, rows: list,
                 eden: Optional[tuple]):
        idx = _index(rows, q.device)
        self.amax = amax
        self.flushed, self.clamped = q.flushed_blocks, q.clamped_scales
        self.saturated = ((q.block_scales.view(torch.uint8) & 0x7F) == E4M3_MAX_BITS).sum()
        self.blocks = q.block_scales.numel()
        self.src, self.cols, self.sigma = src_rows, q.shape[1], sigma
        self.packed = q.packed.index_select(0, idx)
        self.block_rows = q.block_rows
        self.scales = q.block_scales.index_select(
            0, idx if q.block_rows == 1 else _index([r // q.block_rows for r in rows], q.device))
        self.outer = q.outer_scales.index_select(0, idx) if q.outer_scales is not None else None
        self.tensor_scale = q.tensor_scale
        self.eden = eden

    def group_key(self) -> tuple:
        return (str(self.amax.device), tuple(self.src.shape), self.cols, 0 if self.sigma is None else self.sigma.numel(),
                self.outer is not None, self.tensor_scale is not None, self.eden)


def _stack(tensors: list) -> torch.Tensor:
    return torch.stack([t.reshape(()) if t.dim() == 0 else t for t in tensors])


def _group_values(obs: list) -> torch.Tensor:
    """float64 [len(obs), 8] for observations of one group_key: amax, flushed, saturated, clamped (-1:
    none), error^2, reference^2, EDEN min (+inf: none), EDEN max (-inf: none). (The block counts are
    host numbers: collect() inserts them.)"""
    first = obs[0]
    dev = first.amax.device
    m = len(obs)
    src = torch.stack([o.src for o in obs]).float()                       # [m, n, C_src]
    if src.shape[-1] < first.cols:
        src = torch.nn.functional.pad(src, (0, first.cols - src.shape[-1]))
    if first.sigma is not None:                                           # z = rht(src rows, sigma), per obs
        k = first.sigma.numel()
        sig = torch.stack([o.sigma.to(dev, torch.float32).reshape(-1) for o in obs])     # [m, k]
        chunks = src.reshape(m, src.shape[1], first.cols // k, k) * sig[:, None, None, :]
        z = (chunks @ hadamard_matrix(k, torch.float32, dev)).reshape(src.shape)
    else:
        z = src
    codes = fmt.unpack_e2m1(torch.stack([o.packed for o in obs]))        # [m, n, C]
    deq = fmt.decode_e2m1(codes) * torch.stack([o.scales for o in obs]).float().repeat_interleave(BLOCK, dim=2)
    if first.outer is not None:
        deq = deq * torch.stack([o.outer for o in obs]).repeat_interleave(OUTER_BLOCK, dim=2)
    g = _stack([o.tensor_scale for o in obs]).float() if first.tensor_scale is not None else None
    if g is not None:
        deq = deq * g[:, None, None]
    z64 = z.double()
    err = deq.double() - z64
    err_sq, ref_sq = (err * err).sum(dim=(1, 2)), (z64 * z64).sum(dim=(1, 2))
    lo = torch.full((m,), math.inf, dtype=torch.float64, device=dev)
    hi = torch.full((m,), -math.inf, dtype=torch.float64, device=dev)
    if first.eden is not None:
        lo, hi = _eden_range(z, codes, g, *first.eden)
    zeros = torch.zeros(m, dtype=torch.float64, device=dev)
    flushed = _stack([o.flushed for o in obs]).double() if first.flushed is not None else zeros
    clamped = (_stack([o.clamped for o in obs]).double() if obs[0].clamped is not None else zeros - 1.0)
    return torch.stack([_stack([o.amax for o in obs]).double(), flushed, _stack([o.saturated for o in obs]).double(),
                        clamped, err_sq, ref_sq, lo, hi], dim=1)


def _eden_range(z: torch.Tensor, codes: torch.Tensor, g: Optional[torch.Tensor], v: float, eden_group: int):
    """(min, max) per observation [m] of the MS-EDEN correction factors of the sampled rows (numerics.md
    §5.2 / §5.3), recomputed from the rotated source rows z [m, n, C] and the operand's codes, over the
    groups whose sum u q is a normal positive number; (+inf, -inf) where there is none."""
    m, n, cols = z.shape
    zb = z.reshape(m, n, cols // BLOCK, BLOCK)
    block_amax = zb.abs().amax(dim=3)
    if eden_group == 16:
        divisor = Q.truncate_mantissa(Q.div_scalar(block_amax, v), 4)
        keep = divisor >= fmt.FP32_MIN_NORMAL
    else:
        s = fmt.round_to_e4m3(Q.div_scalar(block_amax, v) / g[:, None, None]).float()
        divisor = s * g[:, None, None]
        keep = (s > 0) & (divisor >= fmt.FP32_MIN_NORMAL)
    u = zb / torch.where(keep, divisor, torch.ones_like(divisor))[..., None]
    u = torch.where(keep[..., None], u, torch.zeros_like(u))
    q = fmt.decode_e2m1(codes).reshape(m, n, cols // eden_group, eden_group)
    u = u.reshape(m, n, cols // eden_group, eden_group)
    num, den = (u * u).sum(dim=3), (u * q).sum(dim=3)
    ok = den >= fmt.FP32_MIN_NORMAL
    factors = (num / torch.where(ok, den, torch.ones_like(den))).double()
    return (torch.where(ok, factors, math.inf).amin(dim=(1, 2)),
            torch.where(ok, factors, -math.inf).amax(dim=(1, 2)))


def combine(values: list) -> dict:
    """Pool the host [9] vectors of one (layer, operand) into the statistics of FIELDS."""
    amaxes = [v[0] for v in values]
    amax = math.nan if any(math.isnan(a) for a in amaxes) else max(amaxes)
    blocks = sum(v[4] for v in values)
    clamped = [v[3] for v in values if v[3] >= 0]
    err_sq, ref_sq = sum(v[5] for v in values), sum(v[6] for v in values)
    lo, hi = min(v[7] for v in values), max(v[8] for v in values)
    return {
        "amax": amax,
        "flushed_fraction": sum(v[1] for v in values) / blocks if blocks else None,
        "saturated_fraction": sum(v[2] for v in values) / blocks if blocks else None,
        "clamped_fraction": sum(clamped) / blocks if clamped and blocks else None,
        "rel_error": math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.nan),
        "eden_correction_min": lo if math.isfinite(lo) else None,
        "eden_correction_max": hi if math.isfinite(hi) else None,
    }


# -- sources: (args, kwargs of the dispatch entry, result) -> (amax, z rows, rows) -----------------

def _rows_of(a: torch.Tensor, rows: list, transpose: bool) -> torch.Tensor:
    idx = _index(rows, a.device)
    return a.index_select(1, idx).t() if transpose else a.index_select(0, idx)


def _amax(a: torch.Tensor) -> torch.Tensor:
    """max |a| as 0-d float32, one reduction and no |a| temporary (NaN carried; exact: a maximum)."""
    return torch.linalg.vector_norm(a, float("inf")).float()


def plain_source(args, kwargs, out: NVFP4Tensor):
    """quantize_nvfp4 / quantize_double_block: A = x, no rotation."""
    x = args[0].detach()
    rows = sample_rows(out.shape[0])
    return _amax(x), _rows_of(x, rows, False), None, rows


def rotated_source(args, kwargs, out: NVFP4Tensor):
    """rht_ms_eden / rht_double_block: A = a (or a.t()), padded to the operand's width, rotated."""
    a, sigma = args[0].detach(), args[1]
    rows = sample_rows(out.shape[0])
    return _amax(a), _rows_of(a, rows, kwargs.get("transpose", False)), sigma, rows


def _requant_source(scaled: bool):
    def source(args, kwargs, out: NVFP4Tensor):
        """requant_*: A = the saved forward operand's values, transposed, padded, rotated."""
        q, sigma = args[0], args[1]
        # from the packed operand: its amax from each block's largest code, and only the sampled
        # columns dequantized (a full dequantization per operand was most of a statistics iteration)
        amax = q.represented_amax(scaled)
        if not scaled and q.tensor_scale is not None:
            amax = amax * q.tensor_scale            # the represented values' amax
        rows = sample_rows(out.shape[0])
        return amax.float(), q.column_values(_index(rows, q.device), scaled).t(), sigma, rows
    return source


requant_unscaled_source = _requant_source(False)    # requant_ms_eden rotates q*s (Quartet II)
requant_scaled_source = _requant_source(True)       # requant_double_block rotates q.dequantize()


def observing(entry: Callable, source: Callable, eden: bool = False) -> Callable:
    """`entry` (a dispatch quantizer) reporting its operand on statistics iterations."""

    @functools.wraps(entry)
    def observed(*args, **kwargs):
        out = entry(*args, **kwargs)
        if active and layer is not None:
            _observe(source, args, kwargs, out, eden)
        return out
    observed.__wrapped__ = entry
    return observed


def _observe(source, args, kwargs, out, eden: bool) -> None:
    site = kwargs.get("site") or ("", "operand")
    operand = OPERAND_NAMES.get(site[1], site[1])
    with torch.no_grad():
        amax, src_rows, sigma, rows = source(args, kwargs, out)
        eden_args = (float(kwargs.get("v", Q.EDEN_V)), int(kwargs.get("eden_group", 128))) if eden else None
        _pending.append((layer, operand, Observation(out, amax, src_rows, sigma, rows, eden_args)))


def collect(iteration: int):
    """(records, first non-finite (layer, operand) or None) of `iteration` if it was a statistics
    iteration, else None. Records: one dict per (layer, operand) in first-execution order, with
    "layer", "operand" and FIELDS. One host sync. Collection stops until the next statistics iteration."""
    global active, _collected
    if not _interval or iteration % _interval or iteration == _collected:
        return None
    pending = list(_pending)
    _pending.clear()
    active, _collected = False, iteration
    if not pending:
        return [], None
    groups: dict = {}
    for i, (_, _, o) in enumerate(pending):       # observations alike (shape, rotation, scales) together
        groups.setdefault(o.group_key(), []).append(i)
    host = [None] * len(pending)
    with torch.no_grad():
        computed = [(indices, _group_values([pending[i][2] for i in indices])) for indices in groups.values()]
    for indices, values in computed:              # one device (one read-back per group) in practice
        for i, row in zip(indices, values.cpu().tolist()):
            host[i] = row[:4] + [float(pending[i][2].blocks)] + row[4:]     # combine()'s order
    order, pooled, first_bad = [], {}, None
    for (name, operand, _), values in zip(pending, host):
        key = (name, operand)
        if key not in pooled:
            order.append(key)
            pooled[key] = []
        pooled[key].append(values)
        if first_bad is None and not math.isfinite(values[0]):
            first_bad = key
    records = [dict(layer=name, operand=operand, **combine(pooled[(name, operand)])) for name, operand in order]
    return records, first_bad


def first_nonfinite_so_far() -> Optional[str]:
    """'<layer> <operand>' of the first operand observed so far this iteration whose source held a
    NaN / Inf, or None (one host sync; call it on statistics iterations only, e.g. before a NaN check)."""
    if not _pending:
        return None
    bad = torch.stack([~torch.isfinite(o.amax.reshape(())) for _, _, o in _pending]).cpu().tolist()
    return next((f"{name} {operand}" for (name, operand, _), b in zip(_pending, bad) if b), None)
