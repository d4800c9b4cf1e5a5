"""Measurements for multi-rank runs (the launcher's `--nvfp4-count-collectives`, `--nvfp4-dump-grads`).

- `CollectiveCounter`: the bytes every torch.distributed collective moves on this rank, counted at the
  call and labelled by the role of its process group (tp / dp / pp / ...) and the training iteration.
  It measures what the run actually sent, for any recipe (the stock BF16 path included), where
  `state.record_comm` only sees the plugin's own gathers. Point-to-point sends (pipeline stages) are
  not counted: wrapping `isend` would break `torch.distributed.P2POp`'s identity check.
- `install_first_step_grad_dump`: on the first optimizer step, before the optimizer touches anything,
  the reduced gradients of every parameter, gathered along the tensor-parallel axis to their TP=1
  layout, and every plugin layer's random-stream key are written to a file, so that runs at
  different TP sizes can be compared tensor by tensor (`compare_gradients`).
- `perturb_initial_weights`: a last-bit scaling of the initial weights, the control that shows how far
  FP4 rounding decisions amplify a reduction-order-sized difference.
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict
from typing import Optional

import torch
import torch.distributed as dist

from . import state

class CollectiveCounter:
    """Counts bytes per (iteration, op, group role) on this rank while installed."""

    def __init__(self):
        self._lock = threading.Lock()
        self.records = defaultdict(lambda: [0, 0])      # (iteration, op, role) -> [bytes, calls]
        self._originals = []                             # (owner, attribute, original)
        self._roles = {}

    # -- group roles ------------------------------------------------------------------------------
    def _role(self, group) -> str:
        if group is None:
            return "world"
        key = id(group)
        if key not in self._roles:
            self._roles[key] = self._classify(group)
        return self._roles[key]

    @staticmethod
    def _classify(group) -> str:
        """tp / dp / pp / ... by the group's ranks; the first match in that order names a group that is
        several of them (PP=1: the model-parallel group is the TP group). "local" for a one-rank group:
        its collectives move nothing and are not counted."""
        try:
            ranks = tuple(dist.get_process_group_ranks(group))
        except Exception:
            return "other"
        if len(ranks) == 1:
            return "local"
        try:
            from megatron.core import parallel_state as ps
            getters = (("tp", ps.get_tensor_model_parallel_group),
                       ("dp", lambda: ps.get_data_parallel_group(with_context_parallel=True)),
                       ("dp", ps.get_data_parallel_group),
                       ("pp", ps.get_pipeline_model_parallel_group),
                       ("mp", ps.get_model_parallel_group),
                       ("embedding", ps.get_embedding_group))
            for role, getter in getters:
                try:
                    other = getter()
                except Exception:
                    continue
                if other is not None and tuple(dist.get_process_group_ranks(other)) == ranks:
                    return role
        except ImportError:
            pass
        if len(ranks) == dist.get_world_size():
            return "world"
        return f"group of {len(ranks)}"

    def _count(self, op: str, nbytes: int, group) -> None:
        role = self._role(group)
        if role == "local" or (role == "world" and dist.get_world_size() == 1):
            return                 # nothing leaves the rank
        with self._lock:
            rec = self.records[(state.get_iteration(), op, role)]
            rec[0] += nbytes
            rec[1] += 1

    # -- install / uninstall (patches/torch_collectives.py) ----------------------------------------
    def install(self) -> "CollectiveCounter":
        if not self._originals:
            from ..patches import torch_collectives
            self._originals = torch_collectives.install(self._count)
        return self

    def uninstall(self) -> None:
        from ..patches import torch_collectives
        torch_collectives.restore(self._originals)
        self._originals = []

    # -- reports ----------------------------------------------------------------------------------
    def per_iteration(self, skip_first: int = 1) -> dict:
        """Mean bytes and calls per training iteration for each "op/role", over the iterations seen
        after the first `skip_first` (iteration 0 also carries the set-up broadcasts)."""
        with self._lock:
            items = dict(self.records)
        iterations = sorted({it for it, _, _ in items if it >= skip_first})
        if not iterations:
            return {"iterations": 0, "per_iteration": {}}
        totals = defaultdict(lambda: [0, 0])
        for (it, op, role), (nbytes, calls) in items.items():
            if it >= skip_first:
                totals[f"{op}/{role}"][0] += nbytes
                totals[f"{op}/{role}"][1] += calls
        n = len(iterations)
        return {"iterations": n, "first_iteration": iterations[0],
                "per_iteration": {k: {"bytes": v[0] / n, "calls": v[1] / n} for k, v in sorted(totals.items())}}


_counter: Optional[CollectiveCounter] = None


def install_collective_counter() -> CollectiveCounter:
    global _counter
    if _counter is None:
        _counter = CollectiveCounter()
    return _counter.install()


def collective_counter() -> Optional[CollectiveCounter]:
    return _counter


def comm_report() -> dict:
    """What the summary carries: measured collective bytes per iteration (when counting) and the
    plugin's own account of its sequence-parallel gathers (FP4 sent, and BF16 for the same tensors)."""
    out = {}
    if _counter is not None:
        out["collectives"] = _counter.per_iteration()
    stats = state.comm_stats()
    if stats:
        out["plugin_gathers"] = {
            "fp4_bytes": sum(r.quantized_bytes for r in stats.values()),
            "bf16_bytes_for_same_tensors": sum(r.bf16_bytes for r in stats.values()),
            "gathers": sum(r.gathers for r in stats.values()),
            "iteration": state.get_iteration()}
    return out


