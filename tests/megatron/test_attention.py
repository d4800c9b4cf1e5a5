"""The plugin spec's core attention (megatron_fp4/megatron/attention.py, torch scaled_dot_product_attention)
against Megatron's stock DotProductAttention and a float64 brute-force reference with Megatron's
semantics (scores filled with -10000 where masked, FP32 inputs exact in float64).

Tolerances are first-order FP32 forward-error bounds (`fp32_bounds`), elementwise, for the output and
the gradients of q, k and v: every FP32 sum of n terms is within gamma_n = n u / (1 - n u) (u = 2^-24)
times the sum of the terms' magnitudes of the exact sum, whatever the order; the softmax adds the
errors of its scores (relative, via exp) and of its normalisation. Each implementation must lie within
the bound of the float64 result; the two implementations within twice the bound of each other.

Megatron's modules need its parallel state, so the bodies run on gloo ranks (megatron_fp4.testing.dist:
forkserver processes, CPU shim); each group of cases is one process launch.
"""
import logging
import math

import pytest
import torch

import driver_settings
from megatron_fp4.testing import dist

pytestmark = pytest.mark.timeout(300)

U = 2.0 ** -24       # FP32 unit roundoff


def gamma(n: int) -> float:
    return n * U / (1.0 - n * U)


# --------------------------------------------------------------------------------------------------
# Float64 reference and FP32 error bounds ([s, b, heads, dim] inputs, Megatron's layout)
# --------------------------------------------------------------------------------------------------

def _bhsd(t):
    return t.permute(1, 2, 0, 3).double()


def _masked_positions(mask, causal, b, h, sq, sk):
    """Positions whose score Megatron replaces by -10000 (True), as a [b, h, sq, sk] tensor."""
    if mask is not None:
        return mask.expand(b, h, sq, sk)
    if causal and sq > 1:
        return torch.triu(torch.ones(sq, sk, dtype=torch.bool), diagonal=1).expand(b, h, sq, sk)
    return torch.zeros(b, h, sq, sk, dtype=torch.bool)


