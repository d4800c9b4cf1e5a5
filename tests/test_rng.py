"""megatron_fp4.rng: counter-based streams (numerics.md §2.5)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from megatron_fp4 import rng
from megatron_fp4.rng import RandomStream

U32 = (1 << 32) - 1


# ---------------------------------------------------------------------------------------------
# A pure-Python-int implementation, written from the published definition of Wellons'
# "lowbias32" integer hash (xorshift 16, multiply 0x7feb352d, xorshift 15, multiply 0x846ca68b,
# xorshift 16, all mod 2^32) and the module's documented composition H(key, hi, lo).
# ---------------------------------------------------------------------------------------------

def py_lowbias32(x: int) -> int:
    assert 0 <= x <= U32
    x ^= x >> 16
    x = (x * 0x7FEB352D) % (1 << 32)
    x ^= x >> 15
    x = (x * 0x846CA68B) % (1 << 32)
    x ^= x >> 16
    return x


def py_hash_counter(key: int, hi: int, lo: int) -> int:
    h = py_lowbias32((hi ^ key) % (1 << 32))
    h = py_lowbias32(h ^ lo)
    return py_lowbias32((h + 0x9E3779B9) % (1 << 32))


def test_lowbias32_known_structure():
    assert py_lowbias32(0) == 0
    assert rng.mix32(0) == 0
    # a bijection on u32 (xorshift and odd multiplication are invertible): no collisions on a sample
    sample = random.Random(0).sample(range(1 << 32), 20000)
    assert len({py_lowbias32(v) for v in sample}) == len(sample)


def test_mix32_python_ints_match_reference():
    r = random.Random(1)
    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, U32] + [r.getrandbits(32) for _ in range(2000)]
    for v in values:
        assert rng.mix32(v) == py_lowbias32(v), hex(v)


def test_mix32_and_hash_counter_torch_int64_match_python_ints():
    r = random.Random(2)
    values = [0, 1, U32, 0x80000000, 0xFFFF0000] + [r.getrandbits(32) for _ in range(5000)]
    t = torch.tensor(values, dtype=torch.int64)
    out = rng.mix32(t)
    assert out.dtype == torch.int64
    assert out.tolist() == [py_lowbias32(v) for v in values]
    keys = [r.getrandbits(32) for _ in range(5)] + [U32, 0]
    his = torch.tensor([r.getrandbits(32) for _ in range(300)] + [U32, 0], dtype=torch.int64)
    los = torch.tensor([r.getrandbits(32) for _ in range(300)] + [0, U32], dtype=torch.int64)
    for key in keys:
        bits = rng.hash_counter(key, his, los)
        assert ((bits >= 0) & (bits <= U32)).all()
        assert bits.tolist() == [py_hash_counter(key, h, l) for h, l in zip(his.tolist(), los.tolist())]


def test_stream_bits_match_python_reference_at_global_coordinates():
    stream = RandomStream(key=0xDEADBEEF, row_offset=1000, col_offset=77)
    bits = stream.bits(3, 5)
    for i in range(3):
        for j in range(5):
            assert int(bits[i, j]) == py_hash_counter(0xDEADBEEF, 1000 + i, 77 + j)
    strided = stream.bits(2, 4, col_step=16)
    for i in range(2):
        for j in range(4):
            assert int(strided[i, j]) == py_hash_counter(0xDEADBEEF, 1000 + i, 77 + 16 * j)


# ---------------------------------------------------------------------------------------------
# Determinism, separation of streams, layout independence
# ---------------------------------------------------------------------------------------------

def test_same_key_and_offsets_give_identical_bits():
    a = RandomStream(rng.derive_key(1, 2, 3), 5, 9).bits(64, 48)
    b = RandomStream(rng.derive_key(1, 2, 3), 5, 9).bits(64, 48)
    assert torch.equal(a, b)
    assert torch.equal(RandomStream(7).uniform(10, 10), RandomStream(7).uniform(10, 10))


def test_different_fields_give_different_keys_and_bits():
    base = (1234, 10, 3, 0, 2, 0, 1, 0, 0)  # seed, step, layer, micro-batch, gemm, tp, dp, pp, cp
    keys = {rng.derive_key(*base)}
    for i in range(len(base)):
        changed = list(base)
        changed[i] += 1
        keys.add(rng.derive_key(*changed))
    keys.add(rng.derive_key(*base[:-1]))       # field count matters
    keys.add(rng.derive_key(*base, 0))
    assert len(keys) == len(base) + 3
    assert all(0 <= k <= U32 for k in keys)
    draws = [RandomStream(k).bits(16, 16) for k in sorted(keys)]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            # two independent u32 grids agree in an entry with probability 2^-32
            assert (draws[i] == draws[j]).sum() <= 1


def test_large_fields_use_their_high_bits():
    assert rng.derive_key(5) != rng.derive_key(5 + (1 << 32))
    assert rng.derive_key(1 << 40) != rng.derive_key(1 << 41)


def test_roles_give_distinct_streams():
    stream = RandomStream(rng.derive_key(42, 7))
    role_bits = [stream.for_role(role).bits(8, 8) for role in rng.Role]
    assert len({stream.for_role(role).key for role in rng.Role}) == len(rng.Role)
    for i in range(len(role_bits)):
        for j in range(i + 1, len(role_bits)):
            assert (role_bits[i] == role_bits[j]).sum() <= 1


def test_derive_key_rejects_negative_fields():
    with pytest.raises(ValueError):
        rng.derive_key(1, -1)
    with pytest.raises(ValueError):
        rng.derive_key(-5)


def test_counters_beyond_32_bits_raise():
    RandomStream(1, row_offset=U32).bits(1, 4)                 # the largest row counter is fine
    RandomStream(1, col_offset=U32 - 3).bits(2, 4)              # last column counter = 2^32 - 1
    with pytest.raises(ValueError):
        RandomStream(1, row_offset=U32).bits(2, 4)
    with pytest.raises(ValueError):
        RandomStream(1, row_offset=1 << 32).bits(1, 1)
    with pytest.raises(ValueError):
        RandomStream(1, col_offset=U32 - 2).bits(1, 4)
    RandomStream(1, col_offset=U32 - 48).bits(1, 4, col_step=16)   # last counter 2^32 - 1
    with pytest.raises(ValueError):
        RandomStream(1, col_offset=U32 - 47).bits(1, 4, col_step=16)  # last counter 2^32


@pytest.mark.parametrize("parts", [2, 4])
def test_layout_independence_column_split(parts):
    """A TP rank holding columns [c0, c0 + n) draws with col_offset = c0 and gets the unsplit bits."""
    key = rng.derive_key(99, 1)
    rows, cols = 24, 256
    full = RandomStream(key).bits(rows, cols)
    width = cols // parts
    pieces = [RandomStream(key).shifted(col_offset=p * width).bits(rows, width) for p in range(parts)]
    assert torch.equal(torch.cat(pieces, dim=1), full)


@pytest.mark.parametrize("parts", [2, 3])
def test_layout_independence_row_split(parts):
    key = rng.derive_key(99, 2)
    rows, cols = 48, 64
    full = RandomStream(key, 0, 0).uniform(rows, cols)
    height = rows // parts
    pieces = [RandomStream(key, row_offset=p * height).uniform(height, cols) for p in range(parts)]
    assert torch.equal(torch.cat(pieces, dim=0), full)


def test_layout_independence_2d_tiles_and_block_counters():
    key = rng.derive_key(3)
    full = RandomStream(key).bits(32, 128)
    tile = RandomStream(key, row_offset=16, col_offset=64).bits(16, 64)
    assert torch.equal(tile, full[16:, 64:])
    # per-16-block counters (col_step=16): a shard starting at column 64 sees blocks 4.. of the full row
    blocks_full = RandomStream(key).bits(8, 8, col_step=16)
    blocks_shard = RandomStream(key, col_offset=64).bits(8, 4, col_step=16)
    assert torch.equal(blocks_shard, blocks_full[:, 4:])
    assert torch.equal(blocks_full, full[:8, ::16])


def test_bits_device_and_dtype():
    bits = RandomStream(5).bits(4, 4)
    assert bits.dtype == torch.int64 and bits.device.type == "cpu"


# ---------------------------------------------------------------------------------------------
# Uniforms and signs: statistical checks with fixed keys
# ---------------------------------------------------------------------------------------------

def test_uniform_from_bits_range_and_resolution():
    bits = torch.tensor([0, 255, 256, U32, 0x80000000, U32 - 255], dtype=torch.int64)
    u = rng.uniform_from_bits(bits)
    assert u.dtype == torch.float32
    assert u.tolist() == [0.0, 0.0, 2.0 ** -24, 1 - 2.0 ** -24, 0.5, 1 - 2.0 ** -24]


def test_uniform_moments_and_buckets():
    n_rows, n_cols = 1000, 1000
    u = RandomStream(rng.derive_key(2024, 5)).uniform(n_rows, n_cols).double()
    n = u.numel()
    assert (u >= 0).all() and (u < 1).all()
    # mean 1/2 with standard error sqrt(1/12/n)
    assert abs(float(u.mean()) - 0.5) <= 4 * math.sqrt(1 / 12 / n)
    # variance 1/12: Var of (u - 1/2)^2 is 1/180 for U(0,1)
    assert abs(float(((u - 0.5) ** 2).mean()) - 1 / 12) <= 4 * math.sqrt(1 / 180 / n)
    # chi-square over 256 buckets: df = 255, mean 255, sd sqrt(510); accept within 5 sd
    counts = torch.bincount((u * 256).long().reshape(-1), minlength=256).double()
    expected = n / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - 255) <= 5 * math.sqrt(2 * 255), chi2
    # neighbouring counters are uncorrelated (rows and columns)
    for a, b in ((u[:, 1:], u[:, :-1]), (u[1:, :], u[:-1, :])):
        corr = float(((a - 0.5) * (b - 0.5)).mean() / (1 / 12))
        assert abs(corr) <= 4 / math.sqrt(a.numel()), corr


def test_uniform_low_bits_are_balanced():
    """Each of the 24 bits used by uniform_from_bits is 1 half of the time."""
    bits = RandomStream(rng.derive_key(77)).bits(500, 400)
    n = bits.numel()
    for b in range(8, 32):
        ones = int(((bits >> b) & 1).sum())
        assert abs(ones - n / 2) <= 4.5 * math.sqrt(n / 4), (b, ones)


def test_random_signs_are_balanced_pm_one():
    n = 200_000
    s = rng.random_signs(rng.derive_key(11), n)
    assert s.dtype == torch.float32 and s.shape == (n,)
    assert ((s == 1.0) | (s == -1.0)).all()
    plus = int((s > 0).sum())
    assert abs(plus - n / 2) <= 4 * math.sqrt(n / 4)
    # lag-1 correlation
    corr = float((s[1:] * s[:-1]).mean())
    assert abs(corr) <= 4 / math.sqrt(n - 1)


def test_random_signs_deterministic_and_key_dependent():
    a = rng.random_signs(123, 128)
    assert torch.equal(a, rng.random_signs(123, 128))
    b = rng.random_signs(124, 128)
    assert not torch.equal(a, b)
    # prefix property: the first n signs of a longer vector are the n-vector
    assert torch.equal(rng.random_signs(123, 512)[:128], a)
    # many keys: the sign vectors (as bit strings) are all distinct, and each position is balanced
    vecs = torch.stack([rng.random_signs(k, 128) for k in range(2000)])
    assert len({tuple(v.tolist()) for v in vecs}) == 2000
    frac = (vecs > 0).double().mean(dim=0)
    assert ((frac - 0.5).abs() <= 5 * math.sqrt(0.25 / 2000)).all()


def test_random_signs_match_python_reference():
    s = rng.random_signs(0xABCDEF, 64)
    expected = [1.0 - 2.0 * (py_hash_counter(0xABCDEF, 0, i) >> 31) for i in range(64)]
    assert s.tolist() == expected


def test_two_piece_offsets_draw_the_unsplit_operands_bits():
    # SwiGLU fc1 at TP=2, rank 1 of a [T, 2*ffn] operand (ffn=96): local columns [0, 48) are global
    # gate columns [48, 96), local [48, 96) are global up columns [144, 192)
    ffn, s = 96, 48
    full = RandomStream(1234).bits(5, 2 * ffn)
    cols = rng.TwoPieces(offset=s, split=s, offset_hi=ffn + s)
    local = RandomStream(1234, 0, cols).bits(5, 2 * s)
    assert torch.equal(local, torch.cat([full[:, s:ffn], full[:, ffn + s:]], dim=1))
    rows = RandomStream(1234, cols, 0).bits(2 * s, 3)          # the same split along rows (E^T)
    assert torch.equal(rows, torch.cat([RandomStream(1234).bits(2 * ffn, 3)[s:ffn],
                                        RandomStream(1234).bits(2 * ffn, 3)[ffn + s:]]))
    # a step of 16 (per-block scale draws) maps the block starts the same way
    blocks = RandomStream(9, 0, cols).bits(2, 2 * s // 16, col_step=16)
    assert torch.equal(blocks, RandomStream(9).bits(2, 2 * ffn // 16, col_step=16)[:, [3, 4, 5, 9, 10, 11]])
    # kernels get (off, split, off_hi - split) per dim; no split leaves every index in the first piece
    assert RandomStream(1, 7, cols).kernel_offsets() == (7, rng.NO_SPLIT, 7, s, s, ffn)
    with pytest.raises(ValueError, match="non-negative"):
        rng.TwoPieces(-1, 0, 0)
    with pytest.raises(ValueError, match="exceeds 32 bits"):
        RandomStream(1, 0, rng.TwoPieces(0, 4, rng.MASK32)).bits(1, 8)
