"""`python -m megatron_fp4.report RUN_DIR [--out DIR]`: the pictures and the start table of one run.

Reads what a launcher run leaves in its run directory (the --save folder), on either route:

- `summary.json` (megatron_fp4/summary.py): training and validation loss -> `loss_curves.png`;
- `nvfp4_stats.jsonl`, when present (one JSON object per line: iteration, layer, operand and numeric
  statistics such as amax, flushed_fraction, saturated_fraction, rel_error): one panel per statistic,
  one line per (layer, operand) -> `nvfp4_stats.png`;
- `precision.json` (megatron/precision.py), when present: the "what runs where" table, printed.

PNG files go to RUN_DIR or --out. matplotlib is optional at install (`pip install megatron_fp4[plot]`);
without it, or with a bad RUN_DIR, the command says so in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional

from .errors import UsageError, run_reporting_user_errors

STATS_FILE = "nvfp4_stats.jsonl"
KEYS = ("iteration", "layer", "operand")
NOT_PLOTTED = KEYS + ("rank",)     # identifies a record (the writer's rank: one file per rank)
MAX_LEGEND = 12     # more series than this: no legend (the panel title says how many)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("the report draws with matplotlib, which is not installed: pip install matplotlib "
                         "(or pip install 'megatron_fp4[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def load_run_summary(run_dir: str) -> dict:
    from . import summary as schema
    if not os.path.isdir(run_dir):
        raise UsageError(f"RUN_DIR {run_dir!r} is not a directory: pass the --save folder of a run")
    path = os.path.join(run_dir, "summary.json")
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist: RUN_DIR must be a run's --save folder, after the run has "
                         "written its summary")
    try:
        return schema.load(path)
    except schema.SummaryError as err:
        raise UsageError(str(err)) from None


def load_stats(path: str) -> list:
    """The records of a statistics file; a line that is not a JSON object with iteration, layer and
    operand is an error naming the file and line."""
    records = []
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise UsageError(f"{path}:{number}: not a JSON object ({err})") from None
            if not isinstance(record, dict) or any(k not in record for k in KEYS):
                raise UsageError(f"{path}:{number}: each line needs the keys {list(KEYS)}")
            records.append(record)
    return records


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def stats_series(records: list) -> dict:
    """{statistic: {(layer, operand): ([iterations], [values])}} over the numeric fields, by iteration."""
    out = {}
    for record in sorted(records, key=lambda r: r["iteration"]):
        for name, value in record.items():
            if name in NOT_PLOTTED or (_number(value) is None and value is not None):
                continue
            xs, ys = out.setdefault(name, {}).setdefault((str(record["layer"]), str(record["operand"])), ([], []))
            xs.append(record["iteration"])
            ys.append(_number(value) if value is not None else float("nan"))
    return out


def plot_losses(summary: dict, path: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in (("train", summary["losses"]), ("validation", summary["valid"])):
        points = [(i, v) for i, v in points if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o" if name == "validation" else None, label=f"{name} loss")
    ax.set_xlabel("iteration")
    ax.set_ylabel("lm loss")
    ax.set_title(f"{summary['recipe']}: {summary['iterations']} of {summary['train_iters']} iterations")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_stats(series: dict, path: str) -> str:
    plt = _pyplot()
    names = sorted(series)
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        lines = series[name]
        many = len(lines) > MAX_LEGEND
        for (layer, operand), (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, linewidth=0.8 if many else 1.4, alpha=0.6 if many else 1.0, label=f"{layer} {operand}")
        positive = [y for _, ys in lines.values() for y in ys if y == y and y > 0]
        if positive and max(positive) / min(positive) > 1e3:
            ax.set_yscale("log")
        ax.set_title(f"{name} ({len(lines)} layer x operand series)")
        ax.set_xlabel("iteration")
        if not many:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(run_dir: str, out_dir: Optional[str] = None, echo=print) -> list:
    """Draw the run's PNG files and print its start table; returns the files written."""
    summary = load_run_summary(run_dir)
    out_dir = out_dir or run_dir
    os.makedirs(out_dir, exist_ok=True)
    written = [plot_losses(summary, os.path.join(out_dir, "loss_curves.png"))]
    stats_path = os.path.join(run_dir, STATS_FILE)
    if os.path.isfile(stats_path):
        series = stats_series(load_stats(stats_path))
        if series:
            written.append(plot_stats(series, os.path.join(out_dir, "nvfp4_stats.png")))
    precision_path = os.path.join(run_dir, "precision.json")
    if os.path.isfile(precision_path):
        from .megatron.precision import PrecisionTableError, format_precision_table, load_precision_table
        try:
            echo(format_precision_table(load_precision_table(precision_path)))
        except PrecisionTableError as err:
            raise UsageError(str(err)) from None
    else:
        echo(f"no {precision_path} (written at the start of runs since megatron_fp4 issue #19)")
    for path in written:
        echo(f"wrote {path}")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_fp4.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run's --save folder (holds summary.json)")
    parser.add_argument("--out", default=None, help="folder for the PNG files (default: RUN_DIR)")
    args = parser.parse_args(argv)
    run_reporting_user_errors(lambda: report(args.run_dir, args.out), argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