def reference(q, k, v, dout, mask, causal, scale):
    """Float64 attention with Megatron's semantics and its gradients (autograd in float64)."""
    sq, b, h, d = q.shape
    sk, g = k.size(0), k.size(2)
    Q, K, V = (_bhsd(t).requires_grad_(True) for t in (q, k, v))
    Ke, Ve = K.repeat_interleave(h // g, dim=1), V.repeat_interleave(h // g, dim=1)
    scores = (Q @ Ke.transpose(-1, -2)) * scale
    scores = scores.masked_fill(_masked_positions(mask, causal, b, h, sq, sk), -10000.0)
    P = torch.softmax(scores, dim=-1)
    O = P @ Ve
    O.backward(_bhsd(dout))
    out = O.detach().permute(2, 0, 1, 3).reshape(sq, b, h * d)
    grads = tuple(t.grad.permute(2, 0, 1, 3) for t in (Q, K, V))
    return out, grads, P.detach()


def fp32_bounds(q, k, v, dout, mask, causal, scale, P):
    """First-order bounds on |FP32 result - exact| for the output and dq, dk, dv of one implementation.

    Scores S = scale q.k (d terms; + the scale and SDPA's sqrt(scale) prescaling of q and k: d + 4
    roundings); softmax P: relative error <= |dS_j| + sum_i P_i |dS_i| + gamma(2 sk + 8) (exp, the
    max shift, the normalising sum, the division, and online-softmax rescaling by at most sk blocks);
    O = P V (sk terms); dV = P^T dO (sq terms); dP = dO V^T (d terms); D = rowsum(P dP) or
    rowsum(dO O) (either form: both bounds added); dS = P (dP - D), zero where masked; dQ = scale dS K
    (sk terms), dK = scale dS^T Q (sq terms); GQA sums dK, dV over the heads of a group.
    """
    sq, b, h, d = q.shape
    sk, g = k.size(0), k.size(2)
    rep = h // g
    Q, K, V, dO = (_bhsd(t).abs() for t in (q, k, v, dout))
    Kx, Vx = K.repeat_interleave(rep, dim=1), V.repeat_interleave(rep, dim=1)
    Vs = _bhsd(v).repeat_interleave(rep, dim=1)
    M = _masked_positions(mask, causal, b, h, sq, sk)
    eS = (gamma(d + 4) * scale * (Q @ Kx.transpose(-1, -2))).masked_fill(M, 0.0)
    eP = P * (eS + (P * eS).sum(-1, keepdim=True) + gamma(2 * sk + 8))
    O = P @ Vs
    eO = eP @ Vx + gamma(sk) * (P @ Vx)
    eDV = eP.transpose(-1, -2) @ dO + gamma(sq) * (P.transpose(-1, -2) @ dO)
    dP = _bhsd(dout) @ Vs.transpose(-1, -2)
    edP = gamma(d) * (dO @ Vx.transpose(-1, -2))
    eD = (gamma(sk) * (P * dP.abs()).sum(-1, keepdim=True) + (eP * dP.abs()).sum(-1, keepdim=True)
          + (P * edP).sum(-1, keepdim=True) + gamma(d) * (dO * O.abs()).sum(-1, keepdim=True)
          + (dO * eO).sum(-1, keepdim=True))
    G = dP - (P * dP).sum(-1, keepdim=True)
    dS = (P * G).masked_fill(M, 0.0)
    edS = (eP * G.abs() + P * (edP + eD + U * G.abs())).masked_fill(M, 0.0)
    eDQ = scale * (edS @ Kx + gamma(sk + 3) * (dS.abs() @ Kx))
    eDK = scale * (edS.transpose(-1, -2) @ Q + gamma(sq + 3) * (dS.abs().transpose(-1, -2) @ Q))
    dKh = scale * (dS.transpose(-1, -2) @ _bhsd(q))
    dVh = P.transpose(-1, -2) @ _bhsd(dout)

    def group(err, exact):   # sum over the heads of each key/value group
        err = err.reshape(b, g, rep, sk, d)
        exact = exact.reshape(b, g, rep, sk, d)
        return err.sum(2) + gamma(rep) * exact.abs().sum(2)

    eDK, eDV = group(eDK, dKh), group(eDV, dVh)
    layout = lambda t: t.permute(2, 0, 1, 3)   # noqa: E731  [b, h, s, d] -> [s, b, h, d]
    eO = eO.permute(2, 0, 1, 3).reshape(sq, b, h * d)
    return eO, (layout(eDQ), layout(eDK), layout(eDV))


def _run(module, q, k, v, dout, mask, **forward_kwargs):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = module(q, k, v, mask, **forward_kwargs)
    out.backward(dout.reshape(out.shape))
    return out.detach(), (q.grad, k.grad, v.grad)


def _ratio(diff, bound):
    """max |diff| / bound (bound > 0 where diff may be nonzero; exact zeros on both sides are fine)."""
    diff = diff.double().abs()
    if bool(((bound == 0) & (diff > 0)).any()):
        return math.inf
    return float((diff / bound.clamp_min(1e-300)).max())


def _compare(sdpa, megatron, q, k, v, mask, causal, scale, forward_kwargs=None):
    """Max ratios |impl - exact| / bound and |sdpa - megatron| / (2 bound) over the output and grads."""
    forward_kwargs = forward_kwargs or {}
    torch.manual_seed(99)
    sq, b, h, d = q.shape
    dout = torch.randn(sq, b, h, d)
    ref_out, ref_grads, P = reference(q, k, v, dout, mask, causal, scale)
    b_out, b_grads = fp32_bounds(q, k, v, dout, mask, causal, scale, P)
    s_out, s_grads = _run(sdpa, q, k, v, dout, mask, **forward_kwargs)
    res = {"shape": tuple(s_out.shape), "dtype": str(s_out.dtype)}
    names = ("out", "dq", "dk", "dv")
    for name, got, exact, bound in zip(names, (s_out, *s_grads), (ref_out, *ref_grads), (b_out, *b_grads)):
        res[f"sdpa_{name}"] = _ratio(got.double() - exact, bound)
    if megatron is not None:
        m_out, m_grads = _run(megatron, q, k, v, dout, mask)
        for name, got, other, exact, bound in zip(names, (m_out, *m_grads), (s_out, *s_grads),
                                                  (ref_out, *ref_grads), (b_out, *b_grads)):
            res[f"megatron_{name}"] = _ratio(got.double() - exact, bound)
            res[f"pair_{name}"] = _ratio(got.double() - other.double(), 2 * bound)
    return res


# --------------------------------------------------------------------------------------------------
# Rank bodies
# --------------------------------------------------------------------------------------------------

def _config(tp=1, heads=4, groups=None, kv_channels=16, **extra):
    from megatron_fp4.megatron import NVFP4TransformerConfig
    fields = dict(num_layers=4, hidden_size=heads * kv_channels, num_attention_heads=heads,
                  num_query_groups=groups, kv_channels=kv_channels, use_cpu_initialization=True,
                  params_dtype=torch.float32, tensor_model_parallel_size=tp, attention_dropout=0.0,
                  hidden_dropout=0.0, masked_softmax_fusion=False, nvfp4_recipe="bf16")
    return NVFP4TransformerConfig(**dict(fields, **extra))


def _init(tp=1):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    model_parallel_cuda_manual_seed(123)


def _pair(cfg, mask_type, layer_number=1, softmax_scale=None):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron_fp4.megatron.attention import SDPAttention
    kw = dict(config=cfg, layer_number=layer_number, attn_mask_type=mask_type, attention_type="self",
              softmax_scale=softmax_scale)
    return SDPAttention(**kw), DotProductAttention(**kw)


def _qkv(sq, sk, b, heads, groups, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sq, b, heads, d, generator=g) * 1.5
    k = torch.randn(sk, b, groups, d, generator=g) * 1.5
    v = torch.randn(sk, b, groups, d, generator=g)
    return q, k, v


def _random_mask(b, sq, sk, seed=1):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 1, sq, sk, generator=g) < 0.4
    mask[0, 0, 3, :] = True          # a query row with every key masked
    mask[1, 0, :, 0] = False
    return mask


