"""What runs where, at start (issue #19): every plugin linear x {fprop, dgrad, wgrad} -> format,
quantizer, rotation, rounding and backend, printed by global rank 0 and saved as `precision.json`.

Why: the first thing users of FP4 training ask for is proof that the FP4 path is really active, and
on which layers. So the table is built from the objects the run uses, not from the flags:

- which linears run BF16 is each layer's own decision (`nvfp4_bf16`, set by megatron/transformer.py's
  tag_layer); the reason is read back from the same rules (Megatron's first/last-layers flags,
  --nvfp4-bf16-modules, the recipe's per-layer overrides);
- the operands come from the recipe's `operand_table()` (recipe.py, derived from its knobs);
- the backend column asks `kernel_coverage`, which applies kernels/dispatch.py's rule (backend.
  wants_kernel, then the entry's covered cases) to the dispatch sites that produce each operand, at
  the layer's per-rank weight shape and the run's tokens per GEMM. It runs nothing: no kernel, no
  fallback log. tests/megatron/test_precision.py checks it against the real dispatch (which calls
  fall back under kernels="interpret") for every built-in recipe.

Under pipeline parallelism each stage holds its own layers: `announce` gathers the rows over the
pipeline group, so global rank 0 prints and writes every linear of the model.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from typing import Callable, Optional

import torch

from .. import backend as backend_mod
from ..backend import BackendConfig
from .config import bf16_module_patterns, layer_in_bf16

SCHEMA = 1
FILENAME = "precision.json"
FORMULAS = {"fprop": "Y = X W^T", "dgrad": "dX = E W", "wgrad": "dW = E^T X"}


class PrecisionTableError(ValueError):
    """A precision.json that is not this module's (missing, not JSON, another schema)."""


# -- the backend column: kernels/dispatch.py's rule, asked without running anything -------------------

def _first(*checks) -> Optional[str]:
    """The first reason whose condition holds, None if none does (the call is covered)."""
    return next((reason for bad, reason in checks if bad), None)


def _nvidia(recipe, site, k, n, tokens, t_pad) -> Optional[str]:
    if site == "forward X":
        return _first((k % 16, f"{k} columns, not a multiple of 16"))
    if site == "forward W (16x16 tiles)":
        return _first((k % 16, f"{k} columns, not a multiple of 16"),
                      (n % 16, f"{n} rows, not a multiple of 16 (16x16 tiles)"))
    if site == "dgrad E":
        return _first((n % 16, f"{n} columns, not a multiple of 16"))
    if site == "dgrad W^T tiles":
        return _first((n % 16 or k % 16, f"shape ({n}, {k}), not a multiple of 16 on both dims"))
    if site in ("wgrad RHT of E^T", "wgrad RHT of X^T"):
        return _first((recipe.rht_size != 16, f"RHT size {recipe.rht_size} (the fused rotation is RHT-16)"),
                      (t_pad % 128, f"rotated dim padded to {t_pad}, not a multiple of 128"))
    if site in ("wgrad E^T", "wgrad X^T"):
        return _first((t_pad % 16, f"{t_pad} columns, not a multiple of 16"))
    raise KeyError(site)


def _double_block(recipe, site, k, n, tokens, t_pad) -> Optional[str]:
    outer_ok = recipe.outer_block in (128, "128")
    outer = (not outer_ok, f"outer_block={recipe.outer_block!r}")
    sigma = (recipe.rht_size != 16, f"RHT size {recipe.rht_size} (the double-block kernel rotates by 16)")
    args_ok = outer_ok and recipe.rht_size == 16

    def rotated(cols):          # rht_double_block: the rotated dim after padding
        return _first((args_ok and cols % 128, f"rotated dim padded to {cols}, not a multiple of 128"), outer, sigma)

    def requant(rows):          # requant_double_block of a packed [rows, k] forward operand
        return _first((k % 128, f"{k} columns, not a multiple of 128"),
                      (rows % 128, f"rotated dim padded to {rows}, not a multiple of 128"), outer, sigma)

    if site in ("forward X", "forward W"):
        return _first((k % 128, f"{k} columns, not a multiple of 128"), outer)
    if site in ("dgrad E", "dgrad W_hat^T"):
        return rotated(n)
    if site == "dgrad W^T":
        return requant(n)
    if site == "wgrad E^T":
        return rotated(t_pad)
    if site == "wgrad X^T":
        return requant(t_pad)
    raise KeyError(site)


