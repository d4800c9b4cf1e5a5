"""Recipes: which quantizer runs on which operand of the three GEMMs (numerics.md §6).

One recipe = one YAML file in `recipes/` + one dataclass here. A YAML file names its `family`
(`bf16`, `nvidia`, `tetrajet2`, `quartet2`) and sets that family's knobs; everything else keeps the
dataclass default. Each family's methods are its row of the spec's per-recipe GEMM table:

    quantize_input / quantize_weight   forward operands (saved for backward, packed)
    fprop(xq, wq)                      Y  = X W^T            (inner dim K)
    dgrad(dy, wq)                      dX = E W              (inner dim N)
    wgrad(dy, x_saved)                 dW = E^T X            (inner dim T, padded to token_multiple)

All three GEMMs return FP32; the autograd linear casts. Randomness is drawn in backward only, from
counter-based streams keyed by QuantContext.key and .state (recompute-safe, layout-independent,
graph-safe: rng.py). Every quantizer
and GEMM goes through kernels/dispatch.py with the call's backend config (QuantContext.backend) and a
site (recipe name, operand) that names the call in fallback messages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Optional, Union

import torch

from . import format as fmt
from . import quantizers as Q
from .backend import BackendConfig
from .kernels import dispatch as D
from .rng import RandomStream, Role, derive_key
from .tensor import NVFP4Tensor, pad_cols, transpose_tiles  # noqa: F401  (re-exported: recipe.pad_cols, ...)

AmaxReduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


@dataclass
class QuantContext:
    """Per-call facts the recipe needs beyond the tensors.

    key: the call's random stream key (seed, step, layer, micro-batch, DP rank folded in), or with
    `state` its host-static part (seed, layer, DP rank).
    state: None, or an int64 device tensor of the per-call fields folded after `key` ([iteration,
    call] in the Megatron layers): read by the twins and kernels when they draw, so a CUDA graph
    replays fresh bits once it is rewritten in place (rng.py). Role keys: derive_key(key, *state, role).
    *_amax_reduce: MAX all-reduce over the TP group for operands that are TP-sharded (None otherwise).
    in_offset / out_offset: global index of this rank's first input / output feature, so random
    counters are global coordinates and do not depend on the TP split.
    seed: the recipe's base seed (for fixed RHT signs).
    backend: the implementation choice (megatron_fp4.backend); None: backend.current() at each call.
    The layers set it once per call, so forward and backward of a call run on the same backend.
    """

    key: int = 0
    seed: int = 0
    state: Optional[torch.Tensor] = field(default=None, compare=False)
    input_amax_reduce: AmaxReduce = None
    weight_amax_reduce: AmaxReduce = None
    grad_output_amax_reduce: AmaxReduce = None
    in_offset: int = 0
    out_offset: int = 0
    backend: Optional[BackendConfig] = None

    def stream(self, role: Role, row_offset: int = 0, col_offset: int = 0) -> RandomStream:
        return RandomStream(self.key, row_offset, col_offset, self.state).for_role(role)

    def fixed_stream(self, role: Role) -> RandomStream:
        """The run-wide stream of a role: the base seed's, the same for every layer, step and call."""
        return RandomStream(derive_key(self.seed, int(role)))


def _choice(*values):
    return {"choices": values}


