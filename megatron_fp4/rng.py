"""Counter-based randomness: reproducible, layout-independent, identical in torch and Triton.

Every random number is a pure function of a 32-bit stream key and a counter (hi, lo). The stream key
folds in (seed, step, layer, micro-batch, data-parallel rank, GEMM role); the counter is the
*global* coordinate (row, column) of the element or block in the operand being quantized. So the
same seed gives the same bits on CPU and GPU, and for any tensor-parallel split: a rank that holds
columns [c0, c0 + n) of an operand draws with col_offset = c0 and gets exactly the bits the
unsplit tensor would have used there.

The mixing function is Chris Wellons' "lowbias32" finaliser (two multiply-xorshift rounds), which
needs only 32-bit multiplies, xors and shifts: the Triton kernels implement the same three lines on
uint32. Here it runs on int64 tensors masked to 32 bits (torch has no general uint32 arithmetic).

Graph-safe keys (CUDA graphs). A host int key is frozen into a captured graph, so every replay would
draw the same bits. A stream may therefore carry its per-call part on the device: `key` is the
host-static part (seed, layer, name, DP rank folded in) and `state` a small int64 device tensor of
fields folded after it (the Megatron layers: [iteration, call of the layer in this iteration]);
the GEMM role is folded last. The effective key is exactly

    K = derive_key(key, *state), then K = derive_key(K, role) per role

(each field folded as two 32-bit halves, low first), so a stream with state [s, c] draws the same bits
as the int-key stream RandomStream(derive_key(key, s, c)).for_role(role) (tested by enumeration), and
a layer's host-side int key derive_key(static, iteration, call) still reproduces its draws. The torch twins fold `state` with int64 tensor ops (no .item(): no host
sync, capturable) and the Triton kernels load it and fold it in-kernel with the same uint32 ops
(kernels/_common.stream_key). Rewriting `state` in place (copy_/fill_/add_, never reallocating it)
before a replay makes the replay draw the bits of the new (step, call).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Optional, Union

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9


class Role(enum.IntEnum):
    """GEMM operand roles: each quantization of each operand draws from its own stream."""

    DGRAD_GRAD_OUTPUT = 1   # E along N
    DGRAD_WEIGHT = 2        # W^T along N
    WGRAD_GRAD_OUTPUT = 3   # E^T along T
    WGRAD_INPUT = 4         # X^T along T
    RHT_SIGNS = 5           # the one sigma shared by all backward operands (Quartet II)
    RHT_SIGNS_DGRAD = 6     # TetraJet-v2 d1
    RHT_SIGNS_WGRAD = 7     # TetraJet-v2 d2
    RHT_SIGNS_FIXED = 8     # NVIDIA: one fixed vector for all layers and steps


def mix32(x):
    """lowbias32 on Python ints or int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 16)
    return x


def hash_counter(key: int, hi, lo):
    """u32 = H(key, hi, lo); hi and lo are Python ints or int64 tensors in [0, 2^32)."""
    h = mix32((hi ^ key) & MASK32)
    h = mix32(h ^ lo)
    return mix32((h + _GOLDEN) & MASK32)


KEY_IV = mix32(0x6A09E667)   # derive_key's initial value


def fold(key, field):
    """One field into a key: its low 32 bits, then its high 32 bits. Python ints or int64 tensors
    (a device tensor field gives a device tensor key, without a host sync)."""
    key = mix32(((key ^ (field & MASK32)) + _GOLDEN) & MASK32)
    return mix32(key ^ ((field >> 32) & MASK32))


def derive_key(*fields: int) -> int:
    """Fold integer fields (seed, step, layer, ...) into a 32-bit stream key."""
    key = KEY_IV
    for field in fields:
        if field < 0:
            raise ValueError(f"random stream fields must be non-negative, got {field}")
        key = fold(key, int(field))
    return key