CASES = ("causal", "explicit_mask", "explicit_mask_replaces_causal", "gqa_causal", "gqa_explicit_mask",
         "softmax_scale", "query_key_layer_scaling", "decode_one_query", "cross_no_mask")


def single_rank_cases(rank, world):
    """Every CASES entry at TP=1: SDPAttention and DotProductAttention against the float64 reference."""
    from megatron.core.transformer.enums import AttnMaskType as T
    _init()
    b, heads, d, s = 2, 4, 16, 40
    out = {}
    for case in CASES:
        groups, sq, sk, mask, mask_type, causal = heads, s, s, None, T.causal, True
        cfg_extra, layer, scale_arg = {}, 1, None
        if case.startswith("gqa"):
            groups = 2 if case == "gqa_causal" else 1
        if "explicit_mask" in case:
            mask, causal = _random_mask(b, sq, sk), False
            mask_type = T.causal if case == "explicit_mask_replaces_causal" else T.padding
        if case == "softmax_scale":
            scale_arg = 0.37
        if case == "query_key_layer_scaling":
            cfg_extra, layer = {"apply_query_key_layer_scaling": True}, 3
        if case == "decode_one_query":
            sq, causal = 1, False       # Megatron: a one-token query attends to every key
        if case == "cross_no_mask":
            sq, mask_type, causal = 24, T.no_mask, False
        cfg = _config(groups=groups, **cfg_extra)
        sdpa, megatron = _pair(cfg, mask_type, layer_number=layer, softmax_scale=scale_arg)
        scale = scale_arg if scale_arg is not None else 1.0 / math.sqrt(d)
        q, k, v = _qkv(sq, sk, b, heads, groups, d)
        out[case] = _compare(sdpa, megatron, q, k, v, mask, causal, scale)
    # the forward's attn_mask_type is honoured (Megatron's DotProductAttention ignores it; TE's uses it)
    cfg = _config()
    sdpa, _ = _pair(cfg, T.no_mask)
    q, k, v = _qkv(s, s, b, heads, heads, d)
    out["forward_mask_type"] = _compare(sdpa, None, q, k, v, None, True, 1.0 / math.sqrt(d),
                                        {"attn_mask_type": T.causal})
    return out


