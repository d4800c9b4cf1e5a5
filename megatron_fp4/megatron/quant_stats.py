"""Where the quantization statistics go (issue #19 items 2-3; the numbers: megatron_fp4/stats.py).

`StatsReporter.finish(iteration)` runs after each iteration's log line on both routes (the CPU
driver's progress line, the GPU route's Megatron `training_log`). On a statistics iteration it
- appends one JSON object per (layer, operand) to RUN_DIR/nvfp4_stats.jsonl (global rank 0; every
  other rank writes the layers it holds to RUN_DIR/nvfp4_stats.rank<N>.jsonl, so TP shards and
  pipeline stages stay apart): iteration, layer, operand, rank and the fields of stats.FIELDS
  (non-finite numbers as null: strict JSON). The stabilizers add one object per layer: operand
  "oscireset" (reset_fraction, median_ratio of each reset since the last statistics iteration) and
  operand "outcontrol" (outliers, norm_share of its selection, once made);
- adds each number as a TensorBoard scalar `nvfp4_stats/<field>/<layer>/<operand>` to Megatron's
  writer and to W&B when Megatron configured one (GPU route; the CPU driver has neither);
- returns the summary line the caller prints after its log line, e.g.
  `nvfp4 stats: max rel err 0.113 (decoder.layers.1.mlp.linear_fc2 wgrad E^T), flushed 0.00%,
  saturated 0.41%, EDEN correction 0.962..1.041` — the layers of this rank;
- and, when an operand's source held a NaN / Inf, a second line naming the first one in execution
  order: `nvfp4 stats: first non-finite operand at iteration N: <layer> <operand> (amax nan)`,
  also kept in `first_nonfinite` for the run's NaN stop message.
"""
from __future__ import annotations

import json
import math
import os
from typing import Callable, Optional

from .. import stats

STATS_FILE = "nvfp4_stats.jsonl"


def stats_path(run_dir: str, rank: int) -> str:
    return os.path.join(run_dir, STATS_FILE if rank == 0 else f"nvfp4_stats.rank{rank}.jsonl")


def _json_number(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def summary_line(records: list) -> Optional[str]:
    """The log summary of one statistics iteration's operand records."""
    ops = [r for r in records if "rel_error" in r]
    if not ops:
        return None
    finite = [r for r in ops if r["rel_error"] is not None and math.isfinite(r["rel_error"])]
    worst = max(finite, key=lambda r: r["rel_error"]) if finite else None
    mean = lambda key: sum(r[key] for r in ops if r[key] is not None) / len(ops)
    parts = [f"max rel err {worst['rel_error']:.3f} ({worst['layer']} {worst['operand']})" if worst
             else "max rel err nan", f"flushed {100 * mean('flushed_fraction'):.2f}%",
             f"saturated {100 * mean('saturated_fraction'):.2f}%"]
    lows = [r["eden_correction_min"] for r in ops if r["eden_correction_min"] is not None]
    highs = [r["eden_correction_max"] for r in ops if r["eden_correction_max"] is not None]
    if lows:
        parts.append(f"EDEN correction {min(lows):.3f}..{max(highs):.3f}")
    return "nvfp4 stats: " + ", ".join(parts)


class StatsReporter:
    """One run's statistics output. `stabilizers()` returns (OsciReset events, OutControl selections
    per layer) as the route keeps them; `log` prints a line where the route prints its log."""

    def __init__(self, interval: int, run_dir: Optional[str], rank: int = 0,
                 stabilizers: Optional[Callable[[], tuple]] = None, log: Callable[[str], None] = print):
        stats.configure(interval)
        self.interval, self.run_dir, self.rank = interval, run_dir, rank
        self.stabilizers, self.log = stabilizers, log
        self.first_nonfinite: Optional[str] = None
        self._events_seen = 0

    def _stabilizer_records(self) -> list:
        if self.stabilizers is None:
            return []
        events, outcontrol = self.stabilizers()
        new, self._events_seen = list(events)[self._events_seen:], len(events)
        records = [{"layer": e["layer"], "operand": "oscireset", "reset_fraction": e["reset_fraction"],
                    "median_ratio": e["median_ratio"]} for e in new]
        records += [{"layer": name, "operand": "outcontrol", "outliers": sel["outliers"],
                     "norm_share": sel["norm_share"]} for name, sel in sorted(outcontrol.items())]
        return records

    def finish(self, iteration: int) -> Optional[list]:
        """After iteration `iteration`'s log line: write and log its statistics (None when it was not a
        statistics iteration)."""
        result = stats.collect(iteration)
        if result is None:
            return None
        records, first_bad = result
        records = [{"iteration": iteration, **r, "rank": self.rank} for r in records + self._stabilizer_records()]
        if self.run_dir:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(stats_path(self.run_dir, self.rank), "a") as fh:
                for r in records:
                    fh.write(json.dumps({k: _json_number(v) for k, v in r.items()}, allow_nan=False) + "\n")
        self._to_writers(records, iteration)
        line = summary_line(records)
        if line:
            self.log(line)
        if first_bad is not None:
            amax = next(r["amax"] for r in records if (r["layer"], r["operand"]) == first_bad)
            self.first_nonfinite = f"{first_bad[0]} {first_bad[1]} (iteration {iteration}, amax {amax})"
            self.log(f"nvfp4 stats: first non-finite operand at iteration {iteration}: {first_bad[0]} "
                     f"{first_bad[1]} (amax {amax})")
        return records

    @staticmethod
    def _to_writers(records: list, iteration: int) -> None:
        from .state import tensorboard_writer
        writer = tensorboard_writer()
        try:
            from megatron.training.global_vars import get_wandb_writer
            wandb = get_wandb_writer()
        except Exception:      # megatron.training not initialised (CPU driver, tests)
            wandb = None
        if writer is None and wandb is None:
            return
        scalars = {}
        for r in records:
            for key, value in r.items():
                if key in ("iteration", "layer", "operand", "rank") or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    scalars[f"nvfp4_stats/{key}/{r['layer']}/{r['operand']}"] = float(value)
        if writer is not None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, iteration)
        if wandb is not None:
            wandb.log(scalars, iteration)


def install_gpu_reporter(args) -> StatsReporter:
    """The GPU route (megatron.training.pretrain): statistics after each `training_log`, printed by the
    last rank (which prints Megatron's log line), written by every rank for its own layers."""
    from ..patches import megatron_logging
    from .optimizer_hooks import stabilizer_report
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def stabilizers():
        report = stabilizer_report()
        return report["oscireset_events"], report["outcontrol"]

    def log(line: str) -> None:
        if rank == world - 1:
            print(line, flush=True)

    reporter = StatsReporter(args.nvfp4_stats_interval, getattr(args, "save", None), rank, stabilizers, log)
    megatron_logging.install(lambda *a: None, lambda d: None, after_iteration=reporter.finish)
    return reporter
