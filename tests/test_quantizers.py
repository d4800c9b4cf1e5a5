"""megatron_fp4.quantizers: exactness against the spec's pseudocode, SR structure, special values.

References are float64 brute-force re-implementations of numerics.md §3.1-§3.5 and §5.2-§5.3
(tests/fp4_reference.py). The relMSE sanity targets of §8 live in test_sanity_targets.py.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from megatron_fp4 import quantizers as Q
from megatron_fp4.hadamard import rht
from megatron_fp4.rng import RandomStream, derive_key, random_signs

import fp4_reference as ref
from fp4_reference import gaussian

F64 = torch.float64
HEADROOM_V = 6.0 * 16.0 / 17.0


def lib_codes(qt) -> torch.Tensor:
    return ref.unpack_nibbles(qt.packed)



def tie_rich(rows, cols, seed, g_exp=0, block_rows=1):
    """Data hitting exact RN4 ties and exact RN8 scale ties.

    Every 128-chunk of every row starts with 2688 * 2^g_exp, so the per-tensor scale (v 6, Smax 448)
    and every double-block outer scale are exactly 2^g_exp. Each block (or 16x16 tile) picks an E4M3
    scale s (sometimes the midpoint of two E4M3 values, an RN8 tie), holds one element 6*s*g that
    fixes its amax, and otherwise elements y*s*g with y drawn from the E2M1 grid and its midpoints.
    """
    gen = torch.Generator().manual_seed(seed)
    g = 2.0 ** g_exp
    ys = torch.tensor(list(ref.E2M1_POS.tolist()) + [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F64)
    nb_r, nb_c = rows // block_rows, cols // 16
    idx = torch.randint(1, 126, (nb_r, nb_c), generator=gen)
    s = ref.E4M3_POS[idx]
    mid = (ref.E4M3_POS[idx] + ref.E4M3_POS[idx + 1]) / 2
    s = torch.where(torch.rand(nb_r, nb_c, generator=gen) < 0.25, mid, s)
    s_e = s.repeat_interleave(block_rows, 0).repeat_interleave(16, 1)
    y = ys[torch.randint(0, ys.numel(), (rows, cols), generator=gen)]
    y = y * torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0)
    x = y * s_e * g
    x[:, ::16] = 6.0 * s_e[:, ::16] * g * torch.where(torch.rand(rows, cols // 16, generator=gen) < 0.5, -1.0, 1.0)
    x[:, ::128] = 2688.0 * g
    assert torch.equal(x.float().double(), x)
    return x.float()


# ---------------------------------------------------------------------------------------------
# §3.1 / §3.3 Q16 RN: bit-exact against the pseudocode
# ---------------------------------------------------------------------------------------------

def _assert_q16_equal(qt, expected, block_rows=1):
    assert torch.equal(lib_codes(qt), expected["codes"])
    assert torch.equal(qt.block_scales.double(), expected["scales"])
    assert qt.block_scales.dtype == torch.float8_e4m3fn
    assert qt.block_scales.shape == expected["scales"].shape
    assert float(qt.tensor_scale) == expected["g"]
    assert qt.block_rows == block_rows


Q16_CASES = {
    "rn-even": dict(v=6.0, smax=448.0, ties="even"),
    "rn-away": dict(v=6.0, smax=448.0, ties="away"),
    "headroom-v": dict(v=HEADROOM_V, smax=448.0, ties="even"),
    "smax256": dict(v=6.0, smax=256.0, ties="even"),
}


@pytest.mark.parametrize("case", list(Q16_CASES))
@pytest.mark.parametrize("block_rows", [1, 16])
@pytest.mark.parametrize("scale,spread", [(1.0, 0), (2.0 ** -40, 0), (3.0e20, 0), (1.0, 12), (1e-3, 20)])
def test_q16_rn_matches_pseudocode(case, block_rows, scale, spread):
    kw = Q16_CASES[case]
    x = gaussian(32, 128, seed=zlib.crc32(repr((case, block_rows, scale, spread)).encode()), scale=scale,
                 spread=spread)
    qt = Q.quantize_nvfp4(x, v=kw["v"], smax=kw["smax"], ties=kw["ties"], block_rows=block_rows)
    expected = ref.ref_q16(x, kw["v"], kw["smax"], kw["ties"], block_rows)
    _assert_q16_equal(qt, expected, block_rows)
    amax_b = ref._blocks(x.double(), block_rows).abs().amax(dim=(1, 3))
    assert int(qt.flushed_blocks) == int(((expected["scales"] == 0) & (amax_b > 0)).sum())


def test_q16_flushes_tiny_blocks():
    x = gaussian(16, 64, seed=3)
    x[:, 16:32] *= 1e-7                      # amax_b / (v g) far below 2^-10: scale rounds to 0
    qt = Q.quantize_nvfp4(x)
    expected = ref.ref_q16(x)
    _assert_q16_equal(qt, expected)
    assert (qt.block_scales.float()[:, 1] == 0).all() and int(qt.flushed_blocks) == 16
    assert (qt.dequantize()[:, 16:32] == 0).all()


@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("block_rows", [1, 16])
@pytest.mark.parametrize("g_exp", [0, -17, 13])
def test_q16_rn_exact_ties(ties, block_rows, g_exp):
    x = tie_rich(32, 256, seed=g_exp + 50 * block_rows, g_exp=g_exp, block_rows=block_rows)
    qt = Q.quantize_nvfp4(x, ties=ties, block_rows=block_rows)
    expected = ref.ref_q16(x, ties=ties, block_rows=block_rows)
    assert expected["g"] == 2.0 ** g_exp
    _assert_q16_equal(qt, expected, block_rows)
    # the data really exercise ties at both levels
    y = expected["y"].abs()
    assert torch.isin(y, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F64)).sum() > 100


def test_q16_tie_modes_differ_only_at_ties():
    x = tie_rich(16, 128, seed=9)
    even = lib_codes(Q.quantize_nvfp4(x, ties="even"))
    away = lib_codes(Q.quantize_nvfp4(x, ties="away"))
    y = ref.ref_q16(x)["y"].abs()
    at_tie = torch.isin(y, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F64))
    assert torch.equal(even[~at_tie], away[~at_tie])
    # ties above an even code (0.25, 1.25, 2.5, 5) differ; above an odd code both round up
    differs = torch.isin(y, torch.tensor([0.25, 1.25, 2.5, 5.0], dtype=F64))
    assert (even[differs] != away[differs]).all() and differs.sum() > 50
    assert torch.equal(even[at_tie & ~differs], away[at_tie & ~differs])


def test_16x16_tiles_share_one_scale_and_transpose_exactly():
    x = gaussian(48, 64, seed=5, spread=3)
    qt = Q.quantize_nvfp4(x, block_rows=16)
    assert qt.block_scales.shape == (3, 4)
    qt_t = Q.quantize_nvfp4(x.t().contiguous(), block_rows=16)
    # §3.3: the transposed weight has identical dequantized values
    assert torch.equal(qt_t.dequantize(), qt.dequantize().t())


# ---------------------------------------------------------------------------------------------
# Order of operations at ties (§2.1: "y = x / d with d = s_b * g formed first"; §3.1 / §3.4: the
# scale argument (amax_b / v) / g, resp. (amax_b / s_out) / 6). Values are searched (float32 ulp
# neighbourhoods) so that the spec's order lands exactly on a tie while other plausible orders
# (x / g / s, x * (1 / d), a / (v * g), ...) do not: the outcome at ties then tells the orders apart.
# ---------------------------------------------------------------------------------------------

E2M1_TIES = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=F64)


def _f32_steps(x: torch.Tensor, max_steps: int = 8) -> torch.Tensor:
    """Positive float32 values x and their +-1..max_steps ulp neighbours, as float64 [..., 2k+1]."""
    x = x.float()
    out = [x.double()]
    up, down = x, x
    for _ in range(max_steps):
        up = torch.nextafter(up, torch.full_like(up, float("inf")))
        down = torch.nextafter(down, torch.zeros_like(down))
        out += [up.double(), down.double()]
    return torch.stack(out, dim=-1)


def _search_ties(target, base, spec_order, other_orders, outcome):
    """Per entry, a float32 value c near `base` with spec_order(c) == target, preferring one where
    the rounding outcome of the most other orders differs. Returns (c or NaN, found mask,
    [other order's value at c])."""
    cand = _f32_steps(base)
    spec = spec_order(cand) == target[..., None]
    score = spec.to(torch.int64)
    expected = outcome(target)[..., None]
    for order in other_orders:
        score = score + spec.to(torch.int64) * (outcome(order(cand)) != expected).to(torch.int64)
    best = score.argmax(dim=-1, keepdim=True)
    chosen = torch.gather(cand, -1, best)[..., 0]
    found = torch.gather(score, -1, best)[..., 0] > 0
    others = [torch.gather(order(cand), -1, best)[..., 0] for order in other_orders]
    return torch.where(found, chosen, torch.full_like(chosen, float("nan"))), found, others


def _plant_element_ties(x, scale, unit, seed, ties):
    """Replace 3 non-maximal elements per 16-block by values whose y = x / f32(scale * unit) is an
    exact RN4 tie. scale, unit: per-16-block [R, C/16]. Returns (x, planted mask, [|y| computed in
    other orders]: (x / unit) / scale, (x / scale) / unit, x * (1 / d))."""
    x = x.double().clone()
    rows, cols = x.shape
    gen = torch.Generator().manual_seed(seed)
    s_e = scale.repeat_interleave(16, dim=1)
    u_e = unit.repeat_interleave(16, dim=1)
    d = ref.f32(s_e * u_e)
    target = E2M1_TIES[torch.randint(0, 7, (rows, cols), generator=gen)]
    chosen, found, others = _search_ties(
        target, target * d,
        lambda c: ref.f32(c / d[..., None]),
        [lambda c: ref.f32(ref.f32(c / u_e[..., None]) / s_e[..., None]),
         lambda c: ref.f32(ref.f32(c / s_e[..., None]) / u_e[..., None]),
         lambda c: ref.f32(c * ref.f32(1.0 / d)[..., None])],
        lambda y: ref.rn4_codes(y, ties))
    slot = torch.zeros(rows, cols, dtype=torch.bool)
    for offset in (3, 8, 13):
        slot[:, offset::16] = True
    argmax = x.abs().reshape(rows, cols // 16, 16).argmax(dim=2).repeat_interleave(16, dim=1)
    slot &= argmax != torch.arange(cols).remainder(16)[None, :]       # keep every block amax
    planted = slot & found
    sign = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0).to(F64)
    x = torch.where(planted, sign * chosen.nan_to_num(), x)
    assert torch.equal(x.float().double(), x)
    return x.float(), planted, others


def _plant_scale_ties(x, unit, v, seed, v_first, keep_blocks):
    """Rescale 16-blocks (except keep_blocks) to a block amax A whose scale argument, (A / v) / unit
    (v_first) or (A / unit) / v, is exactly an E4M3 midpoint. Returns (x, planted blocks, mid,
    [the scale argument in other orders]: the swapped order, A / (unit * v), A * (1 / (unit * v)))."""
    gen = torch.Generator().manual_seed(seed)
    rows, nb = unit.shape
    idx = torch.randint(16, 120, unit.shape, generator=gen)
    mid = (ref.E4M3_POS[idx] + ref.E4M3_POS[idx + 1]) / 2
    v32 = float(ref.f32(torch.tensor(v, dtype=F64)))
    un = unit[..., None]
    if v_first:
        spec = lambda c: ref.f32(ref.f32(c / v32) / un)
        others = [lambda c: ref.f32(ref.f32(c / un) / v32)]
    else:
        spec = lambda c: ref.f32(ref.f32(c / un) / v32)
        others = [lambda c: ref.f32(ref.f32(c / v32) / un)]
    others.append(lambda c: ref.f32(c / ref.f32(un * v32)))
    others.append(lambda c: ref.f32(c * ref.f32(1.0 / ref.f32(un * v32))))
    a, found, other_t = _search_ties(mid, mid * v32 * unit, spec, others, ref.rn8)
    planted = found & ~keep_blocks
    xb = x.double().reshape(rows, nb, 16)
    xb_unit = xb / xb.abs().amax(dim=2, keepdim=True)         # block max exactly 1 (argmax keeps +-1)
    xt = torch.where(planted[..., None], xb_unit * a.nan_to_num()[..., None], xb)
    xt = ref.f32(xt).reshape(rows, nb * 16)
    return xt.float(), planted, mid, other_t


def _rn4_outcome_differs(others, y, planted, ties):
    """Per other order: the number of planted elements whose RN4 code would change."""
    ours = ref.rn4_codes(y, ties)
    return [int((ref.rn4_codes(o.to(F64) * torch.sign(y), ties) != ours)[planted].sum()) for o in others]


def _rn8_outcome_differs(other_t, scales, planted):
    return [int((ref.rn8(t) != scales)[planted].sum()) for t in other_t]


@pytest.mark.parametrize("ties", ["even", "away"])
def test_q16_element_ties_follow_the_spec_order(ties):
    x = gaussian(32, 256, seed=61) * 0.8219
    r = ref.ref_q16(x)
    xt, planted, others = _plant_element_ties(x, r["scales"], torch.full_like(r["scales"], r["g"]), 62, ties)
    expected = ref.ref_q16(xt, ties=ties)
    assert expected["g"] == r["g"] and torch.equal(expected["scales"], r["scales"])
    assert torch.isin(expected["y"][planted].abs(), E2M1_TIES).all() and planted.sum() > 1000
    assert min(_rn4_outcome_differs(others, expected["y"], planted, ties)) > 20
    _assert_q16_equal(Q.quantize_nvfp4(xt, ties=ties), expected)


def test_q16_scale_ties_follow_the_spec_order():
    x = gaussian(32, 256, seed=63)
    x[0, 0] = 4.77        # the tensor amax: g = 4.77 / 2688 (a g for which other orders can differ)
    g = ref.ref_q16(x)["g"]
    keep = torch.zeros(32, 16, dtype=torch.bool)
    keep[0, 0] = True                                         # the tensor-max block stays as it is
    xt, planted, mid, other_t = _plant_scale_ties(x, torch.full((32, 16), g, dtype=F64), 6.0, 64, True, keep)
    expected = ref.ref_q16(xt)
    assert expected["g"] == g and planted.sum() > 300
    assert min(_rn8_outcome_differs(other_t, expected["scales"], planted)) > 10
    assert (expected["scales"][planted] == ref.rn8(mid[planted])).all()
    _assert_q16_equal(Q.quantize_nvfp4(xt), expected)


@pytest.mark.parametrize("ties", ["even", "away"])
def test_qdb_element_ties_follow_the_spec_order(ties):
    x = gaussian(16, 256, seed=65) * 0.917
    r = ref.ref_qdb(x)
    xt, planted, others = _plant_element_ties(x, r["s_in"], r["s_out"].repeat_interleave(8, 1), 66, ties)
    expected = ref.ref_qdb(xt, ties)
    assert torch.equal(expected["s_in"], r["s_in"]) and torch.equal(expected["s_out"], r["s_out"])
    assert torch.isin(expected["y"][planted].abs(), E2M1_TIES).all() and planted.sum() > 500
    assert min(_rn4_outcome_differs(others, expected["y"], planted, ties)) > 10
    _assert_qdb_equal(Q.quantize_double_block(xt, ties=ties), expected)


def test_qdb_scale_ties_follow_the_spec_order():
    rows = 16
    x = gaussian(rows, 256, seed=67)
    x[:, ::128] = 3.77 * torch.arange(1, rows + 1, dtype=torch.float32)[:, None]   # outer amax
    s_out = ref.ref_qdb(x)["s_out"]                                               # [R, 2]
    keep = torch.zeros(rows, 16, dtype=torch.bool)
    keep[:, ::8] = True                                       # the outer-max blocks stay as they are
    xt, planted, mid, other_t = _plant_scale_ties(x, s_out.repeat_interleave(8, 1), 6.0, 68, False, keep)
    expected = ref.ref_qdb(xt)
    assert torch.equal(expected["s_out"], s_out) and planted.sum() > 100
    assert min(_rn8_outcome_differs(other_t, expected["s_in"], planted)) > 5
    assert (expected["s_in"][planted] == ref.rn8(mid[planted])).all()
    _assert_qdb_equal(Q.quantize_double_block(xt), expected)


@pytest.mark.parametrize("ties", ["even", "away"])
def test_ms_eden_element_ties_follow_the_spec_order(ties):
    # data on which every rival order changes the outcome of some planted ties (the power check below;
    # for about one tensor scale in three, one rival agrees with the spec order on every tie)
    z = _rotated_operand(rows=16, cols=256, seed=71)
    r = ref.ref_ms_eden_per128(z)
    zt, planted, others = _plant_element_ties(z, r["s"], torch.full_like(r["s"], r["g"]), 72, ties)
    expected = ref.ref_ms_eden_per128(zt, ties)
    assert expected["g"] == r["g"] and torch.equal(expected["s"], r["s"])
    assert torch.isin(expected["u"][planted].abs(), E2M1_TIES).all() and planted.sum() > 500
    assert min(_rn4_outcome_differs(others, expected["u"], planted, ties)) > 10
    qt = Q.quantize_ms_eden(zt, stream=RandomStream(5), ties=ties)
    assert torch.equal(lib_codes(qt), expected["codes"])

# ---------------------------------------------------------------------------------------------
# §3.2 Four Over Six
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_rows", [1, 16])
@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("seed,spread", [(0, 0), (1, 6)])
def test_four_over_six_matches_pseudocode(block_rows, ties, seed, spread):
    x = gaussian(64, 256, seed=seed + 10 * block_rows, spread=spread)
    qt = Q.quantize_nvfp4(x, four_over_six=True, smax=256.0, ties=ties, block_rows=block_rows)
    expected = ref.ref_q16_four_over_six(x, ties=ties, block_rows=block_rows)
    amb = expected["ambiguous"]
    assert float(amb.double().mean()) < 0.01, "the comparison must be decisive for almost all blocks"
    assert float(qt.tensor_scale) == expected["g"]
    scales = qt.block_scales.double()
    assert torch.equal(scales[~amb], expected["scales"][~amb])
    codes = ref._blocks(lib_codes(qt), block_rows)
    exp_codes = ref._blocks(expected["codes"], block_rows)
    keep = ~amb[:, None, :, None].expand_as(codes)
    assert torch.equal(codes[keep], exp_codes[keep])
    if amb.any():                             # ambiguous blocks: one of the two candidates, entirely
        c6 = ref._blocks(expected["r6"]["codes"], block_rows)
        c4 = ref._blocks(expected["r4"]["codes"], block_rows)
        is6 = (codes == c6).all(dim=(1, 3)) & (scales == expected["r6"]["scales"])
        is4 = (codes == c4).all(dim=(1, 3)) & (scales == expected["r4"]["scales"])
        assert (is6 | is4)[amb].all()
    # exact ties (identical represented values; rare on Gaussian data) go to max->6
    ties6 = expected["exact_tie"] & (expected["r6"]["scales"] > 0)
    assert torch.equal(scales[ties6], expected["r6"]["scales"][ties6])
    # both candidates are really used
    use4 = scales != expected["r6"]["scales"]
    assert use4.any() and (~use4).any()
    if block_rows == 1:
        assert 0.05 < float(use4.double().mean()) < 0.95


@pytest.mark.parametrize("block_rows", [1, 16])
@pytest.mark.parametrize("amax", [1536.0, 1728.0])
def test_four_over_six_identical_candidates_go_to_max6(block_rows, amax):
    """Blocks on the grid points both candidates share (max->6 values 0, 1.5, 3, 6 times s6 equal
    max->4 values 0, 1, 2, 4 times s4 = 1.5 s6) are exact SSE ties; mixed with Gaussian blocks.
    g = amax / 1536: 1, and 1.125 (not a power of two; y * s6 * g is still exact in FP32)."""
    rows, cols = 32, 256
    gen = torch.Generator().manual_seed(71)
    x = gaussian(rows, cols, seed=72).double()
    x[0, 0] = amax
    g = amax / 1536.0
    exps = torch.randint(-6, 6, (rows // block_rows, cols // 16), generator=gen).to(F64)
    mant = torch.tensor([1.0, 1.25, 1.5], dtype=F64)[torch.randint(0, 3, exps.shape, generator=gen)]
    s6 = (mant * torch.exp2(exps)).repeat_interleave(block_rows, 0).repeat_interleave(16, 1)
    y = torch.tensor([0.0, 1.5, 3.0, 6.0, -1.5, -3.0, -6.0], dtype=F64)[torch.randint(0, 7, (rows, cols), generator=gen)]
    y[:, ::16] = 6.0
    shared = (torch.rand(rows // block_rows, cols // 16, generator=gen) < 0.5)
    shared[0, 0] = False
    shared_e = shared.repeat_interleave(block_rows, 0).repeat_interleave(16, 1)
    x = torch.where(shared_e, y * s6 * g, x).float()
    assert torch.equal(x.double()[shared_e], (y * s6 * g)[shared_e])
    expected = ref.ref_q16_four_over_six(x, block_rows=block_rows)
    assert expected["g"] == g
    assert expected["exact_tie"][shared].all()
    qt = Q.quantize_nvfp4(x, four_over_six=True, smax=256.0, block_rows=block_rows)
    scales = qt.block_scales.double()
    assert torch.equal(scales[shared], expected["r6"]["scales"][shared])
    assert torch.equal(scales[shared], s6[::block_rows, ::16][shared])
    amb = expected["ambiguous"]
    assert torch.equal(scales[~amb], expected["scales"][~amb])
    assert torch.equal(qt.dequantize()[shared_e], x[shared_e])


def test_four_over_six_sse_ties_go_to_max6():
    # g = 1 (amax 1536 = 256 * 6). Each block is represented exactly by both candidates:
    # block 0: [1536, 0..]: s6 = 256, s4 = 384; block 1: [768, 384, 0..]: s6 = 128, s4 = 192;
    # block 2: [6, 3, 1.5 ...] * 2^-3 s6 = 2^-3, s4 = 0.1875; all SSEs are 0 -> ties -> max->6.
    x = torch.zeros(1, 64)
    x[0, 0] = 1536.0
    x[0, 16], x[0, 17] = 768.0, -384.0
    x[0, 32:35] = torch.tensor([6.0, 3.0, -1.5]) * 2.0 ** -3
    # block 3: [4, 1] -> max->6 would need y = 6, 1.5: s6 = 2/3 (not E4M3: rounds to 0.6875, error);
    # max->4 s4 = 1 exact -> SSE 0 < SSE6, so max->4 wins
    x[0, 48], x[0, 49] = 4.0, 1.0
    qt = Q.quantize_nvfp4(x, four_over_six=True, smax=256.0)
    assert float(qt.tensor_scale) == 1.0
    assert qt.block_scales.float().tolist() == [[256.0, 128.0, 0.125, 1.0]]
    assert torch.equal(qt.dequantize(), x)


# The 4/6 choice is made against the original values (issue 15, item 7): with a tensor scale that is
# not a power of two, deciding on fl32(x / g) instead picks the worse candidate in near-ties.
REPRO_BLOCK = [6.75, 5.203127384185791, 0, 0, 0, 0, 0, 0, 4.148438453674316, 0, -0.21093739569187164,
               0, 0, 0, 0, 0]


def _reproducer_row():
    x = torch.zeros(1, 32)
    x[0, 0] = 1728.0                                   # g = 1728 / 1536 = 1.125
    x[0, 16:] = torch.tensor(REPRO_BLOCK)
    return x


def _sse_in_units_of_g(x, expected, block_rows=1):
    """The old (wrong) rule as a control: SSEs of fl32(x / g) against q * s, in float64."""
    xg = ref.f32(x.double() / expected["g"])
    sse = []
    for r in (expected["r6"], expected["r4"]):
        err = xg - ref.dequant_per_tensor(r["codes"], r["scales"], 1.0, block_rows)
        sse.append(ref._blocks(err ** 2, block_rows).sum(dim=(1, 3)))
    return sse


def test_four_over_six_reproducer_decides_on_original_values():
    x = _reproducer_row()
    expected = ref.ref_q16_four_over_six(x)
    assert expected["g"] == 1.125
    # the exact SSEs against the original values: max->4 is lower by 5.4e-7 (4e-7 relative)
    assert abs(float(expected["sse"][0, 0, 1]) - 0.662478224) < 1e-9
    assert abs(float(expected["sse"][1, 0, 1]) - 0.662477688) < 1e-9
    assert bool(expected["use4"][0, 1]) and not bool(expected["ambiguous"][0, 1])
    old6, old4 = _sse_in_units_of_g(x, expected)
    assert not bool(old4[0, 1] < old6[0, 1])           # the old rule picks max->6 here
    qt = Q.quantize_nvfp4(x, four_over_six=True, smax=256.0)
    assert qt.block_scales.float().tolist() == [[256.0, 1.5]]
    want = torch.zeros(16, dtype=F64)
    want[[0, 1, 8]] = torch.tensor([6.75, 5.0625, 3.375], dtype=F64)
    assert torch.equal(qt.dequantize()[0, 16:].double(), want)
    assert torch.equal(lib_codes(qt), expected["codes"])


def _assert_four_over_six_choice(qt, expected, block_rows):
    """Codes and scales of every block: the lower exact SSE where the two SSEs are further apart
    than the package's FP64 evaluation can misorder (ref.FOUR_OVER_SIX_FP64_RTOL), one of the two
    candidates entirely inside that band, max->6 where the candidates are identical."""
    amb = expected["ambiguous"]
    scales = qt.block_scales.double()
    codes = ref._blocks(lib_codes(qt), block_rows)
    assert torch.equal(scales[~amb], expected["scales"][~amb])
    keep = ~amb[:, None, :, None].expand_as(codes)
    assert torch.equal(codes[keep], ref._blocks(expected["codes"], block_rows)[keep])
    c6 = ref._blocks(expected["r6"]["codes"], block_rows)
    c4 = ref._blocks(expected["r4"]["codes"], block_rows)
    is6 = (codes == c6).all(dim=3).all(dim=1) & (scales == expected["r6"]["scales"])
    is4 = (codes == c4).all(dim=3).all(dim=1) & (scales == expected["r4"]["scales"])
    assert (is6 | is4).all()
    assert is6[expected["exact_tie"]].all()


@pytest.mark.parametrize("block_rows", [1, 16])
@pytest.mark.parametrize("amax", [1728.0, 1000.0])
def test_four_over_six_near_ties_follow_the_exact_sse(block_rows, amax):
    """Blocks built so that the two candidates' exact SSEs nearly tie (relative gaps from ~2^-22,
    inside what an FP32 evaluation can resolve, up to ~2^-10), at g = 1.125 and at a g with a full
    24-bit mantissa (1000 / 1536): the twin decides exactly like the exact reference."""
    rows = 32 if block_rows == 1 else 128
    x = ref.four_over_six_near_ties(rows, 128, seed=3, amax=amax, block_rows=block_rows,
                                    density=1.0 if block_rows == 1 else 1 / 32)
    expected = ref.ref_q16_four_over_six(x, block_rows=block_rows)
    assert expected["g"] == float(torch.tensor(amax / 1536.0).float())
    gap = expected["rel_gap"]
    inside_fp32 = gap <= ref.FOUR_OVER_SIX_FP32_RTOL
    assert int(inside_fp32.sum()) >= gap.numel() // 8     # the data is rich in near-ties
    assert int(expected["ambiguous"].sum()) <= 4           # and almost all of them decidable
    use4 = expected["use4"]
    assert 0.2 < float(use4[inside_fp32].double().mean()) < 0.8      # near-ties of both signs
    # control: the rule in units of g gets some of these blocks wrong (the test has teeth)
    old6, old4 = _sse_in_units_of_g(x, expected, block_rows)
    assert ((old4 < old6) != use4)[~expected["ambiguous"]].any()
    qt = Q.quantize_nvfp4(x, four_over_six=True, smax=256.0, block_rows=block_rows)
    assert float(qt.tensor_scale) == expected["g"]
    _assert_four_over_six_choice(qt, expected, block_rows)


def _exact_square(e):
    """float64 nearest to the exact square of a rational (Python's float(Fraction) rounds correctly)."""
    return float(e * e)


@pytest.mark.parametrize("case", ["near-ties", "spread", "huge", "tiny"])
def test_four_over_six_sse_is_the_exact_error_squared_once(case):
    """four_over_six_sse(x, q * s, g): (x - q s g)^2 with the error exact and the square rounded once,
    element by element against rational arithmetic, for both candidates (max->6: v = 6 at Smax 256;
    max->4: v = 4 at Smax 384, the same g and block scales RN8(amax_b / 4 / g))."""
    from fractions import Fraction
    x = {"near-ties": lambda: ref.four_over_six_near_ties(16, 64, seed=8, amax=1000.0),
         "spread": lambda: gaussian(16, 64, seed=9, spread=6),
         "huge": lambda: gaussian(16, 64, seed=10, scale=1e36, spread=2),
         "tiny": lambda: gaussian(16, 64, seed=11, scale=1e-30, spread=2)}[case]()
    for v, smax in ((6.0, 256.0), (4.0, 384.0)):
        q = Q.quantize_nvfp4(x, v=v, smax=smax)
        cand, g = q.dequantize_unscaled(), q.tensor_scale
        got = Q.four_over_six_sse(x, cand, g)
        assert got.dtype == F64
        gf = Fraction(float(g))
        want = [_exact_square(Fraction(a) - Fraction(c) * gf)
                for a, c in zip(x.double().reshape(-1).tolist(), cand.double().reshape(-1).tolist())]
        assert got.reshape(-1).tolist() == want


def test_four_over_six_rejects_sr():
    with pytest.raises(ValueError):
        Q.quantize_nvfp4(gaussian(16, 32, 0), mode="sr", stream=RandomStream(1), four_over_six=True)


# ---------------------------------------------------------------------------------------------
# §3.4 double-block quantizer
# ---------------------------------------------------------------------------------------------

def _assert_qdb_equal(qt, expected):
    assert qt.tensor_scale is None
    assert torch.equal(lib_codes(qt), expected["codes"])
    assert torch.equal(qt.block_scales.double(), expected["s_in"])
    assert qt.outer_scales.dtype == torch.float32
    assert torch.equal(qt.outer_scales.double(), expected["s_out"])


@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("scale,spread", [(1.0, 0), (2.0 ** -50, 0), (1e25, 0), (1.0, 8), (1.0, 20)])
def test_qdb_rn_matches_pseudocode(ties, scale, spread):
    x = gaussian(32, 512, seed=int(spread) + 7, scale=scale, spread=spread)
    x[:, 128:256] *= 1e-3                                    # outer blocks of different magnitude
    qt = Q.quantize_double_block(x, ties=ties)
    expected = ref.ref_qdb(x, ties)
    _assert_qdb_equal(qt, expected)
    # the inner block holding the 128-block maximum gets s_in = 448 and its maximum maps to 6
    s_in = expected["s_in"].reshape(32, 4, 8)
    assert (s_in.amax(dim=2) == 448.0).all()


@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("g_exp", [0, -30, 20])
def test_qdb_rn_exact_ties(ties, g_exp):
    x = tie_rich(16, 256, seed=3 + g_exp, g_exp=g_exp)
    qt = Q.quantize_double_block(x, ties=ties)
    expected = ref.ref_qdb(x, ties)
    assert (expected["s_out"] == 2.0 ** g_exp).all()
    _assert_qdb_equal(qt, expected)


def test_qdb_outer_block_tensor_option():
    x = gaussian(16, 256, seed=4, spread=4)
    qt = Q.quantize_double_block(x, outer_block="tensor")
    expected = ref.ref_qdb(x, tensor_outer=True)
    _assert_qdb_equal(qt, expected)
    assert (qt.outer_scales == qt.outer_scales[0, 0]).all()


def test_qdb_zero_inner_blocks_and_flush():
    x = gaussian(8, 256, seed=6)
    x[:, 16:32] = 0.0                          # t == 0 -> 2^-9 (§3.4)
    x[:, 32:48] *= 1e-6                        # t < 2^-10 -> s_in rounds to 0 -> flushed
    qt = Q.quantize_double_block(x)
    expected = ref.ref_qdb(x)
    _assert_qdb_equal(qt, expected)
    assert (qt.block_scales.float()[:, 1] == 2.0 ** -9).all()
    assert (qt.block_scales.float()[:, 2] == 0).all()
    assert int(qt.flushed_blocks) == 8
    assert (qt.dequantize()[:, 16:48] == 0).all()


# ---------------------------------------------------------------------------------------------
# §5 MS-EDEN
# ---------------------------------------------------------------------------------------------

def _rotated_operand(rows=32, cols=256, seed=0, row_scale=True):
    """The backward operand of the rotated test: N(0,1) rows scaled over 8 binades, RHT-128."""
    x = gaussian(rows, cols, seed=seed)
    if row_scale:
        x = x * torch.exp2(8 * torch.arange(rows, dtype=torch.float32) / (rows - 1))[:, None]
    return rht(x, random_signs(derive_key(seed, 5), 128))


def _allowed_sr8(t: torch.Tensor, rel: float = 1e-6):
    """E4M3 neighbours of t(1 - rel) and t(1 + rel): SR8 of a t evaluated in FP32 lands in this set."""
    lo1, hi1 = ref.e4m3_bracket((t * (1 - rel)).clamp(max=448.0))
    lo2, hi2 = ref.e4m3_bracket((t * (1 + rel)).clamp(max=448.0))
    return torch.stack([lo1, hi1, lo2, hi2], dim=-1)


@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("seed,row_scale", [(0, True), (1, False), (2, True)])
def test_ms_eden_per128_structure(ties, seed, row_scale):
    z = _rotated_operand(seed=seed, row_scale=row_scale)
    qt = Q.quantize_ms_eden(z, stream=RandomStream(derive_key(seed, 1)), ties=ties)
    expected = ref.ref_ms_eden_per128(z, ties)
    assert float(qt.tensor_scale) == expected["g"]
    # codes: RN4 of u against the RN8 (uncorrected) scale s_b
    assert torch.equal(lib_codes(qt), expected["codes"])
    # scales: one of the two E4M3 neighbours of t_b = s_b * S_G (float64)
    allowed = _allowed_sr8(expected["t"])
    s_hat = qt.block_scales.double()
    assert (s_hat[..., None] == allowed).any(dim=-1).all()
    assert int(qt.clamped_scales) == 0
    assert int(qt.flushed_blocks) == 0
    assert expected["t"].max() <= 448.0
    # the correction is real: S_G != 1, and at least some scales moved off s_b
    assert (expected["S"] != 1).all()
    assert (s_hat != expected["s"]).any()


def test_ms_eden_per128_scale_sr_is_unbiased():
    """E[s_hat_b] = t_b: average over independent streams, checked per block and in aggregate."""
    z = _rotated_operand(rows=16, cols=256, seed=3)
    expected = ref.ref_ms_eden_per128(z)
    t = expected["t"]
    lo, hi = ref.e4m3_bracket(t)
    p = (t - lo) / (hi - lo)
    n = 400
    total = torch.zeros_like(t)
    for i in range(n):
        qt = Q.quantize_ms_eden(z, stream=RandomStream(derive_key(77, i)))
        total += qt.block_scales.double()
    mean = total / n
    se = (hi - lo) * torch.sqrt(p * (1 - p) / n)
    dev = mean - t
    assert (dev.abs() <= 5 * se + 3 * (hi - lo) / n).all()
    z_agg = float(dev.sum() / torch.sqrt((se ** 2).sum()))
    assert abs(z_agg) <= 4, z_agg


@pytest.mark.parametrize("ties", ["even", "away"])
@pytest.mark.parametrize("seed,row_scale", [(0, True), (1, False)])
def test_ms_eden_per16_structure(ties, seed, row_scale):
    z = _rotated_operand(seed=seed, row_scale=row_scale)
    qt = Q.quantize_ms_eden(z, stream=RandomStream(derive_key(seed, 2)), eden_group=16, ties=ties)
    expected = ref.ref_ms_eden_per16(z, ties)
    assert torch.equal(lib_codes(qt), expected["codes"])
    g = float(qt.tensor_scale)
    candidates_g = {float(ref.f32(expected["r_lo"].max() / 256)), float(ref.f32(expected["r_hi"].max() / 256))}
    assert g in candidates_g
    s_hat = qt.block_scales.double()
    ok = torch.zeros_like(s_hat, dtype=torch.bool)
    for r in (expected["r_lo"], expected["r_hi"]):
        t = ref.f32(r / g)
        rn_branch = (t < 2.0 ** -6) | (t > 448.0)
        sr_ok = (s_hat[..., None] == _allowed_sr8(t)).any(dim=-1)
        rn_ok = s_hat == ref.rn8(t)
        ok |= torch.where(rn_branch, rn_ok, sr_ok)
    assert ok.all()
    assert int(qt.clamped_scales) == 0
    # the largest corrected block scale maps to exactly 256
    assert s_hat.max() == 256.0


def test_ms_eden_per16_scale_sr_is_unbiased():
    z = _rotated_operand(rows=16, cols=128, seed=4)
    expected = ref.ref_ms_eden_per16(z)
    unambiguous = expected["r_lo"] == expected["r_hi"]       # blocks away from BF16 rounding ties
    assert float(unambiguous.double().mean()) > 0.9
    n = 400
    total = None
    for i in range(n):
        qt = Q.quantize_ms_eden(z, stream=RandomStream(derive_key(88, i)), eden_group=16)
        s = qt.block_scales.double()
        total = s if total is None else total + s
    g = float(qt.tensor_scale)
    t = expected["r_lo"] / g
    sr = (t >= 2.0 ** -6) & (t <= 448.0) & unambiguous
    lo, hi = ref.e4m3_bracket(t)
    p = (t - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    se = (hi - lo) * torch.sqrt(p * (1 - p) / n)
    dev = (total / n - t)[sr]
    assert (dev.abs() <= 5 * se[sr] + 3 * (hi - lo)[sr] / n).all()
    assert abs(float(dev.sum() / torch.sqrt((se[sr] ** 2).sum()))) <= 4


def test_ms_eden_rejects_bad_group():
    with pytest.raises(ValueError):
        Q.quantize_ms_eden(gaussian(4, 128, 0), stream=RandomStream(1), eden_group=32)


# ---------------------------------------------------------------------------------------------
# SR4: structure and unbiasedness (§2.3)
# ---------------------------------------------------------------------------------------------

SR_CASES = {
    "sr-no-headroom": dict(kind="q16", v=6.0),
    "sr-headroom": dict(kind="q16", v=HEADROOM_V),
    "qdb-sr": dict(kind="qdb", v=6.0),
    "qdb-sr-headroom": dict(kind="qdb", v=HEADROOM_V),
}


def _sr_quantize(case, x, stream):
    c = SR_CASES[case]
    if c["kind"] == "q16":
        return Q.quantize_nvfp4(x, mode="sr", v=c["v"], stream=stream)
    return Q.quantize_double_block(x, mode="sr", stream=stream, sr_headroom=6.0 / c["v"])


def _sr_reference(case, x):
    """(y, unit): y = x / divisor in FP32 (the SR input), unit = the divisor per element (float64)."""
    c = SR_CASES[case]
    if c["kind"] == "q16":
        r = ref.ref_q16(x, v=c["v"])
        unit = r["scales"].repeat_interleave(16, 1) * r["g"]
        return r, r["y"], unit
    r = ref.ref_qdb(x, v=c["v"])
    unit = r["s_in"].repeat_interleave(16, 1) * r["s_out"].repeat_interleave(128, 1)
    return r, r["y"], unit


def _check_sr_codes(codes, y):
    mag = y.abs().clamp(max=6.0)
    lo_idx, hi_idx = ref.e2m1_bracket(mag)
    c = (codes & 7).to(torch.int64)
    assert ((c == lo_idx) | (c == hi_idx)).all()
    assert torch.equal((codes >> 3).bool(), y < 0)
    assert (c[y.abs() >= 6] == 7).all()


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_codes_are_neighbours_and_scales_deterministic(case):
    x = gaussian(32, 256, seed=11, spread=4)
    qt = _sr_quantize(case, x, RandomStream(derive_key(5, 5)))
    r, y, unit = _sr_reference(case, x)
    if SR_CASES[case]["kind"] == "q16":
        assert torch.equal(qt.block_scales.double(), r["scales"]) and float(qt.tensor_scale) == r["g"]
    else:
        assert torch.equal(qt.block_scales.double(), r["s_in"])
        assert torch.equal(qt.outer_scales.double(), r["s_out"])
    _check_sr_codes(lib_codes(qt), y)
    # both directions actually occur
    c = lib_codes(qt) & 7
    lo_idx, hi_idx = ref.e2m1_bracket(y.abs().clamp(max=6.0))
    moved = lo_idx != hi_idx
    assert (c.long() == lo_idx)[moved].any() and (c.long() == hi_idx)[moved & (y.abs() < 6)].any()


def test_sr_headroom_never_clips_normal_scales():
    x = gaussian(64, 256, seed=12)
    _, y, _ = _sr_reference("sr-headroom", x)
    assert y.abs().max() <= 6.0
    _, y6, _ = _sr_reference("sr-no-headroom", x)
    assert y6.abs().max() > 6.0, "without headroom some elements exceed 6 after scale rounding"


@pytest.mark.parametrize("case", list(SR_CASES))
def test_sr_mean_converges_within_4_standard_errors(case):
    rows, cols = 8, 256
    x = gaussian(rows, cols, seed=13, spread=2)
    r, y, unit = _sr_reference(case, x)
    # E[x_hat] is the clipped y times the divisor (SR clips at 6; §2.3)
    mag = y.abs().clamp(max=6.0)
    lo_idx, hi_idx = ref.e2m1_bracket(mag)
    lo, hi = ref.E2M1_POS[lo_idx], ref.E2M1_POS[hi_idx]
    gap = hi - lo
    p = torch.where(gap > 0, (mag - lo) / torch.where(gap > 0, gap, torch.ones_like(gap)), torch.zeros_like(gap))
    expect = torch.sign(y) * mag * unit
    n = 1000
    total = torch.zeros(rows, cols, dtype=F64)
    for i in range(n):
        total += _sr_quantize(case, x, RandomStream(derive_key(31337, i))).dequantize().double()
    mean = total / n
    se = gap * unit * torch.sqrt(p * (1 - p) / n)
    dev = mean - expect
    tol = 5 * se + 3 * gap * unit / n + 1e-6 * expect.abs()
    assert (dev.abs() <= tol).all(), float((dev.abs() / tol).max())
    # aggregate, in the direction of |x| (a shrinkage bias would not cancel here)
    z_agg = float((torch.sign(x.double()) * dev).sum() / torch.sqrt((se ** 2).sum()))
    assert abs(z_agg) <= 4, z_agg


def test_sr_draws_are_independent_across_rows_of_one_call():
    """Stacking copies of a row gives independent draws (counters are global coordinates)."""
    x = gaussian(1, 128, seed=14).repeat(2000, 1)
    qt = Q.quantize_nvfp4(x, mode="sr", v=HEADROOM_V, stream=RandomStream(9))
    r, y, unit = _sr_reference("sr-headroom", x[:1])
    mag = y.abs()
    lo_idx, hi_idx = ref.e2m1_bracket(mag)
    lo, hi = ref.E2M1_POS[lo_idx], ref.E2M1_POS[hi_idx]
    p = torch.where(hi > lo, (mag - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi)), torch.zeros_like(hi))
    up = ((lib_codes(qt) & 7).long() == hi_idx) & (hi_idx != lo_idx)
    frac = up.double().mean(dim=0, keepdim=True)
    se = torch.sqrt(p * (1 - p) / 2000)
    assert ((frac - p).abs() <= 5 * se + 3 / 2000).all()


# ---------------------------------------------------------------------------------------------
# §3.5 MXFP8
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale,spread", [(1.0, 0), (1e-20, 4), (1e30, 10), (2.0 ** -130, 0)])
def test_mxfp8_matches_brute_force(scale, spread):
    x = gaussian(16, 256, seed=21, scale=scale, spread=spread)
    x[:, 32:64] = 0.0                                              # amax 0 -> scale 1
    x[:, 64:96] = x[:, 64:96].sign() * 448.0 * 2.0 ** -3           # amax / 448 a power of two
    x[0, 96] = 448.0 * 2.0 ** 5 * (1 + 2.0 ** -20)
    mx = Q.quantize_mxfp8(x)
    x64 = x.double()
    amax = x64.reshape(16, 8, 32).abs().amax(dim=2)
    k = torch.tensor([[ref.e8m0_exponent_exact(float(a)) for a in row] for row in amax], dtype=torch.int64)
    assert torch.equal(mx.scale_exponents.to(torch.int64), k)
    assert (k[:, 1] == 0).all() and (k[:, 2] == -3).all()
    scaled = x64 / torch.exp2(k.to(F64)).repeat_interleave(32, 1)
    assert mx.data.dtype == torch.float8_e4m3fn
    assert torch.equal(mx.data.double(), ref.rn8(scaled))
    deq = mx.dequantize()
    exact = mx.data.double() * torch.exp2(k.to(F64)).repeat_interleave(32, 1)
    if scale >= 1e-20:                                       # no FP32 underflow of the dequantized value
        assert torch.equal(deq.double(), exact)
        assert torch.equal(deq.to(torch.bfloat16).double(), exact), "MXFP8 values are exact in BF16"
    assert torch.isfinite(deq).all()


# ---------------------------------------------------------------------------------------------
# Special values and argument validation, for every quantizer
# ---------------------------------------------------------------------------------------------

def _stream():
    return RandomStream(derive_key(1, 2, 3))


QUANTIZERS = {
    "q16-rn": lambda x: Q.quantize_nvfp4(x),
    "q16-rn-away": lambda x: Q.quantize_nvfp4(x, ties="away"),
    "q16-46": lambda x: Q.quantize_nvfp4(x, four_over_six=True, smax=256.0),
    "q16-16x16": lambda x: Q.quantize_nvfp4(x, block_rows=16),
    "q16-16x16-46": lambda x: Q.quantize_nvfp4(x, block_rows=16, four_over_six=True, smax=256.0),
    "q16-sr": lambda x: Q.quantize_nvfp4(x, mode="sr", stream=_stream()),
    "q16-sr-headroom": lambda x: Q.quantize_nvfp4(x, mode="sr", v=HEADROOM_V, stream=_stream()),
    "eden128": lambda x: Q.quantize_ms_eden(x, stream=_stream()),
    "eden16": lambda x: Q.quantize_ms_eden(x, stream=_stream(), eden_group=16),
    "qdb-rn": lambda x: Q.quantize_double_block(x),
    "qdb-sr": lambda x: Q.quantize_double_block(x, mode="sr", stream=_stream()),
    "qdb-tensor": lambda x: Q.quantize_double_block(x, outer_block="tensor"),
    "mxfp8": lambda x: Q.quantize_mxfp8(x),
}
# relative error of the largest element: exact mapping to 6 (RN, or SR with y = 6), one SR step
# (headroom: 5.65 lies between 4 and 6; MS-EDEN: the scale is stochastically rounded), E4M3 RN
MAX_ELEMENT_RTOL = {"q16-sr-headroom": 0.34, "eden128": 0.15, "eden16": 0.15, "mxfp8": 2.0 ** -4}
QUANTIZED_DIM = {"eden128": 128, "qdb-rn": 128, "qdb-sr": 128, "qdb-tensor": 128, "mxfp8": 32}


def _is_mx(name):
    return name == "mxfp8"


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_all_zero_tensor(name):
    x = torch.zeros(32, 256)
    out = QUANTIZERS[name](x)
    assert torch.equal(out.dequantize(), x)
    if _is_mx(name):
        assert (out.data.float() == 0).all() and (out.scale_exponents == 0).all()
        return
    assert (lib_codes(out) == 0).all()
    if name.startswith("qdb"):               # §3.4: s_out = 1 if A == 0, t == 0 -> 2^-9
        assert (out.outer_scales == 1.0).all()
        assert (out.block_scales.float() == 2.0 ** -9).all()
    else:                                    # §3.1: scales 0, g = 1
        assert (out.block_scales.float() == 0).all()
        assert float(out.tensor_scale) == 1.0
    assert int(out.flushed_blocks) == 0


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("value", [5.0, -1e-3, 3.0e-30, 7.0e35])
def test_single_nonzero_element(name, value):
    x = torch.zeros(32, 256)
    x[17, 201] = value
    out = QUANTIZERS[name](x).dequantize()
    assert torch.isfinite(out).all()
    others = torch.ones_like(x, dtype=torch.bool)
    others[17, 201] = False
    assert (out[others] == 0).all()
    rtol = MAX_ELEMENT_RTOL.get(name, 1e-6)
    assert abs(float(out[17, 201]) - value) <= rtol * abs(value)


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("big", [1e30, 1e36])
def test_huge_values(name, big):
    x = gaussian(32, 256, seed=30) * (big / 5.0)
    x[3, 7] = big
    x[20, 100] = -big
    out = QUANTIZERS[name](x).dequantize()
    assert torch.isfinite(out).all()
    rtol = MAX_ELEMENT_RTOL.get(name, 1e-6)
    for (i, j) in ((3, 7), (20, 100)):
        assert abs(float(out[i, j]) - float(x[i, j])) <= rtol * big
    rel = float(((out.double() - x.double()) ** 2).sum() / (x.double() ** 2).sum())
    assert rel < 0.05


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("case", ["all-subnormal", "mixed"])
def test_fp32_subnormal_inputs(name, case):
    x = gaussian(32, 256, seed=31) * 1e-40                 # FP32 subnormals (< 2^-126 ~ 1.2e-38)
    assert (x[x != 0].abs() < 2.0 ** -126).all()
    if case == "mixed":
        x[:, :128] = gaussian(32, 128, seed=32)
    out = QUANTIZERS[name](x).dequantize()
    assert torch.isfinite(out).all()
    assert (out.abs() <= 2 * x.abs().max() + 1e-44).all()
    if case == "mixed":
        rel = float(((out[:, :128].double() - x[:, :128].double()) ** 2).sum() / (x[:, :128].double() ** 2).sum())
        assert rel < 0.05


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_propagates_nan(name, bad):
    x = gaussian(32, 256, seed=33)
    x[5, 77] = bad
    out = QUANTIZERS[name](x).dequantize()
    if _is_mx(name):
        # MXFP8 has no FP32 operand scale: the non-finite element itself becomes NaN; its block's
        # scale ignores it, and the rest of the operand is quantized normally
        assert out[5, 77].isnan()
        assert torch.isfinite(out[~out.isnan()]).all() and int(out.isnan().sum()) == 1
        clean = x.clone()
        clean[5, 77] = 0.0
        ok = torch.ones_like(x, dtype=torch.bool)
        ok[5, 77] = False
        assert torch.equal(out[ok], Q.quantize_mxfp8(clean).dequantize()[ok])
    else:
        # documented rule: the operand's FP32 scale becomes NaN, so every represented value is NaN
        assert out.isnan().all()


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_input_dtypes(name):
    x = gaussian(32, 256, seed=34)
    ref_out = QUANTIZERS[name](x).dequantize()
    for dtype in (torch.bfloat16, torch.float16):
        xd = x.to(dtype)
        out = QUANTIZERS[name](xd).dequantize()
        assert torch.equal(out, QUANTIZERS[name](xd.float()).dequantize())
    assert ref_out.dtype == torch.float32
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.float8_e4m3fn, torch.float8_e5m2):
        with pytest.raises(TypeError):
            QUANTIZERS[name](x.to(dtype))
    with pytest.raises(TypeError):
        QUANTIZERS[name](x.tolist())


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_bad_shapes(name):
    q = QUANTIZERS[name]
    for shape in [(256,), (2, 32, 256), (0, 256), (32, 0)]:
        with pytest.raises(ValueError):
            q(torch.zeros(shape))
    bad_cols = QUANTIZED_DIM.get(name, 16) + 8          # 24, 136 or 40
    with pytest.raises(ValueError, match=str(bad_cols)):
        q(torch.zeros(32, bad_cols))
    if name in ("eden128", "qdb-rn", "qdb-sr", "qdb-tensor"):
        with pytest.raises(ValueError, match="144"):
            q(torch.zeros(32, 144))
    if name == "mxfp8":
        with pytest.raises(ValueError, match="48"):
            q(torch.zeros(32, 48))
    if "16x16" in name:
        with pytest.raises(ValueError, match="24"):
            q(torch.zeros(24, 256))


def test_mode_argument_validation():
    x = gaussian(16, 128, seed=35)
    with pytest.raises(ValueError):
        Q.quantize_nvfp4(x, mode="sr")                          # SR needs a stream
    with pytest.raises(ValueError):
        Q.quantize_double_block(x, mode="sr")
    with pytest.raises(ValueError):
        Q.quantize_nvfp4(x, mode="round-up")
    with pytest.raises(ValueError):
        Q.quantize_nvfp4(x, ties="odd")
    with pytest.raises(ValueError):
        Q.quantize_nvfp4(x, block_rows=4)
    with pytest.raises(ValueError):
        Q.quantize_double_block(x, outer_block=64)


# ---------------------------------------------------------------------------------------------
# Streams: reproducibility, key dependence, layout (TP) independence
# ---------------------------------------------------------------------------------------------

RANDOM_QUANTIZERS = {
    "q16-sr": lambda x, s: Q.quantize_nvfp4(x, mode="sr", stream=s),
    "qdb-sr": lambda x, s: Q.quantize_double_block(x, mode="sr", stream=s),
    "eden128": lambda x, s: Q.quantize_ms_eden(x, stream=s),
    "eden16": lambda x, s: Q.quantize_ms_eden(x, stream=s, eden_group=16),
}


def _same(a, b) -> bool:
    return (torch.equal(a.packed, b.packed) and torch.equal(a.block_scales.view(torch.uint8), b.block_scales.view(torch.uint8))
            and torch.equal(a.dequantize(), b.dequantize()))


@pytest.mark.parametrize("name", list(RANDOM_QUANTIZERS))
def test_same_stream_is_bit_identical_and_other_key_differs(name):
    x = _rotated_operand(rows=32, cols=256, seed=40)
    q = RANDOM_QUANTIZERS[name]
    a = q(x, RandomStream(derive_key(1, 2)))
    b = q(x, RandomStream(derive_key(1, 2)))
    assert _same(a, b)
    c = q(x, RandomStream(derive_key(1, 3)))
    assert not _same(a, c)
    d = q(x, RandomStream(derive_key(1, 2), row_offset=32))
    assert not _same(a, d)


@pytest.mark.parametrize("name", list(RANDOM_QUANTIZERS))
def test_tp_column_shards_reproduce_the_unsplit_quantization(name):
    """A rank holding columns [c0, c0 + 128) with col_offset = c0 and the MAX-reduced amax gets
    exactly the unsplit operand's codes and scales there (numerics.md §1.3, §2.5)."""
    x = _rotated_operand(rows=16, cols=512, seed=41)
    q = RANDOM_QUANTIZERS[name]
    key = derive_key(9, 9)
    full = q(x, RandomStream(key))
    if name == "eden16":
        global_max = full.tensor_scale * 256.0                   # g = max_b r_b / 256
    else:
        global_max = x.abs().amax()
    for c0 in (0, 128, 256, 384):
        shard = x[:, c0:c0 + 128].contiguous()
        stream = RandomStream(key, col_offset=c0)
        if name != "qdb-sr":
            part = _with_reduce(name, shard, stream, lambda amax: torch.maximum(amax, global_max))
        else:
            part = q(shard, stream)
        assert torch.equal(part.packed, full.packed[:, c0 // 2:(c0 + 128) // 2])
        assert torch.equal(part.block_scales.view(torch.uint8),
                           full.block_scales.view(torch.uint8)[:, c0 // 16:(c0 + 128) // 16])
        assert torch.equal(part.dequantize(), full.dequantize()[:, c0:c0 + 128])


def _with_reduce(name, x, stream, reduce):
    if name == "q16-sr":
        return Q.quantize_nvfp4(x, mode="sr", stream=stream, amax_reduce=reduce)
    if name == "eden128":
        return Q.quantize_ms_eden(x, stream=stream, amax_reduce=reduce)
    return Q.quantize_ms_eden(x, stream=stream, eden_group=16, amax_reduce=reduce)


def test_amax_reduce_sets_the_tensor_scale():
    x = gaussian(16, 128, seed=42)
    qt = Q.quantize_nvfp4(x, amax_reduce=lambda a: a * 4.0)
    expected = ref.ref_q16(torch.cat([x, torch.full((1, 128), 4.0 * float(x.abs().max()))]))
    assert float(qt.tensor_scale) == expected["g"]
    assert torch.equal(lib_codes(qt), expected["codes"][:16])
    assert torch.equal(qt.block_scales.double(), expected["scales"][:16])


def test_pairwise_sum_is_the_halving_tree_in_float32():
    """The EDEN factor's sums (our choice of order, shared with the Triton kernel): a halving tree
    (x[c] + x[c + n/2], ...), every add rounded to FP32. Checked against the tree built from numpy
    float32 scalars, and shown to matter: a left-to-right FP32 sum of the same values differs."""
    import numpy as np

    def tree(v):
        v = [np.float32(t) for t in v]
        while len(v) > 1:
            h = len(v) // 2
            v = [np.float32(v[i] + v[i + h]) for i in range(h)]
        return v[0]

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 128, generator=g) * torch.exp2(torch.randint(-30, 30, (6, 128), generator=g).float())
    got = Q.pairwise_sum(x, 1)
    for r in range(6):
        assert got[r].item() == float(tree(x[r].tolist()))
    crafted = torch.tensor([1.0] + [2.0 ** -24] * 127)        # each tiny add is lost left to right
    sequential = np.float32(0)
    for t in crafted.tolist():
        sequential = np.float32(sequential + np.float32(t))
    assert Q.pairwise_sum(crafted, 0).item() == float(tree(crafted.tolist())) != float(sequential)
    assert torch.equal(Q.pairwise_sum(x.t(), 0), got)                     # any dim
    with pytest.raises(ValueError, match="power-of-two"):
        Q.pairwise_sum(torch.ones(3, 12), 1)
