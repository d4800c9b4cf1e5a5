"""summary.json: what a launcher run leaves beside its checkpoints — one schema for both routes.

Both routes (the CPU driver and Megatron's loop on the GPU) build their summary with `make(...)`, which
takes exactly the fields below (a missing or unknown field is an error, so the two cannot drift
apart), and write it as strict JSON (`null` for a missing or non-finite number). `load(path)` reads
one back and checks it. Fields:

    schema            1 (this layout)
    route             "cpu" | "gpu"
    recipe            the --nvfp4-recipe given (name or YAML path)
    finished          the run reached --train-iters
    stopped_by        null, or why it stopped early ("time budget", "SIGTERM", "non-finite loss or grad
                      norm", "Megatron's early exit")
    error             null, or the failure's message
    iterations        the last iteration trained (over all resumed segments)
    train_iters       --train-iters
    resumed_from      the checkpoint iteration this segment resumed from, or null
    losses            [[iteration, training loss], ...] of every iteration (null where non-finite)
    valid             [[iteration, validation loss], ...]
    first_loss, last_loss   the first and last training losses
    median_step_s, mean_step_s   this segment's step time (after warm-up on the GPU route)
    train_time_s      this segment's training wall time, or null
    tokens_per_step, tokens_per_s
    parameters        model parameters (all ranks together), or null where not counted
    peak_mem_gib      peak device memory of the reporting rank (null on CPU)
    device            "cpu" or the GPU's name
    world_size        processes
    layout            {tp, pp, vpp, dp, sequence_parallel, distributed_optimizer}
    model             {num_layers, hidden_size, ffn_hidden_size, num_attention_heads, seq_length,
                       micro_batch_size, global_batch_size}
    segments          [{first_iteration, last_iteration, device, median_step_s}, ...] one per run segment
    checkpoint        the newest checkpoint folder this segment wrote, or null
    plot              the loss plot (PNG), or null
    oscireset_events  OsciReset's reset events (per layer and update)
    outcontrol        OutControl's per-layer selection statistics
    comm              {"collectives": per-iteration bytes by op and group (--nvfp4-count-collectives),
                       "plugin_gathers": the plugin's FP4 sequence-parallel gathers}, each where measured
"""
from __future__ import annotations

import json
import os

SCHEMA = 1
FIELDS = ("schema", "route", "recipe", "finished", "stopped_by", "error", "iterations", "train_iters",
          "resumed_from", "losses", "valid", "first_loss", "last_loss", "median_step_s", "mean_step_s",
          "train_time_s", "tokens_per_step", "tokens_per_s", "parameters", "peak_mem_gib", "device", "world_size",
          "layout", "model", "segments", "checkpoint", "plot", "oscireset_events", "outcontrol", "comm")
LAYOUT = ("tp", "pp", "vpp", "dp", "sequence_parallel", "distributed_optimizer")
MODEL = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
         "global_batch_size")


class SummaryError(ValueError):
    """A summary that does not follow the schema."""


def _pairs(name: str, points) -> list:
    out = []
    for point in points:
        if not (isinstance(point, (list, tuple)) and len(point) == 2 and isinstance(point[0], int)):
            raise SummaryError(f"summary field {name!r}: expected [iteration, value] pairs, got {point!r}")
        out.append([int(point[0]), None if point[1] is None else float(point[1])])
    return out


def check(summary: dict) -> dict:
    """`summary` if it follows the schema, else a SummaryError naming the field."""
    keys = set(summary)
    missing, unknown = [f for f in FIELDS if f not in keys], sorted(keys - set(FIELDS))
    if missing or unknown:
        raise SummaryError(f"summary fields: missing {missing}, unknown {unknown} (schema {SCHEMA}, "
                           "megatron_fp4/summary.py)")
    if summary["schema"] != SCHEMA:
        raise SummaryError(f"summary schema {summary['schema']!r}; this version reads schema {SCHEMA}")
    if summary["route"] not in ("cpu", "gpu"):
        raise SummaryError(f"summary field 'route': {summary['route']!r} (cpu or gpu)")
    for name in ("losses", "valid"):
        _pairs(name, summary[name])
    for name, fields in (("layout", LAYOUT), ("model", MODEL)):
        if not isinstance(summary[name], dict) or set(summary[name]) != set(fields):
            raise SummaryError(f"summary field {name!r}: expected the keys {list(fields)}, got {summary[name]!r}")
    return summary


def make(**fields) -> dict:
    """A summary from exactly the schema's fields (schema set here); losses and validation points as
    [iteration, value] pairs; first/last loss derived from the losses when not given."""
    fields = dict(fields, schema=SCHEMA)
    fields["losses"] = _pairs("losses", fields.get("losses", []))
    fields["valid"] = _pairs("valid", fields.get("valid", []))
    finite = [v for _, v in fields["losses"] if v is not None]
    fields.setdefault("first_loss", finite[0] if finite else None)
    fields.setdefault("last_loss", finite[-1] if finite else None)
    return check({name: fields[name] for name in FIELDS if name in fields} | {
        k: v for k, v in fields.items() if k not in FIELDS})


def upgrade(old: dict) -> dict:
    """A summary written before this schema (no "schema" field: the CPU route wrote losses as a plain list
    from iteration 1, the GPU route as pairs; some fields absent) in the schema's form; missing fields
    are null (empty for lists and tables). A summary with a schema field is only checked."""
    if "schema" in old:
        return check(old)
    losses = list(old.get("losses") or [])
    if losses and not isinstance(losses[0], (list, tuple)):
        losses = [[i + 1, v] for i, v in enumerate(losses)]
    device = old.get("device")
    layout = old.get("layout") or {}
    fields = {name: old.get(name) for name in FIELDS if name not in ("schema", "first_loss", "last_loss")}
    fields.update(
        route="cpu" if device == "cpu" else "gpu", losses=losses, valid=old.get("valid") or [],
        finished=bool(old.get("finished")), segments=old.get("segments") or [],
        oscireset_events=old.get("oscireset_events") or [], outcontrol=old.get("outcontrol") or {},
        layout={k: layout.get(k) for k in LAYOUT}, model={k: old.get(k) for k in MODEL},
        comm={k: old[k] for k in ("collectives", "plugin_gathers") if k in old})
    return make(**fields)


def load(path: str) -> dict:
    """A summary.json written by either route, checked against the schema (one written before the schema
    is read through `upgrade`)."""
    with open(path) as fh:
        try:
            summary = json.load(fh)
        except ValueError as err:
            raise SummaryError(f"{path}: not valid JSON ({err})") from None
    try:
        return upgrade(summary)
    except SummaryError as err:
        raise SummaryError(f"{os.path.abspath(path)}: {err}") from None