def tp2_cases(rank, world):
    """TP=2: each rank holds half the heads (and key/value groups); both implementations on the local
    heads against the slice of the full float64 reference."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.enums import AttnMaskType as T
    _init(tp=world)
    b, heads, d, s = 2, 4, 16, 32
    out = {"tp_rank": ps.get_tensor_model_parallel_rank()}
    # (name, query groups in the full model, groups the core attention is built with, mask)
    for name, groups, built_groups, with_mask in (("mha_causal", 4, 4, False), ("gqa_causal", 2, 2, False),
                                                  ("gqa_explicit_mask", 2, 2, True),
                                                  ("one_group_replicated", 1, 2, False)):
        # one_group_replicated: num_query_groups=1 < TP; Megatron's SelfAttention builds core attention with
        # num_query_groups=TP and hands every rank the one (replicated) key/value group
        q, k, v = _qkv(s, s, b, heads, groups, d, seed=5)
        mask = _random_mask(b, s, s) if with_mask else None
        causal = not with_mask
        torch.manual_seed(99)
        dout = torch.randn(s, b, heads, d)
        ref_out, ref_grads, P = reference(q, k, v, dout, mask, causal, 1.0 / math.sqrt(d))
        b_out, b_grads = fp32_bounds(q, k, v, dout, mask, causal, 1.0 / math.sqrt(d), P)
        hp, gp = heads // world, max(groups // world, 1)
        hs = slice(rank * hp, (rank + 1) * hp)
        gs = slice(rank * gp, (rank + 1) * gp) if groups >= world else slice(0, 1)
        cfg = _config(tp=world, groups=built_groups)
        sdpa, megatron = _pair(cfg, T.padding if with_mask else T.causal)
        res = {"heads_per_partition": sdpa.num_attention_heads_per_partition,
               "hidden_per_partition": sdpa.hidden_size_per_partition}
        local_dout = dout[:, :, hs]
        for impl_name, module in (("sdpa", sdpa), ("megatron", megatron)):
            o, grads = _run(module, q[:, :, hs], k[:, :, gs], v[:, :, gs], local_dout, mask)
            res[f"{impl_name}_shape"] = tuple(o.shape)
            local_ref = ref_out.reshape(s, b, heads, d)[:, :, hs].reshape(s, b, hp * d)
            local_bound = b_out.reshape(s, b, heads, d)[:, :, hs].reshape(s, b, hp * d)
            res[f"{impl_name}_out"] = _ratio(o.double() - local_ref, local_bound)
            res[f"{impl_name}_dq"] = _ratio(grads[0].double() - ref_grads[0][:, :, hs], b_grads[0][:, :, hs])
            if groups >= world:      # each rank's groups see only its heads: the full gradient's slice
                res[f"{impl_name}_dk"] = _ratio(grads[1].double() - ref_grads[1][:, :, gs], b_grads[1][:, :, gs])
                res[f"{impl_name}_dv"] = _ratio(grads[2].double() - ref_grads[2][:, :, gs], b_grads[2][:, :, gs])
            else:                    # a replicated group: its full gradient is the sum over the ranks
                for j, key in ((1, "dk"), (2, "dv")):
                    total = grads[j].clone()
                    torch.distributed.all_reduce(total, group=ps.get_tensor_model_parallel_group())
                    res[f"{impl_name}_{key}"] = _ratio(total.double() - ref_grads[j], b_grads[j])
        out[name] = res
    return out


def behaviour_checks(rank, world):
    """Dropout (training only, Megatron's rate), refusals, fallbacks and the one-time log line."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType as T
    from megatron_fp4.megatron import attention as A
    _init()
    out = {}
    # dropout: with one-hot values (d = sk) the output is P * keep / (1 - p), which shows the drop mask
    b, heads, s, p = 2, 4, 64, 0.25
    cfg = _config(heads=heads, kv_channels=s, attention_dropout=p)
    module = A.SDPAttention(config=cfg, layer_number=1, attn_mask_type=T.no_mask, attention_type="self")
    g = torch.Generator().manual_seed(3)
    q = torch.randn(s, b, heads, s, generator=g)
    k = torch.randn(s, b, heads, s, generator=g)
    v = torch.eye(s).reshape(s, 1, 1, s).expand(s, b, heads, s).contiguous()
    probs = torch.softmax((_bhsd(q) @ _bhsd(k).transpose(-1, -2)) / math.sqrt(s), dim=-1)   # float64 [b,h,q,k]
    # relative FP32 error of each probability (fp32_bounds' softmax rule), then x 1/(1-p), the value sum
    scores_abs = (_bhsd(q).abs() @ _bhsd(k).abs().transpose(-1, -2)) / math.sqrt(s)
    rel = 2 * gamma(s + 4) * float(scores_abs.max()) + gamma(3 * s + 10)
    module.train()
    draws = []
    for _ in range(2):
        o = module(q, k, v, None).reshape(s, b, heads, s).permute(1, 2, 0, 3).double()
        draws.append(o / probs)
    module.eval()
    o_eval = module(q, k, v, None).reshape(s, b, heads, s).permute(1, 2, 0, 3).double()
    ratio = draws[0]
    kept = (ratio - 1 / (1 - p)).abs() <= rel / (1 - p)
    dropped = ratio == 0
    n = ratio.numel()
    out["dropout"] = {
        "every_entry_kept_or_dropped": bool((kept | dropped).all()),
        "dropped_fraction": float(dropped.double().mean()), "n": n,
        "draws_differ": not torch.equal(draws[0], draws[1]),
        "eval_error": float((o_eval / probs - 1).abs().max()), "rel_bound": rel,
        "config_rate": module.dropout_p,
    }
    # refusals at forward
    cfg = _config()
    module = A.SDPAttention(config=cfg, layer_number=1, attn_mask_type=T.causal, attention_type="self")
    q, k, v = _qkv(8, 8, 1, 4, 4, 16)
    errors = {}
    for name, call in (
            ("packed", lambda: module(q, k, v, None, packed_seq_params=PackedSeqParams(qkv_format="thd"))),
            ("bias", lambda: module(q, k, v, None, attention_bias=torch.zeros(1, 4, 8, 8))),
            ("float_mask", lambda: module(q, k, v, torch.zeros(1, 1, 8, 8))),
            ("causal_cross", lambda: module(q[:4], k, v, None))):
        try:
            call()
            errors[name] = None
        except (NotImplementedError, TypeError, ValueError) as err:
            errors[name] = f"{type(err).__name__}: {err}"
    out["errors"] = errors
    # context parallelism: refused at build
    try:
        A.SDPAttention(config=_config(context_parallel_size=2), layer_number=1, attn_mask_type=T.causal,
                       attention_type="self")
        out["cp_error"] = None
    except A.UnsupportedConfigError as err:
        out["cp_error"] = str(err)
    # fallbacks: sliding window (on the layers it applies to) and non-vanilla softmax
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(A.__name__).addHandler(handler)
    A._logged.clear()
    window_cfg = _config(window_size=(8, 0), window_attn_skip_freq=2)   # layers 1, 3 windowed; 2, 4 full
    built = [type(A.build_core_attention(window_cfg, n, T.causal, "self")).__name__ for n in (1, 2, 3, 4)]
    out["window_types"] = built
    offset = A.build_core_attention(_config(softmax_type="off-by-one"), 1, T.causal, "self")
    out["offset_type"] = type(offset).__name__
    out["log_lines"] = [r.getMessage() for r in records]
    out["plain_type"] = type(A.build_core_attention(_config(), 1, T.causal, "self")).__name__
    out["is_megatron_fallback"] = isinstance(offset, DotProductAttention)
    # the plugin spec's core_attention slot for every recipe, and with the knob set to megatron
    from megatron_fp4.registry import available_recipes
    from megatron_fp4.spec import gpt_layer_spec

    def slot(cfg):
        spec = gpt_layer_spec(cfg)
        spec = getattr(spec, "layer_specs", [spec])[0]
        return spec.submodules.self_attention.submodules.core_attention.__name__

    out["spec_core_attention"] = {
        "sdpa": {r: slot(_config(nvfp4_recipe=r)) for r in available_recipes()},
        "megatron": slot(_config(nvfp4_attention="megatron"))}
    return out


def gpt_attention_runs(rank, world, settings, steps):
    """The driver's GPT (plugin spec) trained `steps` steps at the given layout, three times: sdpa,
    megatron, and megatron with its initial weights scaled by (1 + 2^-22) (the control: how far a
    last-bit change moves the losses). Returns the losses and the core attention classes built."""
    from megatron.core import parallel_state as ps
    from megatron_fp4.megatron import driver
    runs = {}
    for name, attention, eps in (("sdpa", "sdpa", 0.0), ("megatron", "megatron", 0.0),
                                 ("megatron_perturbed", "megatron", 2.0 ** -22)):
        s = driver_settings.settings(**dict(settings, attention=attention, train_steps=steps))
        driver.initialize_parallel(s)
        chunks, config = driver.build_model(s)
        if eps:
            with torch.no_grad():
                for p in (p for c in chunks for p in c.parameters() if p.dim() >= 2):
                    p.mul_(1.0 + eps)
        optimizer, scheduler = driver.build_optimizer(s, chunks)
        driver.setup_model_hooks(config, chunks, optimizer)
        data = [driver.synthetic_batches(s, ps.get_data_parallel_rank(), s.seed)]
        losses = []
        for it in range(steps):
            loss, _ = driver.train_step(s, chunks, optimizer, scheduler, data, it)
            losses.append(driver.broadcast_from_last_stage(loss))
        kinds = sorted({type(m.core_attention).__name__ for c in chunks for m in c.modules()
                        if hasattr(m, "core_attention")})
        runs[name] = {"losses": losses, "core_attention": kinds, "state_keys": sorted(chunks[0].module.state_dict())}
        ps.destroy_model_parallel()
    return runs


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def single_rank():
    return dist.run(single_rank_cases, 1, timeout=240)[0]


@pytest.mark.parametrize("case", CASES)
def test_sdpa_matches_megatron_dot_product_attention(single_rank, case):
    res = single_rank[case]
    for name in ("out", "dq", "dk", "dv"):
        # each within its FP32 bound of the float64 result, and of each other
        assert res[f"sdpa_{name}"] <= 1.0, (case, name, res)
        assert res[f"megatron_{name}"] <= 1.0, (case, name, res)
        assert res[f"pair_{name}"] <= 1.0, (case, name, res)
    assert res["dtype"] == "torch.float32" and res["shape"][2] == 4 * 16


def test_forward_attn_mask_type_is_honoured(single_rank):
    res = single_rank["forward_mask_type"]
    assert all(res[f"sdpa_{n}"] <= 1.0 for n in ("out", "dq", "dk", "dv")), res


def test_tp2_local_heads_match_the_full_reference():
    res = dist.run(tp2_cases, 2, timeout=240)
    assert [r["tp_rank"] for r in res] == [0, 1]
    for r in res:
        for case in ("mha_causal", "gqa_causal", "gqa_explicit_mask", "one_group_replicated"):
            c = r[case]
            assert c["heads_per_partition"] == 2 and c["hidden_per_partition"] == 2 * 16, c
            assert c["sdpa_shape"] == c["megatron_shape"] == (32, 2, 2 * 16), c
            for impl in ("sdpa", "megatron"):
                for name in ("out", "dq", "dk", "dv"):
                    assert c[f"{impl}_{name}"] <= 1.0, (case, impl, name, c)


@pytest.fixture(scope="module")
def behaviour():
    return dist.run(behaviour_checks, 1, timeout=240)[0]


def test_dropout_in_training_only(behaviour):
    d = behaviour["dropout"]
    assert d["config_rate"] == 0.25
    assert d["every_entry_kept_or_dropped"], d          # each probability kept (scaled by 1/(1-p)) or dropped
    # binomial(n, 0.25): 6 standard deviations with a fixed seed
    assert abs(d["dropped_fraction"] - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / d["n"]), d
    assert d["draws_differ"], d
    assert d["eval_error"] <= d["rel_bound"], d          # eval: no dropout (FP32 attention vs float64 probs)


def test_unsupported_inputs_are_refused_clearly(behaviour):
    e = behaviour["errors"]
    assert e["packed"].startswith("NotImplementedError") and "packed_seq_params" in e["packed"], e
    assert e["bias"].startswith("NotImplementedError") and "attention_bias" in e["bias"], e
    assert e["float_mask"].startswith("TypeError") and "boolean" in e["float_mask"], e
    assert e["causal_cross"].startswith("ValueError") and "attention_mask" in e["causal_cross"], e
    assert "--context-parallel-size 2" in behaviour["cp_error"], behaviour["cp_error"]


def test_window_and_softmax_variants_fall_back_to_megatron_with_one_log_line(behaviour):
    assert behaviour["plain_type"] == "SDPAttention"
    assert behaviour["window_types"] == ["DotProductAttention", "SDPAttention", "DotProductAttention",
                                         "SDPAttention"]
    assert behaviour["offset_type"] == "DotProductAttention" and behaviour["is_megatron_fallback"]
    lines = behaviour["log_lines"]
    assert len(lines) == 2, lines                        # one per reason, not one per layer
    assert "sliding-window" in lines[0] and "--softmax-type off-by-one" in lines[1], lines
    assert all("--nvfp4-attention megatron" in line for line in lines), lines


def test_knob_selects_the_core_attention_in_the_spec(behaviour):
    from megatron_fp4.megatron import NVFP4TransformerConfig, UnsupportedConfigError
    from megatron_fp4.megatron.attention import attention_choice
    from megatron_fp4.registry import available_recipes
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, nvfp4_recipe="quartet2")
    assert NVFP4TransformerConfig(**base).nvfp4_attention == "sdpa"
    spec = behaviour["spec_core_attention"]
    assert set(spec["sdpa"]) == set(available_recipes()), spec          # every recipe, bf16 included
    assert set(spec["sdpa"].values()) == {"build_core_attention"}, spec
    assert spec["megatron"] == "DotProductAttention", spec
    with pytest.raises(UnsupportedConfigError, match="--nvfp4-attention"):
        attention_choice(NVFP4TransformerConfig(**base, nvfp4_attention="flash"))