def _quartet2(recipe, site, k, n, tokens, t_pad) -> Optional[str]:
    eden = ((recipe.eden_group not in (128, 16),
             f"eden_group={recipe.eden_group} (the MS-EDEN kernels correct per 128 or per 16)"),
            (recipe.rht_size != 128, f"RHT size {recipe.rht_size} (the MS-EDEN kernels rotate by 128)"))
    if site in ("forward X", "forward W"):
        return _first((k % 16, f"{k} columns, not a multiple of 16"))
    if site in ("dgrad E", "wgrad E^T", "dgrad W_hat^T"):
        return _first(*eden)
    if site == "dgrad W^T":
        return _first((n % 128, f"{n} rows, not a multiple of 128"), *eden)
    if site == "wgrad X^T":     # the packed forward X_hat, rows = tokens (not padded before the kernel)
        return _first((tokens % 128, f"{tokens} rows, not a multiple of 128"), *eden)
    raise KeyError(site)


_FAMILY_RULES = {"nvidia": _nvidia, "tetrajet2": _double_block, "quartet2": _quartet2}


def _gemm_uncovered(recipe, k, n, device) -> Optional[str]:
    if recipe.family == "tetrajet2":
        mode = recipe.gemm_mode(device)
        return _first((mode not in ("exact", "bf16"), f"gemm_emulation={mode!r} (kernels cover 'exact' and 'bf16')"))
    return _first((n % 16 or k % 16, f"shape ({n}, {k}), not a multiple of 16 on both dims"))


def _not_wanted(be: BackendConfig, device: torch.device) -> str:
    if be.kernels == "reference":
        return "torch twin (kernels='reference', MEGATRON_FP4_KERNELS=0)"
    return f"torch twin ({'CPU' if device.type == 'cpu' else device.type})"


def kernel_coverage(recipe, site: str, *, k: int, n: int, tokens: int, device="cpu",
                    backend: Optional[BackendConfig] = None) -> tuple:
    """(runs a kernel, why not or "") for the dispatch call `site` (the recipe's site operand name,
    e.g. "dgrad E" or "fprop GEMM") of a linear with per-rank weight [n, k] on `tokens` tokens per
    GEMM, on `device` under `backend` (default: the process's config). Side-effect free."""
    be = backend or backend_mod.current()
    device = torch.device(device)
    if not backend_mod.wants_kernel(be, device.type == "cuda"):
        return False, _not_wanted(be, device)
    t_pad = tokens + (-tokens) % max(recipe.token_padding, 1)
    if site.endswith(" GEMM"):
        reason = _gemm_uncovered(recipe, k, n, device)
    else:
        reason = _FAMILY_RULES[recipe.family](recipe, site, k, n, tokens, t_pad)
    return reason is None, reason or ""


def _backend_text(recipe, sites, k, n, tokens, device, be) -> str:
    if not sites:
        return "torch (no MXFP8 kernel)"
    decisions = [(site, *kernel_coverage(recipe, site, k=k, n=n, tokens=tokens, device=device, backend=be))
                 for site in sites]
    where = " (Triton interpreter)" if be.kernels == "interpret" else ""
    if all(ok for _, ok, _ in decisions):
        return "kernel" + where
    if not backend_mod.wants_kernel(be, torch.device(device).type == "cuda"):
        return decisions[0][2]
    twins = "; ".join(f"{site}: torch twin ({why})" for site, ok, why in decisions if not ok)
    return twins if not any(ok for _, ok, _ in decisions) else f"kernel{where}, except {twins}"


# -- the table ------------------------------------------------------------------------------------------

def plugin_linears(model_chunks) -> list:
    """The plugin linears of the model chunks (DDP / Float16Module wrappers included), in model order."""
    from .layers import NVFP4_LINEAR_TYPES
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    seen, out = set(), []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, NVFP4_LINEAR_TYPES) and id(module) not in seen:
                seen.add(id(module))
                out.append(module)
    return out


def bf16_reason(module) -> Optional[str]:
    """Why a plugin linear runs BF16 (None: it runs its recipe), from the rules tag_layer applies."""
    if not module.nvfp4_bf16:
        return None
    recipe, config = module.nvfp4_recipe, module.config
    if not recipe.quantized:
        return f"recipe {recipe.name!r} is BF16"
    layer, name = module.nvfp4_layer_number, module.nvfp4_name
    reasons = []
    if layer_in_bf16(config, layer):
        reasons.append("--first-last-layers-bf16")
    reasons += [f"--nvfp4-bf16-modules {p!r}" for p in bf16_module_patterns(config) if fnmatch.fnmatchcase(name, p)]
    if recipe.keeps_in_bf16(layer, config.num_layers, name):
        reasons.append("the recipe's bf16_first_layers / bf16_last_layers / bf16_modules")
    return "; ".join(reasons) or "kept in BF16"