def check_state(state: Optional[torch.Tensor]) -> None:
    """A stream state is a 1-D int64 tensor of at most 4 fields (what the kernels unroll); its values
    (non-negative) are the writer's to check, on the host, before they reach the device."""
    if state is None:
        return
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or state.dim() != 1 \
            or not 1 <= state.numel() <= 4:
        raise ValueError("a random stream state must be a 1-D int64 tensor of 1 to 4 fields, got "
                         f"{getattr(state, 'dtype', type(state))} of shape {tuple(getattr(state, 'shape', ()))}")


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Top 24 bits of a u32 as a float32 uniform in [0, 1) (exact: multiples of 2^-24)."""
    return (bits >> 8).to(torch.float32) * (2.0 ** -24)


NO_SPLIT = (1 << 31) - 1   # a split point no local index reaches (fits the kernels' int32 indices)


@dataclass(frozen=True)
class TwoPieces:
    """Global coordinates of a local dimension made of two contiguous pieces of the global one.

    Local indices [0, split) are global [offset, offset + split); local indices from `split` on are
    global [offset_hi, ...). SwiGLU's fc1 at TP > 1 is the case: each rank holds its shard of the gate
    half and its shard of the up half side by side, so its output features are two strided pieces of
    the unsplit [gate; up] layout, and random counters must follow them to stay TP-invariant.
    """

    offset: int
    split: int
    offset_hi: int

    def __post_init__(self):
        if min(self.offset, self.split, self.offset_hi) < 0:
            raise ValueError(f"offsets and split must be non-negative, got {self}")


Offset = Union[int, TwoPieces]


def _pieces(offset: Offset) -> tuple:
    """(offset, split, offset_hi) of an int or TwoPieces offset."""
    if isinstance(offset, TwoPieces):
        return offset.offset, offset.split, offset.offset_hi
    return int(offset), NO_SPLIT, int(offset) + NO_SPLIT


def global_index(local, offset: Offset):
    """Global counter coordinate of local indices (an int64 tensor or a Python int)."""
    base, split, hi = _pieces(offset)
    if isinstance(local, int):
        return local + base if local < split else local - split + hi
    return torch.where(local < split, local + base, local - split + hi)


def _largest_global(count: int, step: int, offset: Offset) -> int:
    # in Python: checking the tensor instead would make the host wait for the GPU
    last = (count - 1) * step
    base, split, hi = _pieces(offset)
    candidates = [last] + ([min(last, split - 1)] if split > 0 else [])
    return max(global_index(i, offset) for i in candidates)


@dataclass(frozen=True)
class RandomStream:
    """Draws for one operand: the stream key plus the global offset of the local block of data
    (per dim an int, or TwoPieces for a local dim made of two pieces of the global one).

    state (optional): an int64 device tensor of fields folded after `key`, read when the draws are
    made (graph-safe keys, module docstring); roles: folded after the state (for_role on a stream with
    a state; without one, for_role folds the role into `key` on the host). The key without a state and
    every role are 32-bit; state fields are 64-bit (non-negative)."""

    key: int
    row_offset: Offset = 0
    col_offset: Offset = 0
    state: Optional[torch.Tensor] = _field(default=None, compare=False)
    roles: tuple = ()

    def __post_init__(self):
        check_state(self.state)
        if not 0 <= self.key <= MASK32:
            raise ValueError(f"a stream key is 32-bit, got {self.key}")
        if self.roles and self.state is None:
            raise ValueError("roles are folded after a state; without one fold them into the key")
        if any(int(r) < 0 or int(r) > 0x7FFFFFFF for r in self.roles):
            raise ValueError(f"roles must be in [0, 2^31), got {self.roles}")

    @property
    def dynamic(self) -> bool:
        """Whether the key depends on a device state (else it is the host int `key`)."""
        return self.state is not None

    def effective_key(self, device=None):
        """The key the draws use: `key` (an int) without a state, else derive_key(key, *state, *roles)
        as a 0-dim int64 tensor on the state's device (or `device`): derive_key(key, *state), then
        derive_key(., role) per role, with tensor ops (no host sync)."""
        if self.state is None:
            return self.key
        state = self.state if device is None else self.state.to(device)
        key = fold(KEY_IV, self.key & MASK32)
        for i in range(state.numel()):
            key = fold(key, state[i])
        for role in self.roles:
            key = fold(fold(KEY_IV, key), int(role))
        return key

    def bits(self, rows: int, cols: int, device=None, col_step: int = 1) -> torch.Tensor:
        """u32 draws (int64 tensor) for local positions (r, c * col_step), global coordinates."""
        last_row = _largest_global(rows, 1, self.row_offset) if rows else 0
        last_col = _largest_global(cols, col_step, self.col_offset) if cols else 0
        if last_row > MASK32 or last_col > MASK32:
            raise ValueError(f"random counter ({last_row}, {last_col}) exceeds 32 bits")
        if device is None and self.state is not None:
            device = self.state.device
        hi = global_index(torch.arange(rows, dtype=torch.int64, device=device), self.row_offset)
        lo = global_index(torch.arange(cols, dtype=torch.int64, device=device) * col_step, self.col_offset)
        return hash_counter(self.effective_key(device), hi[:, None], lo[None, :])

    def kernel_offsets(self) -> tuple:
        """(row_off, row_split, row_off_hi, col_off, col_split, col_off_hi) for the Triton kernels, which
        map a local index i to i + off if i < split else i + off_hi (off_hi = offset_hi - split)."""
        out = []
        for offset in (self.row_offset, self.col_offset):
            base, split, hi = _pieces(offset)
            out += [base, split, hi - split]
        return tuple(out)

    def uniform(self, rows: int, cols: int, device=None, col_step: int = 1) -> torch.Tensor:
        return uniform_from_bits(self.bits(rows, cols, device, col_step))

    def kernel_key(self) -> tuple:
        """(key as int32, state tensor or None, role, number of state fields, number of roles) for the
        Triton kernels (kernels/_common.stream_key); at most one role after a state."""
        if len(self.roles) > 1:
            raise ValueError(f"the kernels fold at most one role after the state, got {self.roles}")
        key = self.key & MASK32
        signed = key - (1 << 32) if key >= (1 << 31) else key
        nstate = 0 if self.state is None else self.state.numel()
        return signed, self.state, int(self.roles[0]) if self.roles else 0, nstate, len(self.roles)

    def for_role(self, role: int) -> "RandomStream":
        if self.state is None:
            return RandomStream(derive_key(self.key, int(role)), self.row_offset, self.col_offset)
        return RandomStream(self.key, self.row_offset, self.col_offset, self.state, self.roles + (int(role),))

    def shifted(self, row_offset: int = 0, col_offset: int = 0) -> "RandomStream":
        return RandomStream(self.key, row_offset, col_offset, self.state, self.roles)


def random_signs(key: Union[int, RandomStream], n: int, device=None) -> torch.Tensor:
    """n Rademacher signs (+-1.0 float32) from stream `key` (an int, or a RandomStream whose
    effective key is used): bit 31 of H(key, 0, i)."""
    if isinstance(key, RandomStream):
        if device is None and key.state is not None:
            device = key.state.device
        key = key.effective_key(device)
    bits = hash_counter(key, torch.zeros(1, dtype=torch.int64, device=device),
                        torch.arange(n, dtype=torch.int64, device=device))
    return 1.0 - 2.0 * ((bits >> 31) & 1).to(torch.float32)