def test_launcher_flag_reaches_both_routes():
    from megatron.training.global_vars import unset_global_variables
    from megatron_fp4.pretrain_gpt import cpu_parser
    from megatron_fp4.pretrain_support import build_config, launcher_argv
    # CPU route: the driver's settings take the flag (GPTSettings.attention -> config.nvfp4_attention)
    assert cpu_parser().parse_args([]).nvfp4_attention == "sdpa"
    assert cpu_parser().parse_args(["--nvfp4-attention", "megatron"]).nvfp4_attention == "megatron"
    with pytest.raises(SystemExit):
        cpu_parser().parse_args(["--nvfp4-attention", "flash"])
    # GPU route: no dataloader mask with sdpa (it only repeats causality; None runs the flash kernel),
    # unless documents are masked apart (--reset-attention-mask) or Megatron's attention is asked for
    flag = "--no-create-attention-mask-in-dataloader"
    assert flag in launcher_argv([])
    assert flag not in launcher_argv(["--nvfp4-attention", "megatron"])
    assert flag not in launcher_argv(["--reset-attention-mask"])
    from megatron_fp4.patches import megatron_args
    megatron_args.apply()        # as on the GPU route (the plugin's shape checks run; order-independent)
    tiny = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1", "--mock-data"]
    for choice, mask_in_dataloader in (("sdpa", False), ("megatron", True)):
        unset_global_variables()
        try:
            args, cfg = build_config(tiny + ["--nvfp4-attention", choice])
        finally:
            unset_global_variables()
        assert cfg.model.transformer.nvfp4_attention == choice
        assert args.create_attention_mask_in_dataloader is mask_in_dataloader