def linear_rows(module, tokens: int, backend: Optional[BackendConfig] = None) -> list:
    """The rows of one plugin linear: one per GEMM, each with its operands and backends."""
    be = backend or backend_mod.current()
    recipe = module.nvfp4_recipe
    k, n = module._nvfp4_local_shape()
    device = module.weight.device
    reason = bf16_reason(module)
    table = recipe.bf16_operand_table() if reason else recipe.operand_table()
    rows = []
    for gemm, *_ in recipe.GEMM_OPERANDS:
        operands = []
        for op in (o for o in table if o["gemm"] == gemm):
            op = {key: value for key, value in op.items() if key not in ("gemm", "sites")} | {
                "backend": "BF16 GEMM (torch)" if reason else _backend_text(recipe, op["sites"], k, n, tokens, device, be)}
            operands.append(op)
        formats = sorted({op["format"] for op in operands}, key=["NVFP4", "MXFP8", "BF16"].index)
        rows.append({
            "linear": module.nvfp4_name, "layer": module.nvfp4_layer_number, "kind": module._nvfp4_kind,
            "weight_shape": [n, k], "tokens": tokens, "recipe": recipe.name, "device": str(device),
            "kernels": be.kernels, "gemm": gemm, "formula": FORMULAS[gemm], "format": " + ".join(formats),
            "bf16_reason": reason, "operands": operands,
            "gemm_backend": "BF16 GEMM (torch)" if reason else _backend_text(
                recipe, [f"{gemm} GEMM"], k, n, tokens, device, be),
            "emulation": None if reason else recipe.gemm_mode(device)})
    return rows


def precision_table(model_chunks, tokens: int, backend: Optional[BackendConfig] = None) -> list:
    """Rows of every plugin linear of these chunks (this rank's) x {fprop, dgrad, wgrad}; `tokens`: the
    token rows of each GEMM (sequence length x micro-batch size, divided by the context-parallel size)."""
    return [row for module in plugin_linears(model_chunks) for row in linear_rows(module, tokens, backend)]


# -- text -----------------------------------------------------------------------------------------------

_LAYER_PREFIX = re.compile(r"^decoder\.layers\.(\d+)\.")


def _ranges(numbers) -> str:
    numbers, parts = sorted(set(numbers)), []
    for x in numbers:
        if parts and x == parts[-1][1] + 1:
            parts[-1][1] = x
        else:
            parts.append([x, x])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _short_block(block: str) -> str:
    if block.startswith("double block"):
        return "1x16-in-1x128"
    return block.split(",")[0].replace(" (the forward's)", "").replace("16x16 tiles", "16x16-tiles")


def _short_rounding(rounding: str) -> str:
    if rounding.startswith("unbiased"):
        return "unbiased"
    if rounding.startswith("SR (headroom"):
        h = rounding[len("SR (headroom "):-1]
        return "SR" if h == "1" else f"SR/{h}"
    return rounding.split(" ")[0].replace("the", "as-forward")


def _short_rotation(rotation: str) -> str:
    if rotation == "none":
        return ""
    size = rotation.split(",")[0]
    return f"{size}-fixed" if "fixed" in rotation else size


def _operand_text(op: dict, line_format: str, with_backend: bool) -> str:
    """e.g. "E^T 1x16 MS-EDEN (correction per 128) RHT-128 unbiased"."""
    if op["format"] == "BF16":
        return f"{op['operand']} BF16"
    words, rounding = op["quantizer"].split(), _short_rounding(op["rounding"])
    if rounding == "RN" and "RTN" in words or rounding == "as-forward":
        rounding = ""               # implied by the quantizer
    elif words and rounding.split("/")[0] == words[-1]:
        words = words[:-1]          # "SR" + "SR/1.0625": said once
    parts = [op["operand"] + (f" {op['format']}" if op["format"] != line_format else ""),
             _short_block(op["block"]), " ".join(words), _short_rotation(op["rotation"]), rounding]
    text = " ".join(p for p in parts if p)
    return text + (f" [{op['backend']}]" if with_backend else "")


