"""kernels/stats.observe (one launch per observed operand) against its torch twin stats.write_twin:
every word of the observation row equal (the amax bit for bit, NaN as NaN), for each source kind the
statistics see (dense, transposed, padded, a packed forward operand scaled and unscaled, 16x16 tiles,
double blocks with outer scales) and non-finite sources; and the dispatch's choice between them."""
import math

import pytest
import torch

from megatron_fp4 import backend, stats
from megatron_fp4.kernels import dispatch as D
from megatron_fp4.kernels.stats import observe
from megatron_fp4.rng import RandomStream, random_signs

from kernel_test_util import cpu_interp, data, gpu, needs_cuda


def _rows(spec, device):
    rows = []
    for write in (stats.write_twin, observe):
        arena = torch.zeros(3, spec.layout.width, dtype=torch.float32, device=device)
        write(spec, arena, 1)                     # the middle row of three: the others stay zero
        assert not arena[0].any() and not arena[2].any()
        rows.append(arena[1].cpu())
    return rows


def assert_same_row(spec, device="cpu"):
    twin, kernel = _rows(spec, device)
    a, b = float(twin[0]), float(kernel[0])
    assert (math.isnan(a) and math.isnan(b)) or twin[0].view(torch.int32) == kernel[0].view(torch.int32), (a, b)
    differ = (twin.view(torch.int32)[1:] != kernel.view(torch.int32)[1:]).nonzero()
    assert differ.numel() == 0, f"{differ.numel()} words differ, first at {int(differ[0]) + 1} of {spec.layout}"
    assert int(twin.view(torch.int32)[1]) == int(((spec.q.block_scales.view(torch.uint8) & 0x7F) == 0x7E).sum())
    return twin


def _cases(device, nonfinite=False):
    x = data(96, 256, seed=1, dtype=torch.bfloat16, device=device)
    if nonfinite:
        x[7, 9] = float("nan")
        x[50, 3] = float("inf")
    a = data(256, 128, seed=2, device=device)            # transposed source [C, R] = [256, 128]
    ref = backend.BackendConfig(kernels="reference")
    out = {}
    q = D.quantize_nvfp4(x, backend=ref)
    out["dense"] = stats.plain_source((x,), {}, q)[0]
    t = D.quantize_nvfp4(x, block_rows=16, backend=ref) if not nonfinite else q
    out["tiles"] = stats.plain_source((x,), {}, t)[0]
    db = D.quantize_double_block(x.float(), backend=ref)
    out["double-block"] = stats.plain_source((x.float(),), {}, db)[0]
    kw = dict(transpose=True)
    e = D.rht_ms_eden(a, random_signs(3, 128), RandomStream(4), backend=ref, **kw)
    out["rotated transposed"] = stats.rotated_source((a, None), kw, e)[0]
    kw = dict(transpose=False, pad_multiple=128)
    b = data(128, 200, seed=5, device=device)            # 200 columns padded to 256
    r = D.rht_double_block(b, random_signs(6, 16), RandomStream(7), backend=ref, **kw)
    out["rotated padded"] = stats.rotated_source((b, None), kw, r)[0]
    for name, fwd in (("requant 1x16", q), ("requant tiles", t)):
        rq = D.requant_ms_eden(fwd, random_signs(8, 128), RandomStream(9), backend=ref, pad_multiple=128)
        out[name] = stats.requant_unscaled_source((fwd, None), {}, rq)[0]
    rdb = D.requant_double_block(db, random_signs(10, 16), RandomStream(11), backend=ref, pad_multiple=128)
    out["requant double-block"] = stats.requant_scaled_source((db, None), {}, rdb)[0]
    return out


@cpu_interp
@pytest.mark.parametrize("nonfinite", [False, True])
def test_kernel_row_equals_the_twin(nonfinite):
    cases = _cases("cpu", nonfinite)
    for name, spec in cases.items():
        row = assert_same_row(spec)
        lay = spec.layout
        assert lay.c_src <= lay.cols and row[lay.off_src:lay.off_q].view(lay.n, lay.cols)[:, lay.c_src:].eq(0).all()
    assert cases["rotated padded"].layout.c_src == 200 and cases["rotated padded"].layout.cols == 256
    if nonfinite:
        assert math.isnan(float(assert_same_row(cases["dense"])[0]))


@cpu_interp
def test_dispatch_writes_through_the_kernel_or_the_twin():
    x = data(32, 64, seed=3)
    q = D.quantize_nvfp4(x, backend=backend.BackendConfig(kernels="reference"))
    spec = stats.plain_source((x,), {}, q)[0]
    assert D._observation_reason(spec) is None
    sliced = x[:, :48]                                   # neither contiguous nor a transpose of one
    spec2 = stats.plain_source((sliced,), {}, D.quantize_nvfp4(sliced, backend=backend.BackendConfig(kernels="reference")))[0]
    assert "neither contiguous" in D._observation_reason(spec2)
    with backend.use(kernels="interpret", on_fallback="error"):
        arena = torch.zeros(1, spec.layout.width)
        D.write_observation(spec, arena, 0)
        assert torch.equal(arena[0], _rows(spec, "cpu")[0])
        with pytest.raises(backend.KernelFallbackError, match="statistics.*neither contiguous"):
            D.write_observation(spec2, torch.zeros(1, spec2.layout.width), 0)
    with backend.use(kernels="reference", on_fallback="error"):   # the twin: no fallback to report
        row2, twin = torch.zeros(1, spec2.layout.width), torch.zeros(1, spec2.layout.width)
        D.write_observation(spec2, row2, 0)
        stats.write_twin(spec2, twin, 0)
        assert torch.equal(row2, twin) and float(twin[0, 0]) == float(sliced.abs().max())


@gpu
@needs_cuda
@pytest.mark.parametrize("nonfinite", [False, True])
def test_kernel_row_equals_the_twin_gpu(nonfinite):
    for spec in _cases("cuda", nonfinite).values():
        assert_same_row(spec, "cuda")
