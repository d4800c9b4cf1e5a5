"""torch.distributed's collectives, counted at the call (the launcher's --nvfp4-count-collectives).

`install(on_call)` wraps `all_gather_into_tensor`, `reduce_scatter_tensor` (and their legacy aliases
`_all_gather_base`, `_reduce_scatter_base`), `all_reduce`, `broadcast` and `all_gather` in
torch.distributed, and the same functions where Megatron modules bound them at import time
(`dist_all_gather_func`, `dist_reduce_scatter_func`), so that `on_call(op, nbytes, group)` sees every call
before the collective runs; `restore(originals)` puts them back. Counting never breaks a collective
(an exception in it is dropped). Point-to-point sends are not wrapped: `torch.distributed.P2POp` checks
the identity of `isend` / `irecv`. Bytes per call: gathers count the gathered output (what arrives on this
rank, its own part included), reduce-scatters the full input, all-reduces and broadcasts the tensor.
Written for megatron-core 0.19 (the bindings in the modules listed in _MEGATRON_BINDINGS) and torch >= 2.4.
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

# Megatron modules that bind collectives at import time (`dist_all_gather_func = ...`): patched too.
_MEGATRON_BINDINGS = ("megatron.core.tensor_parallel.mappings", "megatron.core.tensor_parallel.layers",
                      "megatron.core.utils", "megatron.core.distributed.param_and_grad_buffer",
                      "megatron.core.transformer.multi_token_prediction")


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _all_gather_into_tensor_bytes(output, input=None, *a, **k):
    return _nbytes(output)


def _reduce_scatter_tensor_bytes(output, input=None, *a, **k):
    return _nbytes(input)


def _tensor_bytes(tensor, *a, **k):
    return _nbytes(tensor)


def _all_gather_bytes(tensor_list, tensor=None, *a, **k):
    return sum(_nbytes(t) for t in tensor_list)


_COUNTED = {
    "all_gather_into_tensor": _all_gather_into_tensor_bytes,
    "_all_gather_base": _all_gather_into_tensor_bytes,
    "reduce_scatter_tensor": _reduce_scatter_tensor_bytes,
    "_reduce_scatter_base": _reduce_scatter_tensor_bytes,
    "all_reduce": _tensor_bytes,
    "broadcast": _tensor_bytes,
    "all_gather": _all_gather_bytes,
}
# the op name reported: the legacy aliases are the same collective
_OP_NAME = {"_all_gather_base": "all_gather_into_tensor", "_reduce_scatter_base": "reduce_scatter_tensor"}


def _group_arg(name, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    # positional group: all_gather_into_tensor(out, in, group), all_reduce(t, op, group),
    # broadcast(t, src, group), all_gather(list, t, group), reduce_scatter_tensor(out, in, op, group)
    index = {"all_reduce": 2, "broadcast": 2, "reduce_scatter_tensor": 3, "_reduce_scatter_base": 3}.get(name, 2)
    return args[index] if len(args) > index else None


def _wrap(name, original, on_call):
    size_of = _COUNTED[name]
    op = _OP_NAME.get(name, name)

    def counted(*args, **kwargs):
        try:
            on_call(op, size_of(*args, **kwargs), _group_arg(name, args, kwargs))
        except Exception:      # counting must never break the collective
            pass
        return original(*args, **kwargs)

    counted.__wrapped__ = original
    counted._nvfp4_counted = True
    return counted


def install(on_call) -> list:
    """Wrap the collectives; returns the (owner, attribute, original) list that `restore` takes."""
    originals, wrapped = [], {}
    for name in _COUNTED:
        original = getattr(dist, name, None)
        if original is None or getattr(original, "_nvfp4_counted", False):
            continue
        wrapped[original] = _wrap(name, original, on_call)
        originals.append((dist, name, original))
        setattr(dist, name, wrapped[original])
    for module_name in _MEGATRON_BINDINGS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for attr in ("dist_all_gather_func", "dist_reduce_scatter_func"):
            original = getattr(module, attr, None)
            if original in wrapped:
                originals.append((module, attr, original))
                setattr(module, attr, wrapped[original])
    return originals


def restore(originals) -> None:
    for owner, attr, original in reversed(originals):
        setattr(owner, attr, original)
