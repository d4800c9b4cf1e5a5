"""Run megatron-core on CPU with gloo (the CPU route and the tests; never imported by the layers).

megatron-core assumes CUDA in a few places that have nothing to do with the numerics under test
(buffers on `torch.cuda.current_device()`, the CUDA RNG tracker, `device="cuda"` literals, streams,
`torch.cuda.synchronize`, optimizers asserting `torch.cuda.FloatTensor`). `install()` redirects those
to CPU in the current process; call it after `init_process_group("gloo")` and before building models.
Traps that are settings rather than shims (documented in cpu-testing.md): use
`use_cpu_initialization=True`, `gradient_accumulation_fusion=False`, no fused kernels, zero dropout,
and `batch_p2p_comm=False` with virtual pipeline stages (gloo mis-orders batched p2p messages).
Patched (process-wide, never undone): a TorchFunctionMode that maps `device="cuda"` and `Tensor.cuda()` to
the CPU, `torch.cuda.current_device/synchronize/current_stream/
default_stream/Stream/Event/stream/get_rng_state/manual_seed/manual_seed_all/set_rng_state`, torch's
tensor factories (a `device="cuda"` becomes CPU), `torch.Tensor.type`, and
`megatron.core.tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state`; written for
megatron-core 0.19 and torch >= 2.4.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False
_fake_cuda_generator = None


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)   # an int device means a GPU index


class _CudaToCpu(TorchFunctionMode):
    """Rewrites device="cuda" to CPU and makes Tensor.cuda() the identity."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _NullEvent()

    def wait_event(self, *args, **kwargs):
        pass


class _NullEvent(_NullStream):
    def record(self, *args, **kwargs):
        pass

    def query(self):
        return True


@contextlib.contextmanager
def _null_stream_context(*args, **kwargs):
    yield


_FACTORIES = ("ones", "zeros", "empty", "full", "arange", "rand", "randn", "randint", "tensor", "eye",
              "ones_like", "zeros_like", "empty_like", "full_like", "linspace")


def _cpu_factory(original):
    def factory(*args, **kwargs):
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        return original(*args, **kwargs)
    factory.__wrapped__ = original
    return factory


def install() -> None:
    """Apply the CPU shim in this process (idempotent)."""
    global _installed, _fake_cuda_generator
    if _installed:
        return
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda
    cuda.current_device = lambda: torch.device("cpu")
    cuda.synchronize = lambda *a, **k: None
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.stream = _null_stream_context

    # The CUDA RNG tracker keeps named generator states; back them with a separate CPU generator so
    # forks never disturb the CPU default generator (weights use it under use_cpu_initialization).
    _fake_cuda_generator = torch.Generator()
    cuda.get_rng_state = lambda *a, **k: _fake_cuda_generator.get_state()
    cuda.manual_seed = lambda seed: _fake_cuda_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.manual_seed
    cuda.set_rng_state = lambda state, *a, **k: _fake_cuda_generator.set_state(state)
    mrandom._get_cuda_rng_state = lambda *a, **k: _fake_cuda_generator.get_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: _fake_cuda_generator.set_state(state)

    # Optimizers assert grads are torch.cuda.FloatTensor: report CPU tensors under CUDA type names.
    original_type = torch.Tensor.type

    def tensor_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None:
            name = original_type(self)
            # (re-entered through the function mode, so replace only once)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if isinstance(dtype, str) and dtype.startswith("torch.cuda."):
            dtype = dtype.replace("torch.cuda.", "torch.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = tensor_type

    # Function modes do not reach autograd's backward (e.g. activation recomputation), so the
    # factory functions Megatron calls with device="cuda" are also wrapped directly.
    for name in _FACTORIES:
        original = getattr(torch, name)
        setattr(torch, name, _cpu_factory(original))
    _CudaToCpu().__enter__()   # stays pushed for the life of the process
    _installed = True


def is_installed() -> bool:
    return _installed