# --------------------------------------------------------------------------------------------------
# First-step gradients at the TP=1 layout
# --------------------------------------------------------------------------------------------------

def _unwrap_name(name: str) -> str:
    while name.startswith("module."):
        name = name[len("module."):]
    return name


def full_gradients(model_chunks, gated_linear_unit: bool) -> dict:
    """{parameter name: reduced gradient in FP32, TP=1 layout}. Collective over the TP group (every TP
    rank must call it). Gated fc1 weights hold [gate shard; up shard] per rank, so the gathered
    tensor is reordered to [gate; up] as TP=1 holds it."""
    from megatron.core import parallel_state as ps
    tp = ps.get_tensor_model_parallel_world_size()
    group = ps.get_tensor_model_parallel_group()
    out = {}
    for chunk in model_chunks:
        for name, param in chunk.named_parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is None:
                continue
            grad = grad.detach().float().contiguous()
            name = _unwrap_name(name)
            if tp > 1 and getattr(param, "tensor_model_parallel", False):
                dim = param.partition_dim
                parts = [torch.empty_like(grad) for _ in range(tp)]
                dist.all_gather(parts, grad, group=group)
                if gated_linear_unit and name.endswith("linear_fc1.weight") and dim == 0:
                    halves = [p.chunk(2, dim=0) for p in parts]
                    parts = [h[0] for h in halves] + [h[1] for h in halves]
                grad = torch.cat(parts, dim=dim)
            out[name] = grad.cpu()
    return out


def install_first_step_grad_dump(optimizer, model_chunks, path: str, gated_linear_unit: bool) -> None:
    """Write `full_gradients` of the first optimizer step to `path` (global rank 0), then restore the
    optimizer's step. Needs pipeline-parallel size 1 (parameter names are per stage) and no
    distributed optimizer with DP > 1 (it leaves each DP rank only its shard of the reduced grads)."""
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("--nvfp4-dump-grads needs --pipeline-model-parallel-size 1 "
                         "(parameter names are local to a pipeline stage)")
    sharded = any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks)
    if sharded and ps.get_data_parallel_world_size() > 1:
        raise ValueError("--nvfp4-dump-grads cannot be used with --use-distributed-optimizer at data-parallel "
                         "size > 1 (each rank keeps only its shard of the reduced gradients)")
    from ..patches.megatron_optimizer import once_before_step

    def dump():
        grads = full_gradients(model_chunks, gated_linear_unit)
        keys = stream_keys(model_chunks)
        if dist.get_rank() == 0:
            import os
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.save({"iteration": state.get_iteration(), "grads": grads, "keys": keys,
                        "tp": ps.get_tensor_model_parallel_world_size(),
                        "dp": ps.get_data_parallel_world_size()}, path)

    once_before_step(optimizer, dump)


def stream_keys(model_chunks) -> dict:
    """{plugin layer name: the random-stream key of its last call}: a pure function of (seed, iteration,
    layer, name, call, DP rank), so equal at every TP size when the randomness ignores the split."""
    return {getattr(m, "nvfp4_name", n): int(m.nvfp4_last_key) for c in model_chunks for n, m in c.named_modules()
            if getattr(m, "nvfp4_last_key", None) is not None}


def perturb_initial_weights(model_chunks, optimizer, eps: float) -> int:
    """Scale every parameter with two or more dimensions by (1 + eps), in place; returns how many.
    FP32 parameters without a distributed optimizer only: there the optimizer steps the parameters
    themselves, so nothing else holds a copy to keep in sync."""
    if not math.isfinite(eps) or abs(eps) >= 1:
        raise ValueError(f"--nvfp4-perturb-init must be a small finite number, got {eps}")
    params = [p for c in model_chunks for p in c.parameters()]
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError("--nvfp4-perturb-init needs FP32 parameters (the BF16 optimizer keeps separate FP32 masters)")
    if any(getattr(getattr(c, "ddp_config", None), "use_distributed_optimizer", False) for c in model_chunks):
        raise ValueError("--nvfp4-perturb-init cannot be used with --use-distributed-optimizer")
    n = 0
    with torch.no_grad():
        for p in params:
            if p.dim() >= 2:
                p.mul_(1.0 + eps)
                n += 1
    return n


def compare_gradients(reference: dict, other: dict) -> dict:
    """Relative L2 difference of two gradient dumps, over all tensors and per tensor (the worst)."""
    ref, oth = reference["grads"], other["grads"]
    if set(ref) != set(oth):
        missing, extra = sorted(set(ref) - set(oth)), sorted(set(oth) - set(ref))
        raise ValueError(f"gradient dumps hold different parameters: only in the reference {missing[:4]}, "
                         f"only in the other {extra[:4]}")
    num = den = 0.0
    worst, worst_name = 0.0, None
    for name in sorted(ref):
        a, b = ref[name].double(), oth[name].double()
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} against {tuple(b.shape)}")
        d2, r2 = (a - b).pow(2).sum().item(), a.pow(2).sum().item()
        num, den = num + d2, den + r2
        rel = (d2 / r2) ** 0.5 if r2 > 0 else (0.0 if d2 == 0 else float("inf"))
        if rel > worst:
            worst, worst_name = rel, name
    return {"relative_l2": (num / den) ** 0.5 if den > 0 else float("nan"), "worst_tensor": worst_name,
            "worst_tensor_relative_l2": worst, "tensors": len(ref)}
