"""Per-operand quantization statistics (issue #19 items 2-3): what every quantized GEMM operand of
every plugin linear looked like on a statistics iteration, and where a non-finite value first appeared.

Why here: the quantizer entries of kernels/dispatch.py are the one place that sees every NVFP4
operand together with the tensor it was made from (on every backend: a kernel's result equals the
twin's), so dispatch wraps each entry with `observing` and this module needs nothing above the
numerics. The autograd linear (linear.py) names the layer (`set_layer`), the Megatron layer of
state.set_iteration switches collection on (`on_iteration`), and megatron/quant_stats.py writes and
logs what `collect()` returns.

Cost: off (interval 0, the default) or on any other iteration the wrappers test one module flag,
`active`. On a statistics iteration each observation is one row of FP32 words in its group's arena
(Layout), written by one launch of kernels/stats.py on the GPU (its torch twin write_twin elsewhere),
with no host sync; `collect()` computes the errors and MS-EDEN corrections batched over a group's rows
(a few dozen operations per group, not per operand) and reads everything back once.

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
from typing import Callable, NamedTuple, Optional

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
    _reset()


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
        _reset()


def set_layer(name: Optional[str]) -> None:
    global layer
    layer = name


# -- pure statistics ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sample_rows(rows: int, count: int = SAMPLE_ROWS) -> tuple:
    """Evenly spaced row indices, first and last included (all rows when there are fewer)."""
    if rows <= count:
        return tuple(range(rows))
    return tuple(sorted({round(i * (rows - 1) / (count - 1)) for i in range(count)}))


_INDEX: dict = {}


def _index(rows: tuple, device) -> torch.Tensor:
    """`rows` as a long tensor on `device`, made once per (rows, device): building it from a list is a
    host-to-device copy from pageable memory, which waits for the GPU's queue (a sync per operand made
    a statistics iteration cost 2-3 steps on the H100, docs/RESULTS.md)."""
    key = (rows, device)
    idx = _INDEX.get(key)
    if idx is None:
        idx = _INDEX[key] = torch.tensor(list(rows), dtype=torch.long, device=device)
    return idx


# -- one observation = one row of FP32 words ------------------------------------------------------

class Layout(NamedTuple):
    """The words of one observation's row (kernels/stats.py writes them, write_twin is its twin):
    [0] max |A| (FP32), [1] the saturated-scale count (int32), then the n sampled source rows as FP32
    [n, cols] (zero beyond c_src), the operand's packed rows as int32 words [n, cols/8], its scale bytes
    one per int32 word [n, cols/16] (row r // block_rows for 16x16 tiles), its outer scales [n, cols/128]."""
    n: int
    cols: int
    c_src: int
    outer: bool

    @property
    def off_src(self) -> int:
        return 2

    @property
    def off_q(self) -> int:
        return self.off_src + self.n * self.cols

    @property
    def off_s(self) -> int:
        return self.off_q + self.n * self.cols // 8

    @property
    def off_o(self) -> int:
        return self.off_s + self.n * self.cols // BLOCK

    @property
    def width(self) -> int:
        return self.off_o + (self.n * self.cols // OUTER_BLOCK if self.outer else 0)


class Observe:
    """What one quantizer call hands to the row writer: the operand q, the source A (dense: `src` with
    its memory `flat` and A's strides in it; or `packed_src`, a forward operand whose represented values
    transposed are A, `scaled` whether they include the outer / tensor scales), the sampled rows."""
    __slots__ = ("q", "layout", "rows", "row_index", "src", "flat", "src_strides", "packed_src", "scaled")

    def __init__(self, q: NVFP4Tensor, rows: tuple, src: Optional[torch.Tensor] = None,
                 packed_src: Optional[NVFP4Tensor] = None, scaled: bool = True):
        self.q, self.rows, self.src, self.packed_src, self.scaled = q, rows, src, packed_src, scaled
        self.row_index = _index(rows, q.device)
        c_src = src.shape[1] if src is not None else packed_src.shape[0]
        self.layout = Layout(len(rows), q.shape[1], c_src, q.outer_scales is not None)
        self.flat, self.src_strides = None, None
        if src is not None:
            if src.is_contiguous():
                self.flat = src
            elif src.t().is_contiguous():
                self.flat = src.t()
            self.src_strides = src.stride()


def write_twin(spec: Observe, arena: torch.Tensor, index: int) -> None:
    """The torch twin of kernels/stats.observe: fill row `index` of `arena` (FP32 [rows, layout.width],
    the row's words 0-1 zeroed)."""
    lay, q, idx = spec.layout, spec.q, spec.row_index
    row = arena[index]
    words = row.view(torch.int32)
    if spec.packed_src is not None:
        p = spec.packed_src
        # from the packed operand: its amax from each block's largest code, and only the sampled
        # columns dequantized (a full dequantization per operand was most of a statistics iteration)
        amax = p.represented_amax(spec.scaled)
        if not spec.scaled and p.tensor_scale is not None:
            amax = amax * p.tensor_scale            # the represented values' amax
        src_rows = p.column_values(idx, spec.scaled).t()
    else:
        amax = torch.linalg.vector_norm(spec.src, float("inf")).float()   # max |A|, NaN carried
        src_rows = spec.src.index_select(0, idx)
    row[0] = amax.reshape(())
    words[1] = ((q.block_scales.view(torch.uint8) & 0x7F) == E4M3_MAX_BITS).sum().to(torch.int32)
    src_view = row[lay.off_src:lay.off_q].view(lay.n, lay.cols)
    src_view[:, :lay.c_src] = src_rows.float()
    src_view[:, lay.c_src:] = 0.0
    words[lay.off_q:lay.off_s] = q.packed.index_select(0, idx).contiguous().view(torch.int32).reshape(-1)
    scale_idx = idx if q.block_rows == 1 else _index(tuple(r // q.block_rows for r in spec.rows), q.device)
    words[lay.off_s:lay.off_o] = q.block_scales.view(torch.uint8).index_select(0, scale_idx).reshape(-1).to(torch.int32)
    if lay.outer:
        row[lay.off_o:lay.width] = q.outer_scales.index_select(0, idx).reshape(-1)


# -- arenas: the rows of one group (same layout and statistics kind) in one growing tensor ---------

class _Group:
    __slots__ = ("layout", "sigma_n", "has_g", "eden", "device", "chunks", "capacity", "count", "members")

    def __init__(self, layout: Layout, sigma_n: int, has_g: bool, eden: Optional[tuple], device):
        self.layout, self.sigma_n, self.has_g, self.eden, self.device = layout, sigma_n, has_g, eden, device
        self.chunks, self.capacity, self.count, self.members = [], 0, 0, []

    def next_row(self) -> tuple:
        """(chunk, index) of a zeroed row: chunks of 8, 16, 32, then 64 rows, each one torch.zeros."""
        if self.count == self.capacity:
            size = min(64, max(8, self.capacity))
            self.chunks.append(torch.zeros(size, self.layout.width, dtype=torch.float32, device=self.device))
            self.capacity += size
        chunk = self.chunks[-1]
        index = chunk.shape[0] - (self.capacity - self.count)
        self.count += 1
        return chunk, index

    def rows(self) -> torch.Tensor:
        rows = self.chunks[0] if len(self.chunks) == 1 else torch.cat(self.chunks)
        return rows[:self.count]


class _Member:
    """Host-side facts of one observation (its row is the same-numbered one of its group's arena): its
    names and the small device tensors it refers to."""
    __slots__ = ("layer", "operand", "sigma", "tensor_scale", "flushed", "clamped", "blocks")

    def __init__(self, layer, operand, q: NVFP4Tensor, sigma):
        self.layer, self.operand, self.sigma = layer, operand, sigma
        self.tensor_scale, self.flushed, self.clamped = q.tensor_scale, q.flushed_blocks, q.clamped_scales
        self.blocks = q.block_scales.numel()


_groups: dict = {}


def _stack(tensors: list) -> torch.Tensor:
    return torch.stack([t.reshape(()) if t.dim() == 0 else t for t in tensors])


def _group_values(group: _Group) -> torch.Tensor:
    """float64 [count, 8] for one group's rows: amax, flushed, saturated, clamped (-1: none), error^2,
    reference^2, EDEN min (+inf: none), EDEN max (-inf: none). (The block counts are host numbers:
    collect() inserts them.)"""
    lay, members = group.layout, group.members
    rows = group.rows()
    m, n, cols = rows.shape[0], lay.n, lay.cols
    dev = rows.device
    src = rows[:, lay.off_src:lay.off_q].reshape(m, n, cols)
    if group.sigma_n:                                                     # z = rht(src rows, sigma), per obs
        k = group.sigma_n
        sig = torch.stack([o.sigma.to(dev, torch.float32).reshape(-1) for o in members])     # [m, k]
        chunks = src.reshape(m, n, cols // k, k) * sig[:, None, None, :]
        z = (chunks @ hadamard_matrix(k, torch.float32, dev)).reshape(src.shape)
    else:
        z = src
    packed = rows[:, lay.off_q:lay.off_s].contiguous().view(torch.uint8).reshape(m, n, cols // 2)
    codes = fmt.unpack_e2m1(packed)                                       # [m, n, C]
    scale_bytes = rows[:, lay.off_s:lay.off_o].view(torch.int32).to(torch.uint8)
    scales = scale_bytes.view(torch.float8_e4m3fn).float().reshape(m, n, cols // BLOCK)
    deq = fmt.decode_e2m1(codes) * scales.repeat_interleave(BLOCK, dim=2)
    if lay.outer:
        deq = deq * rows[:, lay.off_o:lay.width].reshape(m, n, cols // OUTER_BLOCK).repeat_interleave(OUTER_BLOCK, dim=2)
    g = _stack([o.tensor_scale for o in members]).float() if group.has_g else None
    if g is not None:
        deq = deq * g[:, None, None]
    z64 = z.double()
    err = deq.double() - z64
    err_sq, ref_sq = (err * err).sum(dim=(1, 2)), (z64 * z64).sum(dim=(1, 2))
    lo = torch.full((m,), math.inf, dtype=torch.float64, device=dev)
    hi = torch.full((m,), -math.inf, dtype=torch.float64, device=dev)
    if group.eden is not None:
        lo, hi = _eden_range(z, codes, g, *group.eden)
    zeros = torch.zeros(m, dtype=torch.float64, device=dev)
    first = members[0]
    flushed = _stack([o.flushed for o in members]).double() if first.flushed is not None else zeros
    clamped = _stack([o.clamped for o in members]).double() if first.clamped is not None else zeros - 1.0
    saturated = rows[:, 1].view(torch.int32).double()
    return torch.stack([rows[:, 0].double(), flushed, saturated, clamped, err_sq, ref_sq, lo, hi], dim=1)


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


# -- sources: (args, kwargs of the dispatch entry, result) -> (Observe, sigma) ----------------------

def plain_source(args, kwargs, out: NVFP4Tensor):
    """quantize_nvfp4 / quantize_double_block: A = x, no rotation."""
    return Observe(out, sample_rows(out.shape[0]), src=args[0].detach()), None


def rotated_source(args, kwargs, out: NVFP4Tensor):
    """rht_ms_eden / rht_double_block: A = a (or a.t()), padded to the operand's width, rotated."""
    a = args[0].detach()
    return Observe(out, sample_rows(out.shape[0]), src=a.t() if kwargs.get("transpose", False) else a), args[1]


def _requant_source(scaled: bool):
    def source(args, kwargs, out: NVFP4Tensor):
        """requant_*: A = the saved forward operand's values, transposed, padded, rotated."""
        return Observe(out, sample_rows(out.shape[0]), packed_src=args[0], scaled=scaled), args[1]
    return source


requant_unscaled_source = _requant_source(False)    # requant_ms_eden rotates q*s (Quartet II)
requant_scaled_source = _requant_source(True)       # requant_double_block rotates q.dequantize()


def observing(entry: Callable, source: Callable, eden: bool = False,
              write: Optional[Callable] = None) -> Callable:
    """`entry` (a dispatch quantizer) reporting its operand on statistics iterations through `write`
    (spec, arena, row index) (default: write_twin; kernels/dispatch.py passes its choice of the
    kernel or the twin)."""

    @functools.wraps(entry)
    def observed(*args, **kwargs):
        out = entry(*args, **kwargs)
        if active and layer is not None:
            _observe(source, write or write_twin, args, kwargs, out, eden)
        return out
    observed.__wrapped__ = entry
    return observed


def _observe(source, write, args, kwargs, out, eden: bool) -> None:
    site = kwargs.get("site") or ("", "operand")
    operand = OPERAND_NAMES.get(site[1], site[1])
    with torch.no_grad():
        spec, sigma = source(args, kwargs, out)
        eden_args = (float(kwargs.get("v", Q.EDEN_V)), int(kwargs.get("eden_group", 128))) if eden else None
        key = (str(out.device), spec.layout, 0 if sigma is None else sigma.numel(), out.tensor_scale is not None,
               eden_args)
        group = _groups.get(key)
        if group is None:
            group = _groups[key] = _Group(spec.layout, key[2], key[3], eden_args, out.device)
        member = _Member(layer, operand, out, sigma)
        write(spec, *group.next_row())
        group.members.append(member)
        _pending.append(member)


def _reset() -> None:
    _pending.clear()
    _groups.clear()


def collect(iteration: int):
    """(records, first non-finite (layer, operand) or None) of `iteration` if it was a statistics
    iteration, else None. Records: one dict per (layer, operand) in first-execution order, with
    "layer", "operand" and FIELDS. One read-back per device. Collection stops until the next statistics
    iteration."""
    global active, _collected
    if not _interval or iteration % _interval or iteration == _collected:
        return None
    pending, groups = list(_pending), list(_groups.values())
    _reset()
    active, _collected = False, iteration
    if not pending:
        return [], None
    with torch.no_grad():
        computed = [(group, _group_values(group)) for group in groups]
    by_device: dict = {}                          # one read-back per device (one in practice)
    for group, values in computed:
        by_device.setdefault(values.device, []).append((group, values))
    host = {}
    for parts in by_device.values():
        rows = torch.cat([values for _, values in parts]).cpu().tolist()
        members = [m for group, _ in parts for m in group.members]
        for member, row in zip(members, rows):
            host[id(member)] = row[:4] + [float(member.blocks)] + row[4:]     # combine()'s order
    order, pooled, first_bad = [], {}, None
    for member in pending:
        key, values = (member.layer, member.operand), host[id(member)]
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
    NaN / Inf, or None (one read-back per group; call it on statistics iterations only, e.g. before a
    NaN check)."""
    if not _pending:
        return None
    bad = {}
    for group in _groups.values():
        flags = (~torch.isfinite(group.rows()[:, 0])).cpu().tolist()
        for member, flag in zip(group.members, flags):
            bad[id(member)] = flag
    return next((f"{m.layer} {m.operand}" for m in _pending if bad[id(m)]), None)
