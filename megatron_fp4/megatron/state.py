"""Run-wide state the plugin layers read: the training iteration (for random stream keys) and a
counter of the bytes each layer communicates (FP4 against what BF16 would have cost).

The training loop calls `set_iteration(it)` once per step (the plugin's launcher and CPU driver do;
a foreign loop that never calls it still gets unique keys, because each layer's call counter then
simply keeps growing). Keys are a pure function of (recipe seed, iteration, global layer number,
linear name, per-step call index of that layer, data-parallel rank): identical on every TP rank,
independent of the TP split and of activation recomputation.

Graph-safe keys (rng.py): the iteration and the call index live on the device, so a CUDA graph
captured once draws fresh bits at every replay. A layer's key is split into a host-static part
`static_key(seed, layer_number, name, dp_rank)` and a per-call state [iteration, call] (int64, on the
layer's device), so the effective key is derive_key(static, iteration, call) = `stream_key(...)`.
The iteration is one tensor per device (`step_tensor`), each layer's call index a `CallCounter`
tensor that every call advances on the device; `set_iteration` rewrites all of them in place
(fill_ / zero_, never reallocated), before a replay as before an eager step. So a graph captured
for micro-batch m (Megatron's `--cuda-graph-impl local` captures one runner per micro-batch and
replays them in capture order) reads call m after set_iteration, as eager execution does.
"""
from __future__ import annotations

import threading
import weakref
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import stats
from ..rng import derive_key

_lock = threading.Lock()
_iteration = 0
_step_tensors: dict = {}                 # str(device) -> int64 [1] holding the iteration
_counters: "weakref.WeakSet" = weakref.WeakSet()


def set_iteration(iteration: int) -> None:
    """Declare the current optimizer step; layers restart their per-step call counters. The device
    copies (step tensors, call counters) are rewritten in place, without a host sync."""
    global _iteration
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    changed = int(iteration) != _iteration
    _iteration = int(iteration)
    for t in _step_tensors.values():
        t.fill_(_iteration)
    if changed:
        reset_call_counters()
    stats.on_iteration(_iteration + 1)      # quantization statistics on their iterations (1-based)


def step_tensor(device) -> torch.Tensor:
    """The iteration as an int64 [1] tensor on `device`: one per device, rewritten in place by
    set_iteration (a captured graph keeps reading the same memory)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    name = str(device)
    t = _step_tensors.get(name)
    if t is None:
        t = _step_tensors[name] = torch.full((1,), _iteration, dtype=torch.int64, device=device)
    return t


class CallCounter:
    """A layer's call index within the iteration, on the device: `next_state(device)` returns a fresh
    int64 [2] state [iteration, call] for this call and advances the counter on the device (two small
    launches, capturable). set_iteration zeroes every counter when the iteration changes."""

    def __init__(self):
        self.tensor: Optional[torch.Tensor] = None
        _counters.add(self)

    def next_state(self, device) -> torch.Tensor:
        step = step_tensor(device)
        if self.tensor is None or self.tensor.device != step.device:
            self.tensor = (torch.zeros(1, dtype=torch.int64, device=step.device) if self.tensor is None
                           else self.tensor.to(step.device))
        snapshot = torch.cat([step, self.tensor])
        self.tensor.add_(1)
        return snapshot

    def reset(self) -> None:
        if self.tensor is not None:
            self.tensor.zero_()


def reset_call_counters() -> None:
    """Zero every layer's device call counter in place (one foreach launch per device)."""
    by_device = defaultdict(list)
    for counter in list(_counters):
        if counter.tensor is not None:
            by_device[counter.tensor.device].append(counter.tensor)
    for tensors in by_device.values():
        torch._foreach_zero_(tensors)


def get_iteration() -> int:
    return _iteration


_train_iters = None


def set_train_iters(train_iters: int) -> None:
    """Declare the run length: stabilizer schedules given as fractions of the run scale to it."""
    global _train_iters
    if train_iters <= 0:
        raise ValueError(f"train_iters must be positive, got {train_iters}")
    _train_iters = int(train_iters)


def get_train_iters():
    return _train_iters


# --nvfp4-bf16-from: from this training iteration on (the log's 1-based numbering) the plugin linears
# run in BF16 ("all": every GEMM; "forward": only the forward GEMM, the backward keeps the recipe).
# A pure function of the iteration, so a resumed run switches exactly where the uninterrupted one does.
_bf16_from = None
_bf16_scope = "all"
BF16_SCOPES = ("all", "forward")