@dataclass
class Recipe:
    """Knobs shared by every recipe family."""

    family: ClassVar[str] = "base"
    name: str = "custom"
    seed: int = 1234
    tp_amax_reduce: bool = True
    debug_checks: bool = False

    # Per-layer overrides (Megatron integration): the first / last N transformer layers and linears
    # whose canonical name (e.g. "decoder.layers.0.mlp.linear_fc2") matches an fnmatch pattern run in
    # BF16. Megatron's own --first-last-layers-bf16 flags and --nvfp4-bf16-modules add to these.
    bf16_first_layers: int = 0
    bf16_last_layers: int = 0
    bf16_modules: tuple = ()

    # TetraJet-v2 stabilizers (optimizer-hooks.md), off by default. Iteration knobs accept an absolute
    # iteration (>= 1) or a fraction of the run's training iterations (< 1), so the released
    # hyperparameters can be scaled to the run length (see `stabilizer_schedule`).
    outcontrol: bool = False
    outcontrol_ratio: float = 0.1
    outcontrol_k_mode: str = field(default="exact", metadata=_choice("exact", "release128"))
    outcontrol_record_start: float = 501.0
    outcontrol_record_iters: float = 50.0
    oscireset: bool = False
    oscireset_variant: str = field(default="full", metadata=_choice("full", "memeff"))
    oscireset_start: float = 0.65
    oscireset_period: float = 200.0
    oscireset_window: float = 50.0
    oscireset_threshold: float = 8.0
    oscireset_sample_percent: float = 10.0

    # divisibility the GEMM dims need (in_features, out_features, tokens); tokens are padded
    in_multiple: ClassVar[int] = 16
    out_multiple: ClassVar[int] = 16
    token_multiple: ClassVar[int] = 16
    wgrad_needs_original_input: ClassVar[bool] = False
    quantized: ClassVar[bool] = True

    def validate(self) -> None:
        """Cross-field checks; raises ValueError naming the knob."""
        self._validate_stabilizers()

    def keeps_in_bf16(self, layer_number: int, num_layers: int, name: str) -> bool:
        """Whether the recipe's per-layer overrides keep this linear (global 1-based layer) in BF16."""
        import fnmatch
        if layer_number <= self.bf16_first_layers or layer_number > num_layers - self.bf16_last_layers:
            return True
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.bf16_modules)

    def _validate_stabilizers(self) -> None:
        if self.bf16_first_layers < 0 or self.bf16_last_layers < 0:
            raise ValueError("bf16_first_layers and bf16_last_layers must be non-negative")
        if self.outcontrol and self.family not in ("tetrajet2", "quartet2"):
            raise ValueError(f"outcontrol needs a tetrajet2 or quartet2 family recipe, not {self.family}")
        if self.oscireset and not self.quantized:
            raise ValueError("oscireset needs a quantized recipe")
        if not 0.0 < self.outcontrol_ratio < 1.0:
            raise ValueError(f"outcontrol_ratio must be in (0, 1), got {self.outcontrol_ratio}")
        for knob in ("outcontrol_record_start", "outcontrol_record_iters", "oscireset_start",
                     "oscireset_period", "oscireset_window"):
            if getattr(self, knob) < 0:
                raise ValueError(f"{knob} must be non-negative, got {getattr(self, knob)}")
        if self.oscireset_threshold <= 0:
            raise ValueError(f"oscireset_threshold must be positive, got {self.oscireset_threshold}")
        if not 0 < self.oscireset_sample_percent <= 100:
            raise ValueError(f"oscireset_sample_percent must be in (0, 100], got {self.oscireset_sample_percent}")

    def stabilizer_schedule(self, train_iters: int) -> dict:
        """Absolute iterations of the stabilizers for a run of `train_iters` iterations.

        Fractions (< 1) are scaled to the run; the period keeps room for its window (P >= T + 2).
        """
        def iters(value, minimum):
            return max(minimum, int(round(value * train_iters)) if value < 1 else int(value))
        window = iters(self.oscireset_window, 1)
        return {
            "outcontrol_record_start": iters(self.outcontrol_record_start, 0),
            "outcontrol_record_iters": iters(self.outcontrol_record_iters, 1),
            "oscireset_start": iters(self.oscireset_start, 0),
            "oscireset_window": window,
            "oscireset_period": max(window + 2, iters(self.oscireset_period, 3)),
        }

    @property
    def token_padding(self) -> int:
        """Tokens are zero-padded to this multiple for the wgrad GEMM (blocks and RHT run along T)."""
        return max(self.token_multiple, getattr(self, "rht_size", 1))

    def check_shapes(self, in_features: int, out_features: int) -> None:
        out_multiple = self.out_multiple
        if self.family in ("quartet2", "tetrajet2"):  # dgrad rotates along N
            out_multiple = max(out_multiple, self.rht_size)
        for what, size, multiple in (("in_features", in_features, self.in_multiple),
                                     ("out_features", out_features, out_multiple)):
            if size % multiple:
                raise ValueError(f"recipe {self.name!r} needs {what} ({size}) to be a multiple of "
                                 f"{multiple}")

    def gemm_mode(self, device: torch.device) -> str:
        return "exact"

    def describe(self) -> str:
        knobs = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                          if f.name != "name")
        return f"{self.name} ({self.family}: {knobs})"

    # The GEMM table: every quantized family overrides these; the bf16 family (quantized = False)
    # never reaches them, because the layers and the autograd linear take the stock GEMM path for it.
    # for_gemm=True: the caller hands the operand straight to fprop (D.matmul drops the BF16 operand a
    # kernel may write for it, so what is saved for backward stays packed)
    def quantize_input(self, x: torch.Tensor, ctx: QuantContext, for_gemm: bool = False) -> NVFP4Tensor:
        raise NotImplementedError

    def quantize_weight(self, w: torch.Tensor, ctx: QuantContext, for_gemm: bool = False) -> NVFP4Tensor:
        raise NotImplementedError

    def fprop(self, xq: NVFP4Tensor, wq: NVFP4Tensor, ctx: QuantContext, out_dtype=None) -> torch.Tensor:
        """Y in `out_dtype` (FP32 by default); the cast happens in the GEMM's epilogue pass on GPU."""
        return D.matmul(xq, wq, self.gemm_mode(xq.device), out_dtype=out_dtype, backend=ctx.backend,
                        site=(self.name, "fprop GEMM"))

    def dgrad(self, dy: torch.Tensor, wq: NVFP4Tensor, ctx: QuantContext, out_dtype=None) -> torch.Tensor:
        raise NotImplementedError

    def wgrad(self, dy: torch.Tensor, x_saved, ctx: QuantContext) -> torch.Tensor:
        raise NotImplementedError

    # -- what runs where (issue #19's start table: megatron/precision.py) ---------------------------
    # operand_table(): one dict per GEMM operand, read from this recipe's knobs (so a YAML file or an
    # --nvfp4-override changes it): gemm (fprop / dgrad / wgrad), operand, source, format (NVFP4 /
    # MXFP8 / BF16), block, along (the GEMM inner dim the blocks run along), quantizer, rotation,
    # rounding, channels, and sites: the dispatch sites (the `site` operand names the methods above
    # pass to kernels/dispatch.py) that produce the operand, so the table's backend column can ask
    # the run's own kernel-or-twin rule about exactly those calls.
    GEMM_OPERANDS: ClassVar[tuple] = (("fprop", "X", "W"), ("dgrad", "E", "W^T"), ("wgrad", "E^T", "X^T"))

    def operand_table(self) -> list:
        raise NotImplementedError

    def bf16_operand_table(self) -> list:
        """A linear that runs BF16 (the bf16 recipe, or one kept in BF16 by an override)."""
        return [self._operand(gemm, operand, "as is", "BF16", "-", "-", "none", "none", "-")
                for gemm, *operands in self.GEMM_OPERANDS for operand in operands]

    @staticmethod
    def _operand(gemm, operand, source, format, block, along, quantizer, rotation, rounding, sites=(),
                 channels="all"):
        return dict(gemm=gemm, operand=operand, source=source, format=format, block=block, along=along,
                    quantizer=quantizer, rotation=rotation, rounding=rounding, channels=channels,
                    sites=list(sites))

    def _rn_text(self) -> str:
        return f"RN (ties to {self.rtn_ties})"

    def _signs_text(self, name: str = "sigma") -> str:
        if getattr(self, "rht_signs", "fresh") == "fixed":
            return f"RHT-{self.rht_size}, fixed {name} (one run-wide vector)"
        return f"RHT-{self.rht_size}, fresh {name} per layer call"

    def _outcontrol_rows(self, rows: list) -> list:
        """rows with OutControl's split (numerics.md §6.2), which starts at its outlier selection: fprop
        and wgrad gain MXFP8 outlier-channel operands, dgrad re-quantizes W from the rebuilt dense W_hat."""
        if not self.outcontrol:
            return rows
        out = []
        for row in rows:
            row = dict(row)
            if row["gemm"] in ("fprop", "wgrad"):
                row["channels"] = "FP4 channels (all channels until OutControl's selection)"
            if row["operand"] == "W^T":
                row["source"] += "; after OutControl's selection from W_hat rebuilt of its FP4 and MXFP8 parts"
                row["sites"] = row["sites"] + ["dgrad W_hat^T"]
            out.append(row)
        mx = dict(format="MXFP8", block="1x32, E8M0 scales", quantizer="RTN", rotation="none",
                  rounding="RN (E4M3 elements)", channels="outlier channels (OutControl, from its selection on)")
        out += [self._operand("fprop", "X[:, outliers]", "original X", along="K", **mx),
                self._operand("fprop", "W[:, outliers]", "original W", along="K", **mx),
                self._operand("wgrad", "E^T (outlier columns of dW)", "raw dY", along="T", **mx),
                self._operand("wgrad", "X[:, outliers]^T", "the forward MXFP8 X_hat[:, outliers]", along="T", **mx)]
        order = [gemm for gemm, *_ in self.GEMM_OPERANDS]
        return sorted(out, key=lambda r: order.index(r["gemm"]))