SMALL_TP2_SP = dict(num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, seq_length=64,
                    micro_batch_size=2, num_microbatches=2, tp=2, sequence_parallel=True, recipe="bf16")


def test_gpt_trains_with_sdpa_tp2_sp_as_with_megatron_attention():
    res = dist.run(gpt_attention_runs, 2, SMALL_TP2_SP, 6, timeout=280)
    assert all(res[0][k]["losses"] == res[1][k]["losses"] for k in res[0])   # both TP ranks report the loss
    runs = res[0]
    assert runs["sdpa"]["core_attention"] == ["SDPAttention"], runs["sdpa"]
    assert runs["megatron"]["core_attention"] == ["DotProductAttention"], runs["megatron"]
    assert runs["sdpa"]["state_keys"] == runs["megatron"]["state_keys"]   # checkpoints interchangeable
    sdpa, meg, pert = (runs[k]["losses"] for k in ("sdpa", "megatron", "megatron_perturbed"))
    assert all(math.isfinite(x) for x in sdpa) and sdpa[-1] < sdpa[0] - 0.2, sdpa
    # sdpa moves the losses no further than a last-bit weight change does (control, same run), with a
    # floor of 16 FP32 ulps of the loss for steps where the control happens to be tiny
    for step, (a, m, c) in enumerate(zip(sdpa, meg, pert)):
        bound = max(8 * abs(c - m), 16 * U * abs(m))
        assert abs(a - m) <= bound, (step, a, m, c)