def _line_parts(row: dict) -> tuple:
    """(format, body, shared backend): the backend once at the end when the GEMM and its NVFP4
    operands agree (MXFP8 outlier operands always run in torch and say so in the body)."""
    if row["bf16_reason"]:
        return "BF16", f"({row['bf16_reason']})", f"[{row['gemm_backend']}]"
    fp4 = [op for op in row["operands"] if op["format"] != "MXFP8"]
    backends = {op["backend"] for op in fp4} | {row["gemm_backend"]}
    shared = len(backends) == 1
    body = " | ".join(_operand_text(op, "NVFP4", not shared or op["format"] == "MXFP8") for op in row["operands"])
    body += f"; GEMM {row['emulation']}" + ("" if shared else f" [{row['gemm_backend']}]")
    return row["format"], body, (f"[{backends.pop()}]" if shared else "")


def format_precision_table(rows: list) -> str:
    """Compact text: linears alike across layers are grouped; one line per linear group x GEMM."""
    if not rows:
        return "megatron_fp4 precision: no plugin linears in this model"
    groups = {}
    for row in rows:
        match = _LAYER_PREFIX.match(row["linear"])
        rel = row["linear"][match.end():] if match else row["linear"]
        layer = int(match.group(1)) if match else None
        gemm = "all" if row["bf16_reason"] else row["gemm"]     # a BF16 linear: one line for its 3 GEMMs
        key = (rel, gemm, row["weight_shape"][0], row["weight_shape"][1]) + _line_parts(row)
        groups.setdefault(key, []).append(layer)
    first = rows[0]
    recipes = sorted({r["recipe"] for r in rows})
    lines = [f"megatron_fp4 precision: recipe {', '.join(recipes)}; device {first['device']}, kernels "
             f"{first['kernels']!r}; {first['tokens']} tokens per GEMM; {len({r['linear'] for r in rows})} linears "
             "(per GEMM: operand block quantizer rotation rounding [backend])"]
    order = {"all": 0, "fprop": 0, "dgrad": 1, "wgrad": 2}
    width = max(len(key[0]) for key in groups)
    for key in sorted(groups, key=lambda k: (min(x if x is not None else -1 for x in groups[k]), k[0], order[k[1]])):
        rel, gemm, _, _, fmt, body, backend_text = key
        layers = groups[key]
        where = "layers " + _ranges(x for x in layers if x is not None) if layers[0] is not None else ""
        lines.append(f"  {rel:<{width}}  {where:<12} {gemm:<5} {fmt:<13} {body}" + (f" {backend_text}" if backend_text else ""))
    lines.append("  Embeddings, LM head, attention BMMs, norms, activations and the optimizer stay in high precision; "
                 f"sources and scales of every operand: {FILENAME}")
    return "\n".join(lines)


# -- file -----------------------------------------------------------------------------------------------

def write_precision_table(rows: list, run_dir: str) -> str:
    """RUN_DIR/precision.json (strict JSON, written atomically); returns its path."""
    from .checkpoint import replace_text
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, FILENAME)
    replace_text(path, json.dumps({"schema": SCHEMA, "rows": rows}, indent=1, allow_nan=False) + "\n")
    return path


def load_precision_table(path: str) -> list:
    """The rows of a precision.json written by write_precision_table."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except OSError as err:
        raise PrecisionTableError(f"{path}: cannot read it ({err.strerror})") from None
    except ValueError as err:
        raise PrecisionTableError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("rows"), list):
        raise PrecisionTableError(f"{path}: not a megatron_fp4 precision table (schema {SCHEMA})")
    return data["rows"]


# -- the start hook (both routes) -------------------------------------------------------------------------

def _gather_over_pipeline(rows: list) -> list:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return rows
    group = ps.get_pipeline_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return rows
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, rows, group=group)
    merged = [row for part in parts for row in part]
    return sorted(merged, key=lambda r: (r["layer"], r["linear"], list(FORMULAS).index(r["gemm"])))


def announce(model_chunks, tokens: int, run_dir: Optional[str], log: Callable[[str], None] = print) -> list:
    """Every rank: build this rank's rows and gather them over the pipeline stages; global rank 0: log the
    table and write RUN_DIR/precision.json (when run_dir is given). Returns the gathered rows."""
    import torch.distributed as dist
    rows = _gather_over_pipeline(precision_table(model_chunks, tokens))
    if not dist.is_initialized() or dist.get_rank() == 0:
        log(format_precision_table(rows))
        if run_dir:
            log(f"megatron_fp4 precision table written to {write_precision_table(rows, run_dir)}")
    return rows