def set_bf16_from(first_iteration: Optional[int], scope: str = "all") -> None:
    """Declare the late precision switch (None: never)."""
    global _bf16_from, _bf16_scope
    if scope not in BF16_SCOPES:
        raise ValueError(f"bf16 switch scope must be one of {BF16_SCOPES}, got {scope!r}")
    if first_iteration is not None and first_iteration < 1:
        raise ValueError(f"the first BF16 iteration must be >= 1, got {first_iteration}")
    _bf16_from, _bf16_scope = (None if first_iteration is None else int(first_iteration)), scope


def bf16_switch() -> Optional[str]:
    """None before the switch (or without one), else its scope ("all" / "forward") for the current
    iteration (set_iteration's 0-based index is the log's iteration minus one)."""
    if _bf16_from is None or _iteration + 1 < _bf16_from:
        return None
    return _bf16_scope


def stabilizer_schedule(recipe) -> dict:
    """The recipe's stabilizer schedule in absolute iterations for the declared run length."""
    if _train_iters is None:
        fractional = [k for k in ("outcontrol_record_start", "outcontrol_record_iters", "oscireset_start",
                                  "oscireset_period", "oscireset_window") if 0 < getattr(recipe, k) < 1]
        if fractional:
            raise RuntimeError(f"recipe {recipe.name!r} gives {fractional} as fractions of the run, but the "
                               "run length is unknown: call megatron_fp4.megatron.state.set_train_iters(n)")
        return recipe.stabilizer_schedule(1)
    return recipe.stabilizer_schedule(_train_iters)


def name_id(name: str) -> int:
    """A stable 32-bit id for a module name (Python's hash() is salted per process)."""
    return zlib.crc32(name.encode())


def static_key(seed: int, layer_number: int, name: str, dp_rank: int) -> int:
    """The host-static part of a layer's stream key (the per-call [iteration, call] state follows)."""
    return derive_key(seed, layer_number, name_id(name), dp_rank)


def stream_key(seed: int, iteration: int, layer_number: int, name: str, call: int, dp_rank: int) -> int:
    """The effective key of a layer's call as a host int: what its device state folds to."""
    return derive_key(static_key(seed, layer_number, name, dp_rank), iteration, call)


# Communication accounting ------------------------------------------------------------------------

@dataclass
class CommRecord:
    quantized_bytes: int = 0     # what the plugin actually sent (packed codes + scales)
    bf16_bytes: int = 0          # what the stock BF16 path would have sent for the same tensors
    gathers: int = 0
    by_kind: dict = field(default_factory=lambda: defaultdict(int))

    @property
    def ratio(self) -> float:
        return self.quantized_bytes / self.bf16_bytes if self.bf16_bytes else float("nan")


_comm: dict[str, CommRecord] = defaultdict(CommRecord)


def record_comm(layer: str, kind: str, quantized_bytes: int, bf16_bytes: int) -> None:
    with _lock:
        rec = _comm[layer]
        rec.quantized_bytes += int(quantized_bytes)
        rec.bf16_bytes += int(bf16_bytes)
        rec.gathers += 1
        rec.by_kind[kind] += int(quantized_bytes)


def comm_stats() -> dict[str, CommRecord]:
    """Per-layer bytes all-gathered by this rank's plugin layers since the last reset."""
    with _lock:
        return dict(_comm)


def reset_comm_stats() -> None:
    with _lock:
        _comm.clear()


def format_comm_stats() -> str:
    stats = comm_stats()
    if not stats:
        return "nvfp4 comm: no sequence-parallel gathers recorded"
    lines = ["nvfp4 comm (sequence-parallel all-gathers, this rank): layer  fp4_MiB  bf16_MiB  ratio"]
    total_q = total_b = 0
    for name in sorted(stats):
        rec = stats[name]
        total_q += rec.quantized_bytes
        total_b += rec.bf16_bytes
        lines.append(f"  {name}  {rec.quantized_bytes / 2**20:.3f}  {rec.bf16_bytes / 2**20:.3f}  "
                     f"{rec.ratio:.3f}")
    lines.append(f"  total  {total_q / 2**20:.3f}  {total_b / 2**20:.3f}  "
                 f"{total_q / total_b if total_b else float('nan'):.3f}")
    return "\n".join(lines)


def tensorboard_writer():
    """Megatron's TensorBoard writer when megatron.training set one up (None otherwise)."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer
        return get_tensorboard_writer()
    except Exception:   # megatron.training not initialised (CPU driver, tests)
        return None