# --------------------------------------------------------------------------------------------------
# GPU (H100): BF16 on CUDA, the fused kernels actually selected
# --------------------------------------------------------------------------------------------------

def gpu_bf16_checks(rank, world):
    """BF16 on CUDA: SDPAttention against Megatron's DotProductAttention and the float64 reference;
    the flash kernel runs the causal (and GQA) path, the memory-efficient one the masked path; dropout
    draws from Megatron's tensor-parallel RNG tracker."""
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType as T
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _init()
    out = {}
    b, heads, d, s = 2, 8, 64, 256
    for case, groups, with_mask in (("causal", 8, False), ("gqa_causal", 2, False), ("explicit_mask", 8, True),
                                    ("gqa_explicit_mask", 2, True)):
        cfg = _config(heads=heads, groups=groups, kv_channels=d, bf16=True, params_dtype=torch.bfloat16)
        sdpa, megatron = _pair(cfg, T.padding if with_mask else T.causal)
        q, k, v = (t.bfloat16().float() for t in _qkv(s, s, b, heads, groups, d, seed=11))   # exact in BF16
        mask = _random_mask(b, s, s) if with_mask else None
        torch.manual_seed(99)
        dout = torch.randn(s, b, heads, d).bfloat16().float()
        ref_out, ref_grads, _ = reference(q, k, v, dout, mask, not with_mask, 1.0 / math.sqrt(d))
        cuda = lambda t: t.to("cuda", torch.bfloat16)   # noqa: E731
        qc, kc, vc, dc = map(cuda, (q, k, v, dout))
        mc = None if mask is None else mask.cuda()
        backend = SDPBackend.EFFICIENT_ATTENTION if with_mask else SDPBackend.FLASH_ATTENTION
        with sdpa_kernel([backend]):          # raises if that fused kernel cannot take these inputs
            s_out, s_grads = _run(sdpa, qc, kc, vc, dc, mc)
        m_out, m_grads = _run(megatron, qc, kc, vc, dc, mc)
        res = {}
        for name, got_s, got_m, exact in zip(("out", "dq", "dk", "dv"), (s_out, *s_grads), (m_out, *m_grads),
                                             (ref_out, *ref_grads)):
            exact = exact.reshape(got_s.shape)
            scale = float(exact.abs().max())
            res[f"sdpa_{name}"] = float((got_s.double().cpu() - exact).abs().max()) / scale
            res[f"megatron_{name}"] = float((got_m.double().cpu() - exact).abs().max()) / scale
        out[case] = res
    # dropout inside the tracker's fork: reproducible from the tracker state, default generator untouched
    cfg = _config(heads=heads, kv_channels=d, bf16=True, params_dtype=torch.bfloat16, attention_dropout=0.1)
    module, _ = _pair(cfg, T.causal)
    module.train()
    q, k, v = (t.to("cuda", torch.bfloat16) for t in _qkv(s, s, b, heads, heads, d, seed=12))
    tracker = tensor_parallel.get_cuda_rng_tracker()
    states = tracker.get_states()
    default_state = torch.cuda.get_rng_state()
    first = module(q, k, v, None)
    tracker.set_states(states)
    second = module(q, k, v, None)
    out["dropout"] = {"reproducible": bool(torch.equal(first, second)),
                      "default_generator_untouched": bool(torch.equal(default_state, torch.cuda.get_rng_state())),
                      "differs_from_eval": not torch.equal(first, module.eval()(q, k, v, None))}
    return out