@dataclass
class BF16Recipe(Recipe):
    """No quantization: the baseline. The plugin's layers run Megatron's stock GEMM path."""

    family: ClassVar[str] = "bf16"
    quantized: ClassVar[bool] = False
    in_multiple: ClassVar[int] = 1
    out_multiple: ClassVar[int] = 1
    token_multiple: ClassVar[int] = 1

    def operand_table(self) -> list:
        return self.bf16_operand_table()


@dataclass
class NvidiaRecipe(Recipe):
    """NVIDIA NVFP4 (TE NVFP4BlockScaling semantics, numerics.md §6.3).

    fwd X: 1x16 RN; fwd W: 16x16 tiles RN (so W^T has identical values and dgrad reuses it);
    dgrad E: 1x16 SR; wgrad E^T: 1x16 SR and X^T (original BF16 X): 1x16 RN, both after RHT-16.
    sr_headroom defaults to 17/16 as in the Quartet II comparison runs (spec open decision 1).
    """

    family: ClassVar[str] = "nvidia"
    wgrad_needs_original_input: ClassVar[bool] = True
    four_over_six: bool = False
    rtn_ties: str = field(default="even", metadata=_choice("even", "away"))
    sr_headroom: float = field(default=17.0 / 16.0, metadata=_choice(1.0, 17.0 / 16.0))
    rht_size: int = field(default=16, metadata=_choice(16, 32, 128))
    rht_signs: str = field(default="fixed", metadata=_choice("fixed", "fresh"))

    def _forward_smax(self) -> float:
        return Q.FOUR_OVER_SIX_SMAX if self.four_over_six else fmt.E4M3_MAX

    def quantize_input(self, x, ctx, for_gemm=False):
        return D.quantize_nvfp4(x, smax=self._forward_smax(), ties=self.rtn_ties,
                                four_over_six=self.four_over_six, amax_reduce=ctx.input_amax_reduce,
                                for_gemm=for_gemm, backend=ctx.backend, site=(self.name, "forward X"))

    def quantize_weight(self, w, ctx, for_gemm=False):
        return D.quantize_nvfp4(w, smax=self._forward_smax(), ties=self.rtn_ties,
                                four_over_six=self.four_over_six, block_rows=16,
                                amax_reduce=ctx.weight_amax_reduce, backend=ctx.backend,
                                site=(self.name, "forward W (16x16 tiles)"))

    def _sr(self, t, stream, amax_reduce, ctx, operand):
        # backward operands (E, E^T): straight into their GEMM, never kept (for_gemm)
        return D.quantize_nvfp4(t, mode=Q.ROUND_STOCHASTIC, v=6.0 / self.sr_headroom, stream=stream,
                                amax_reduce=amax_reduce, for_gemm=True, backend=ctx.backend,
                                site=(self.name, operand))

    def dgrad(self, dy, wq, ctx, out_dtype=None):
        eq = self._sr(dy, ctx.stream(Role.DGRAD_GRAD_OUTPUT, 0, ctx.out_offset), ctx.grad_output_amax_reduce,
                      ctx, "dgrad E")
        site = (self.name, "dgrad GEMM")
        return D.matmul(eq, D.transpose_tiles(wq, backend=ctx.backend, site=(self.name, "dgrad W^T tiles")),
                        out_dtype=out_dtype, backend=ctx.backend, site=site)

    def _signs(self, ctx, device):
        if self.rht_signs == "fixed":
            return D.rht_signs(ctx.fixed_stream(Role.RHT_SIGNS_FIXED), self.rht_size, device)
        return D.rht_signs(ctx.stream(Role.RHT_SIGNS), self.rht_size, device)

    def wgrad(self, dy, x, ctx):
        sigma = self._signs(ctx, dy.device)
        et = D.rht_of(dy, sigma, transpose=True, pad_multiple=self.token_padding, backend=ctx.backend,
                      site=(self.name, "wgrad RHT of E^T"))
        xt = D.rht_of(x, sigma, transpose=True, pad_multiple=self.token_padding, backend=ctx.backend,
                      site=(self.name, "wgrad RHT of X^T"))
        etq = self._sr(et, ctx.stream(Role.WGRAD_GRAD_OUTPUT, ctx.out_offset, 0), ctx.grad_output_amax_reduce,
                       ctx, "wgrad E^T")
        xtq = D.quantize_nvfp4(xt, ties=self.rtn_ties, amax_reduce=ctx.input_amax_reduce, for_gemm=True,
                               backend=ctx.backend, site=(self.name, "wgrad X^T"))
        return D.matmul(etq, xtq, backend=ctx.backend, site=(self.name, "wgrad GEMM"))

    def operand_table(self) -> list:
        """numerics.md §6.3 from this recipe's knobs (see Recipe.operand_table)."""
        fwd = "RTN + 4/6" if self.four_over_six else "RTN"
        smax = "Smax 256" if self.four_over_six else "Smax 448"
        scales = "E4M3 + FP32 tensor scale"
        sr = f"SR (headroom {self.sr_headroom:g})"
        rn, op = self._rn_text(), self._operand
        return [
            op("fprop", "X", "original X", "NVFP4", f"1x16, {scales} ({smax})", "K", fwd, "none", rn, ["forward X"]),
            op("fprop", "W", "original W", "NVFP4", f"16x16 tiles, {scales} ({smax})", "K", fwd, "none", rn,
               ["forward W (16x16 tiles)"]),
            op("dgrad", "E", "raw dY", "NVFP4", f"1x16, {scales}", "N", "SR", "none", sr, ["dgrad E"]),
            op("dgrad", "W^T", "the forward W_hat tiles transposed (no re-quantization)", "NVFP4",
               "16x16 tiles (the forward's)", "N", "reused from forward", "none", "the forward's",
               ["dgrad W^T tiles"]),
            op("wgrad", "E^T", "raw dY (a second, independent quantization)", "NVFP4", f"1x16, {scales}", "T", "SR",
               self._signs_text(), sr, ["wgrad RHT of E^T", "wgrad E^T"]),
            op("wgrad", "X^T", "original X (high precision), not X_hat", "NVFP4", f"1x16, {scales} (Smax 448)", "T",
               "RTN", self._signs_text() + " (the same as E^T)", rn, ["wgrad RHT of X^T", "wgrad X^T"]),
        ]


