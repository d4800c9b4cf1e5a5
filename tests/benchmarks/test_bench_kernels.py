"""The kernel benchmark's own code paths (benchmarks/bench_kernels.py), run on CPU under the Triton
interpreter at tiny shapes (BENCH_DRYRUN=1) before device time is spent on them: a section that
fails is only logged on the device, so here every section checked must finish without an error."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROGRAM = """
import json
from benchmarks import bench_kernels as B
B.exactness(128, 256)
B.host_overhead(128, [("tiny", 256, 256)], "tiny", host_tokens=128)
print("RESULTS=" + json.dumps({k: B.RESULTS[k] for k in ("exact", "errors", "overhead")}))
"""


@pytest.mark.timeout(900)
def test_exactness_and_host_overhead_sections_run_and_kernels_match_their_twins():
    env = dict(os.environ, BENCH_DRYRUN="1", TRITON_INTERPRET="1", MEGATRON_FP4_KERNELS="interpret")
    proc = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, env=env,
                          timeout=850, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS=")][-1]
    results = json.loads(line[len("RESULTS="):])
    assert results["errors"] == []
    exact = {row["check"].split(" [")[0].split(" (")[0]: row for row in results["exact"]}
    # the deterministic quantizers and MS-EDEN given the kernel's own rotation: bit-exact
    for name in ("RTN 1x16", "RTN 1x16 + 4/6", "RHT+MS-EDEN dense: given kernel z",
                 "RHT+MS-EDEN transposed: given kernel z", "re-quantize from packed: given kernel z"):
        assert (exact[name]["codes"], exact[name]["scales"], exact[name]["g_equal"]) == (0, 0, True), name
    assert [r["recipe"] for r in results["overhead"]] == ["bf16", "nvidia", "tetrajet2", "quartet2"]
    assert all(r["host_ms"] > 0 and r["gpu_ms"] > 0 for r in results["overhead"])


def test_table_goes_into_results_md_between_markers(tmp_path):
    """--from-md puts an earlier run's table into the results file between its markers, replacing
    the previous block and nothing else; a file without markers gets them appended."""
    table = tmp_path / "results.md"
    table.write_text("device: NVIDIA H100; torch x\n\n| kernel | us |\n|---|---|\n| RTN | 312.5 |\n")
    doc = tmp_path / "RESULTS.md"
    doc.write_text("# Results\n\nbefore\n")
    cmd = [sys.executable, "-m", "benchmarks.bench_kernels", "--from-md", str(table), "--results-md", str(doc)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    first = doc.read_text()
    assert first.startswith("# Results\n\nbefore\n")
    assert "<!-- bench-kernels:begin -->\ndevice: NVIDIA H100" in first and "| RTN | 312.5 |" in first
    table.write_text("device: NVIDIA H200; torch y\n\n| kernel | us |\n|---|---|\n| RTN | 214.2 |\n")
    doc.write_text(first + "\nafter\n")
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=300)
    second = doc.read_text()
    assert "| RTN | 214.2 |" in second and "312.5" not in second and second.count("bench-kernels:begin") == 1
    assert second.startswith("# Results\n\nbefore\n") and second.endswith("\nafter\n")
    table.write_text("not a table\n")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "first line must name the device" in proc.stderr
