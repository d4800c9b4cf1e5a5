"""--nvfp4-stats-interval on the CPU route: statistics lines on exactly the statistics iterations for
every plugin linear and GEMM operand, the log summary, and the first non-finite operand named in the
NaN stop message."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

TINY = ["--nvfp4-cpu", "--nvfp4-recipe", "quartet2", "--mock-data", "--num-layers", "2", "--hidden-size", "128",
        "--ffn-hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--log-interval", "1", "--eval-iters", "0"]
LINEARS = [f"decoder.layers.{i}.{m}" for i in range(2) for m in
           ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")]
OPERANDS = ["fprop X", "fprop W", "dgrad E", "dgrad W^T", "wgrad E^T", "wgrad X^T"]


def _run(tmp_path, *extra):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "megatron_fp4.pretrain_gpt", *TINY, "--save", str(tmp_path / "run"),
                           *extra], capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)


def test_statistics_every_second_iteration(tmp_path):
    proc = _run(tmp_path, "--train-iters", "4", "--nvfp4-stats-interval", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "run" / "nvfp4_stats.jsonl")]
    assert sorted({r["iteration"] for r in records}) == [2, 4]
    for it in (2, 4):
        got = sorted((r["layer"], r["operand"]) for r in records if r["iteration"] == it)
        assert got == sorted((l, o) for l in LINEARS for o in OPERANDS)
    for r in records:
        assert 0 < r["amax"] < 1e3 and 0 < r["rel_error"] < 0.5
        assert r["flushed_fraction"] == 0.0 and 0.0 <= r["saturated_fraction"] <= 1.0
        eden = r["operand"] not in ("fprop X", "fprop W")          # Quartet II: MS-EDEN in backward only
        assert (r["eden_correction_min"] is not None) == eden and r["clamped_fraction"] == (0.0 if eden else None)
    lines = proc.stdout.splitlines()
    summaries = [i for i, line in enumerate(lines) if line.startswith("nvfp4 stats: max rel err ")]
    assert len(summaries) == 2
    for i, it in zip(summaries, (2, 4)):        # right after that iteration's progress line
        assert lines[i - 1].startswith(f" iteration      {it}/")
    assert "non-finite" not in proc.stdout


@pytest.mark.slow
def test_first_nonfinite_operand_named_in_the_stop_message(tmp_path):
    # a learning rate of 1e30 makes the second step's gradients overflow
    proc = _run(tmp_path, "--train-iters", "3", "--nvfp4-stats-interval", "1", "--lr", "1e30",
                "--lr-warmup-iters", "0")
    assert proc.returncode == 1
    where = "decoder.layers.1.mlp.linear_fc2 dgrad E"
    assert f"nvfp4 stats: first non-finite operand at iteration 2: {where} (amax nan)" in proc.stdout
    assert (f"megatron_fp4: error: iteration 2 of 3: non-finite grad norm nan (first non-finite quantized "
            f"operand: {where} (iteration 2, amax nan))") in proc.stderr


def test_bad_interval_is_one_line(tmp_path):
    proc = _run(tmp_path, "--train-iters", "1", "--nvfp4-stats-interval", "0")
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("megatron_fp4: error:")]
    assert len(err) == 1 and "--nvfp4-stats-interval" in err[0] and "integer >= 1" in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