@dataclass
class TetraJet2Recipe(Recipe):
    """TetraJet-v2 (numerics.md §6.2): double-block QDB everywhere, no tensor scale.

    fwd X, W: QDB RN along K. dgrad: E and dequant(Q2(W))^T, QDB SR along N after RHT-16 with d1.
    wgrad: E^T and dequant(Q1(X))^T, QDB SR along T after RHT-16 with d2 (fresh d1, d2 per call).
    """

    family: ClassVar[str] = "tetrajet2"
    in_multiple: ClassVar[int] = 128
    out_multiple: ClassVar[int] = 128
    token_multiple: ClassVar[int] = 128
    rtn_ties: str = field(default="even", metadata=_choice("even", "away"))
    sr_headroom: float = field(default=1.0, metadata=_choice(1.0, 17.0 / 16.0))
    rht_size: int = field(default=16, metadata=_choice(16, 32, 128))
    rht_signs: str = field(default="fresh", metadata=_choice("fresh", "fixed"))
    outer_block: Union[int, str] = field(default=128, metadata=_choice(128, "tensor"))
    gemm_emulation: str = field(default="auto", metadata=_choice("auto", "exact", "fp32", "bf16"))

    def gemm_mode(self, device):
        if self.gemm_emulation == "auto":
            return "bf16" if torch.device(device).type == "cuda" else "exact"
        return self.gemm_emulation

    # Every quantizer below goes through kernels/dispatch.py: the fused Triton kernel on CUDA
    # (outer_block=128, RHT-16), exactly the reference composition elsewhere.
    # Operands that go straight into a "bf16"-mode GEMM (the GPU default) ask the kernel for that
    # GEMM's BF16 operand as well (for_gemm); the exact mode reads packed operands itself.
    def _bf16_gemm(self, t):
        return self.gemm_mode(t.device) == "bf16"

    def _rn(self, t, amax_reduce, ctx, operand, for_gemm=False):
        return D.quantize_double_block(t, ties=self.rtn_ties, outer_block=self.outer_block,
                                       amax_reduce=amax_reduce, for_gemm=for_gemm and self._bf16_gemm(t),
                                       backend=ctx.backend, site=(self.name, operand))

    def _rht_sr(self, a, sigma, stream, amax_reduce, ctx, operand, transpose=False, pad_multiple=1):
        """QDB SR of rht(pad_cols(A, pad_multiple), sigma), A = a or a.t()."""
        return D.rht_double_block(a, sigma, stream, transpose=transpose, mode=Q.ROUND_STOCHASTIC,
                                  sr_headroom=self.sr_headroom, pad_multiple=pad_multiple,
                                  outer_block=self.outer_block, amax_reduce=amax_reduce,
                                  for_gemm=self._bf16_gemm(a), backend=ctx.backend, site=(self.name, operand))

    def quantize_input(self, x, ctx, for_gemm=False):
        return self._rn(x, ctx.input_amax_reduce, ctx, "forward X", for_gemm)

    def quantize_weight(self, w, ctx, for_gemm=False):
        return self._rn(w, ctx.weight_amax_reduce, ctx, "forward W", for_gemm)

    def _signs(self, ctx, role, device):
        stream = ctx.fixed_stream(role) if self.rht_signs == "fixed" else ctx.stream(role)
        return D.rht_signs(stream, self.rht_size, device)

    def _requant_sr(self, q, sigma, stream, amax_reduce, ctx, operand, pad_multiple=1):
        """QDB SR of rht(pad_cols(q.dequantize().t(), pad_multiple), sigma), read from the packed q."""
        return D.requant_double_block(q, sigma, stream, mode=Q.ROUND_STOCHASTIC, sr_headroom=self.sr_headroom,
                                      pad_multiple=pad_multiple, outer_block=self.outer_block,
                                      amax_reduce=amax_reduce, for_gemm=self._bf16_gemm(q.packed),
                                      backend=ctx.backend, site=(self.name, operand))

    def _dgrad(self, dy, ctx, out_dtype, weight_operand):
        """Q3(E) x Q4(W^T) after RHT-16 (d1); weight_operand(d1, stream, amax_reduce) makes Q4(W^T)."""
        d1 = self._signs(ctx, Role.RHT_SIGNS_DGRAD, dy.device)
        eq = self._rht_sr(dy, d1, ctx.stream(Role.DGRAD_GRAD_OUTPUT, 0, ctx.out_offset),
                          ctx.grad_output_amax_reduce, ctx, "dgrad E")
        wtq = weight_operand(d1, ctx.stream(Role.DGRAD_WEIGHT, ctx.in_offset, ctx.out_offset),
                             ctx.weight_amax_reduce)
        return D.matmul(eq, wtq, self.gemm_mode(dy.device), out_dtype=out_dtype, backend=ctx.backend,
                        site=(self.name, "dgrad GEMM"))

    def dgrad(self, dy, wq, ctx, out_dtype=None):
        # W^T re-quantized from the packed forward weight (the kernel never writes W_hat in FP32)
        return self._dgrad(dy, ctx, out_dtype,
                           lambda d1, st, red: self._requant_sr(wq, d1, st, red, ctx, "dgrad W^T"))

    def dgrad_dense(self, dy, w_hat, ctx, out_dtype=None):
        """dgrad from the dequantized forward weight W_hat [N, K] (FP32): Q3 x Q4 after RHT-16 (d1)."""
        return self._dgrad(dy, ctx, out_dtype,
                           lambda d1, st, red: self._rht_sr(w_hat, d1, st, red, ctx, "dgrad W_hat^T",
                                                            transpose=True))

    def wgrad(self, dy, xq, ctx):
        d2 = self._signs(ctx, Role.RHT_SIGNS_WGRAD, dy.device)
        etq = self._rht_sr(dy, d2, ctx.stream(Role.WGRAD_GRAD_OUTPUT, ctx.out_offset, 0),
                           ctx.grad_output_amax_reduce, ctx, "wgrad E^T", transpose=True,
                           pad_multiple=self.token_padding)
        xtq = self._requant_sr(xq, d2, ctx.stream(Role.WGRAD_INPUT, ctx.in_offset, 0), ctx.input_amax_reduce,
                               ctx, "wgrad X^T", pad_multiple=self.token_padding)
        return D.matmul(etq, xtq, self.gemm_mode(dy.device), backend=ctx.backend, site=(self.name, "wgrad GEMM"))

    def operand_table(self) -> list:
        """numerics.md §6.2 (Q1..Q6, plus OutControl's split) from this recipe's knobs."""
        block = ("double block: 1x16 E4M3 in 1x128 FP32" if self.outer_block in (128, "128")
                 else "1x16 E4M3 in one FP32 scale per tensor")
        sr = f"SR (headroom {self.sr_headroom:g})"
        rn, op = self._rn_text(), self._operand
        return self._outcontrol_rows([
            op("fprop", "X", "original X", "NVFP4", block, "K", "QDB RTN", "none", rn, ["forward X"]),
            op("fprop", "W", "original W", "NVFP4", block, "K", "QDB RTN", "none", rn, ["forward W"]),
            op("dgrad", "E", "raw dY", "NVFP4", block, "N", "QDB SR", self._signs_text("d1"), sr, ["dgrad E"]),
            op("dgrad", "W^T", "dequant(Q2(W))^T, re-quantized from the packed forward W_hat", "NVFP4", block, "N",
               "QDB SR", self._signs_text("d1") + " (the same as E)", sr, ["dgrad W^T"]),
            op("wgrad", "E^T", "raw dY (a second, independent quantization)", "NVFP4", block, "T", "QDB SR",
               self._signs_text("d2"), sr, ["wgrad E^T"]),
            op("wgrad", "X^T", "dequant(Q1(X))^T, re-quantized from the packed forward X_hat", "NVFP4", block, "T",
               "QDB SR", self._signs_text("d2") + " (the same as E^T)", sr, ["wgrad X^T"]),
        ])


