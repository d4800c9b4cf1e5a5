"""`python -m megatron_fp4.report` (issue #19 item 5): its inputs and its one-line errors. The drawing
itself runs on a real run directory in tests/megatron/test_launcher.py (test_main_job_reduced)."""
import json
import os
import subprocess
import sys

import pytest

from megatron_fp4 import report
from megatron_fp4.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report(*argv):
    return subprocess.run([sys.executable, "-m", "megatron_fp4.report", *argv], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env=dict(os.environ, PYTHONWARNINGS="ignore"))


def test_a_missing_run_dir_or_summary_is_one_line_and_exit_status_2(tmp_path):
    for run_dir, message in ((tmp_path / "nothing", "is not a directory"), (tmp_path, "summary.json does not exist")):
        proc = _report(str(run_dir))
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("megatron_fp4: error: ") and message in lines[0], proc.stderr


def test_a_summary_outside_the_schema_is_named(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps({"schema": 1, "route": "cpu"}))
    with pytest.raises(UsageError, match="summary.json: summary fields: missing"):
        report.load_run_summary(str(tmp_path))


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib raises ImportError
    with pytest.raises(UsageError, match=r"matplotlib, which is not installed: pip install matplotlib"):
        report._pyplot()


def test_statistics_become_one_series_per_layer_and_operand(tmp_path):
    path = tmp_path / "nvfp4_stats.jsonl"
    records = [{"iteration": it, "layer": layer, "operand": op, "amax": it * 10 + i, "rel_error": None, "note": "x", "rank": 0}
               for it in (3, 1, 2) for i, (layer, op) in enumerate([("l0", "forward X"), ("l0", "dgrad E"), ("l1", "forward X")])]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    series = report.stats_series(report.load_stats(str(path)))
    assert sorted(series) == ["amax", "rel_error"]              # numeric fields only (null kept as a gap)
    assert series["amax"][("l0", "dgrad E")] == ([1, 2, 3], [11.0, 21.0, 31.0])
    assert series["amax"][("l1", "forward X")] == ([1, 2, 3], [12.0, 22.0, 32.0])
    assert all(v != v for v in series["rel_error"][("l0", "forward X")][1])
    path.write_text('{"iteration": 1, "layer": "l0"}\n')
    with pytest.raises(UsageError, match=r"nvfp4_stats.jsonl:1: each line needs the keys"):
        report.load_stats(str(path))
    path.write_text('{"iteration": 1, "layer": "l0", "operand": "X"}\nnot json\n')
    with pytest.raises(UsageError, match=r"nvfp4_stats.jsonl:2: not a JSON object"):
        report.load_stats(str(path))