_GPU_SCRIPT = """
import json, os
import torch.distributed as dist
dist.init_process_group("gloo", rank=0, world_size=1, init_method="file://" + os.environ["PG_FILE"])
import test_attention
print("RESULT " + json.dumps(test_attention.gpu_bf16_checks(0, 1)))
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_on_cuda_matches_megatron_and_uses_fused_kernels(tmp_path):
    # a fresh process (dist.run's forkserver children cannot initialise CUDA), one gloo rank, no CPU shim
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, PYTHONWARNINGS="ignore", PG_FILE=str(tmp_path / "pg"),
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", _GPU_SCRIPT], capture_output=True, text=True, timeout=240,
                          env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT "):])
    for case in ("causal", "gqa_causal", "explicit_mask", "gqa_explicit_mask"):
        r = res[case]
        for name in ("out", "dq", "dk", "dv"):
            # inputs exact in BF16, outputs rounded to BF16: sdpa (FP32 scores and softmax inside the kernel)
            # is at least as close to the float64 result as Megatron's BF16 path (BF16 scores and
            # probabilities), give or take 2 BF16 ulps (2^-8 relative) of the largest entry
            assert r[f"sdpa_{name}"] <= r[f"megatron_{name}"] + 2 * 2.0 ** -8, (case, name, r)
            assert r[f"sdpa_{name}"] <= 0.05, (case, name, r)
    d = res["dropout"]
    assert d["reproducible"] and d["default_generator_untouched"] and d["differs_from_eval"], d