@dataclass
class Quartet2Recipe(Recipe):
    """Quartet II (numerics.md §6.1): forward RTN (+4/6), backward MS-EDEN after RHT-128.

    One sigma per layer per backward call is shared by all four backward operands. W^T and X^T are
    re-quantized from the forward-quantized Ŵ, X̂. Choice: they are rotated from the *unscaled*
    exact values q*s (the FP32 tensor scale g of the forward operand is applied to the GEMM output
    instead), which saves a rounding and lets a kernel work from packed codes directly.
    """

    family: ClassVar[str] = "quartet2"
    out_multiple: ClassVar[int] = 128
    token_multiple: ClassVar[int] = 128
    four_over_six: bool = True
    rtn_ties: str = field(default="even", metadata=_choice("even", "away"))
    eden_group: int = field(default=128, metadata=_choice(128, 16))
    eden_c: float = 0.93
    eden_smax: float = 255.99
    rht_size: int = field(default=128, metadata=_choice(16, 32, 128))
    rht_signs: str = field(default="fresh", metadata=_choice("fresh", "fixed"))

    def validate(self):
        super().validate()
        if not 0.5 <= self.eden_c <= 1.5:
            raise ValueError(f"eden_c must be in [0.5, 1.5], got {self.eden_c}")
        if not 1.0 <= self.eden_smax <= 448.0:
            raise ValueError(f"eden_smax must be in [1, 448], got {self.eden_smax}")

    @property
    def eden_v(self) -> float:
        return 6.0 / (Q.SR_HEADROOM * self.eden_c)

    def _forward(self, t, amax_reduce, for_gemm, ctx, operand):
        smax = Q.FOUR_OVER_SIX_SMAX if self.four_over_six else fmt.E4M3_MAX
        return D.quantize_nvfp4(t, smax=smax, ties=self.rtn_ties, four_over_six=self.four_over_six,
                                amax_reduce=amax_reduce, for_gemm=for_gemm, backend=ctx.backend,
                                site=(self.name, operand))

    def quantize_input(self, x, ctx, for_gemm=False):
        return self._forward(x, ctx.input_amax_reduce, for_gemm, ctx, "forward X")

    def quantize_weight(self, w, ctx, for_gemm=False):
        return self._forward(w, ctx.weight_amax_reduce, for_gemm, ctx, "forward W")

    def _eden_knobs(self, amax_reduce, ctx, operand):
        return dict(eden_group=self.eden_group, v=self.eden_v, smax=self.eden_smax, ties=self.rtn_ties,
                    amax_reduce=amax_reduce, backend=ctx.backend, site=(self.name, operand))

    def _signs(self, ctx, device):
        stream = ctx.fixed_stream(Role.RHT_SIGNS) if self.rht_signs == "fixed" else ctx.stream(Role.RHT_SIGNS)
        return D.rht_signs(stream, self.rht_size, device)

    # Each MS-EDEN operand below is MS-EDEN(rht(A, sigma)) with A as the table says; the dispatch runs
    # the fused kernel (rotation + quantization, or unpack + transpose + rotation + quantization from
    # the packed forward operand) on GPU and exactly that reference composition elsewhere.
    # for_gemm=True: these operands go straight into their GEMM and are dropped, so the kernels may
    # also write the BF16 GEMM operand (no dequant pass before cuBLAS)
    def _grad_output_dgrad(self, dy, sigma, ctx):
        return D.rht_ms_eden(dy, sigma, ctx.stream(Role.DGRAD_GRAD_OUTPUT, 0, ctx.out_offset), for_gemm=True,
                             **self._eden_knobs(ctx.grad_output_amax_reduce, ctx, "dgrad E"))

    def dgrad(self, dy, wq, ctx, out_dtype=None):
        # W^T is rotated from the exact unscaled values q*s; the forward tensor scale goes on the output
        sigma = self._signs(ctx, dy.device)
        eq = self._grad_output_dgrad(dy, sigma, ctx)
        wtq = D.requant_ms_eden(wq, sigma, ctx.stream(Role.DGRAD_WEIGHT, ctx.in_offset, ctx.out_offset),
                                for_gemm=True, **self._eden_knobs(ctx.weight_amax_reduce, ctx, "dgrad W^T"))
        return D.matmul(eq, wtq, scale=wq.tensor_scale, out_dtype=out_dtype, backend=ctx.backend,
                        site=(self.name, "dgrad GEMM"))

    def dgrad_dense(self, dy, w_hat, ctx, out_dtype=None):
        """dgrad from a dequantized forward weight W_hat [N, K] (FP32): MS-EDEN x MS-EDEN after RHT."""
        sigma = self._signs(ctx, dy.device)
        eq = self._grad_output_dgrad(dy, sigma, ctx)
        wtq = D.rht_ms_eden(w_hat, sigma, ctx.stream(Role.DGRAD_WEIGHT, ctx.in_offset, ctx.out_offset),
                            transpose=True, for_gemm=True,
                            **self._eden_knobs(ctx.weight_amax_reduce, ctx, "dgrad W_hat^T"))
        return D.matmul(eq, wtq, out_dtype=out_dtype, backend=ctx.backend, site=(self.name, "dgrad GEMM"))

    def wgrad(self, dy, xq, ctx):
        sigma = self._signs(ctx, dy.device)
        etq = D.rht_ms_eden(dy, sigma, ctx.stream(Role.WGRAD_GRAD_OUTPUT, ctx.out_offset, 0), transpose=True,
                            pad_multiple=self.token_padding, for_gemm=True,
                            **self._eden_knobs(ctx.grad_output_amax_reduce, ctx, "wgrad E^T"))
        xtq = D.requant_ms_eden(xq, sigma, ctx.stream(Role.WGRAD_INPUT, ctx.in_offset, 0),
                                pad_multiple=self.token_padding, for_gemm=True,
                                **self._eden_knobs(ctx.input_amax_reduce, ctx, "wgrad X^T"))
        return D.matmul(etq, xtq, scale=xq.tensor_scale, backend=ctx.backend, site=(self.name, "wgrad GEMM"))

    def operand_table(self) -> list:
        """numerics.md §6.1 (plus OutControl's split) from this recipe's knobs."""
        fwd = "RTN + 4/6" if self.four_over_six else "RTN"
        scales = "E4M3 + FP32 tensor scale"
        fwd_block = f"1x16, {scales} (Smax {256 if self.four_over_six else 448})"
        eden = f"MS-EDEN (correction per {self.eden_group})"
        unbiased = "unbiased EDEN: RN elements, SR E4M3 scales"
        rot = self._signs_text() + ", shared by the 4 backward operands"
        rn, op = self._rn_text(), self._operand
        bwd_block = f"1x16, {scales} (Smax {self.eden_smax:g})"
        return self._outcontrol_rows([
            op("fprop", "X", "original X", "NVFP4", fwd_block, "K", fwd, "none", rn, ["forward X"]),
            op("fprop", "W", "original W", "NVFP4", fwd_block, "K", fwd, "none", rn, ["forward W"]),
            op("dgrad", "E", "raw dY", "NVFP4", bwd_block, "N", eden, rot, unbiased, ["dgrad E"]),
            op("dgrad", "W^T", "the forward W_hat, re-quantized from the packed operand", "NVFP4", bwd_block, "N",
               eden, rot, unbiased, ["dgrad W^T"]),
            op("wgrad", "E^T", "raw dY (a second, independent quantization)", "NVFP4", bwd_block, "T", eden, rot,
               unbiased, ["wgrad E^T"]),
            op("wgrad", "X^T", "the forward X_hat, re-quantized from the packed operand", "NVFP4", bwd_block, "T",
               eden, rot, unbiased, ["wgrad X^T"]),
        ])


FAMILIES = {cls.family: cls for cls in (BF16Recipe, NvidiaRecipe, TetraJet2Recipe, Quartet2Recipe)}
