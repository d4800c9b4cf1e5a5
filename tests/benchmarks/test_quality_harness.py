"""The training-quality benchmark's bookkeeping (benchmarks/quality.py): gaps, statuses, resume, and
a CPU smoke run of two recipes through the real launcher."""
import json
import math
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
import quality  # noqa: E402


def write(out, name, losses, valid, device=None):
    os.makedirs(os.path.join(out, name), exist_ok=True)
    with open(os.path.join(out, name, "summary.json"), "w") as fh:
        json.dump({"losses": losses, "valid": valid, **({"device": device} if device else {})}, fh)


def test_table_gaps_and_statuses(tmp_path):
    out = str(tmp_path)
    write(out, "bf16", [[1, 5.0], [10, 3.0]], [[5, 3.50], [10, 3.00]])
    write(out, "bf16-seed2", [[1, 5.0], [10, 3.0]], [[5, 3.52], [10, 3.01]])
    write(out, "nvidia", [[1, 5.0], [10, 3.1]], [[5, 3.60], [10, 3.10]])
    write(out, "quartet2", [[1, 5.0], [10, 3.05]], [[5, 3.55], [10, 3.05]], device="NVIDIA H200")
    write(out, "tetrajet2", [[1, 5.0], [10, float("nan")]], [[10, float("nan")]])
    write(out, "quartet2-no46", [[1, 5.0], [10, 6.0]], [[10, 6.0]])
    write(out, "tetrajet2-full", [[1, 5.0], [7, 4.0]], [[5, 3.58]])   # cut short after iteration 5's eval
    table = quality.report(out, steps=10)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    # columns: status, iterations, last validation at, loss, BF16 there, gap, gap %, gap / NVIDIA gap
    assert rows["quartet2"][0] == "complete" and rows["quartet2"][5] == "+0.0500"
    assert rows["quartet2"][7] == "0.50 (10)"                     # half of NVIDIA's 0.10 gap
    assert rows["quartet2"][8] == "H200" and rows["nvidia"][8] == "-"   # the card each run used
    assert rows["nvidia"][7] == "1.00 (10)"
    assert rows["tetrajet2"][0] == "NaN/Inf"                      # reported, never dropped
    assert rows["quartet2-no46"][0] == "diverged"
    # a run cut short is compared with BF16 at the iteration where it stopped, not with BF16's end
    assert rows["tetrajet2-full"][:3] == ["cut short", "7", "5"]
    assert rows["tetrajet2-full"][4] == "3.5000" and rows["tetrajet2-full"][5] == "+0.0800"
    assert rows["tetrajet2-full"][7] == "0.80 (5)"                # NVIDIA's gap at 5 is 0.10
    assert rows["quartet2-plus"][0] == "missing"
    assert "seed-to-seed spread" in table and "0.0100 at iteration 10" in table and "max 0.0200" in table
    assert os.path.exists(os.path.join(out, "table.md")) and os.path.getsize(os.path.join(out, "gap.png")) > 1000


def test_non_embedding_parameter_count():
    # 4 attention matrices of hidden^2 plus 3 SwiGLU matrices of hidden x ffn per layer
    assert quality.non_embedding_params(4, 256, 768) == 4 * (4 * 256 ** 2 + 3 * 256 * 768)


def test_cpu_smoke_runs_resume_and_report(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(24):
        (src / f"m{i}.py").write_text("def f(x):\n    return x + %d\n" % i * 30)
    out = tmp_path / "q"
    cmd = [sys.executable, os.path.join(os.path.dirname(quality.__file__), "quality.py"), "--out", str(out),
           "--cpu", "--corpus-src", str(src), "--only", "bf16", "quartet2", "--steps", "4", "--layers", "2",
           "--hidden", "128", "--ffn", "256", "--heads", "2", "--seq", "64", "--micro-batch", "2",
           "--eval-interval", "2", "--eval-iters", "1", "--timeout", "240", "--parallel", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "bf16: exit 0, complete" in first.stdout and "quartet2: exit 0, complete" in first.stdout
    table = (out / "table.md").read_text()
    assert "| quartet2 | complete |" in table
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)   # resumes: nothing to do
    assert "bf16: complete, skipped" in second.stdout and "quartet2: complete, skipped" in second.stdout


def test_import_summaries_resumes_only_what_is_missing_or_cut_short(tmp_path):
    src, out = tmp_path / "earlier", str(tmp_path / "q")
    src.mkdir()
    (src / "bf16.json").write_text(json.dumps({"losses": [[1, 5.0], [10, 3.0]], "valid": [[10, 3.0]]}))
    (src / "nvidia.json").write_text(json.dumps({"losses": [[1, 5.0], [6, 3.5]], "valid": [[5, 3.6]]}))
    quality.import_summaries(str(src), out)
    assert quality.status_of(quality.load_summary(out, "bf16"), 10) == "complete"      # would be skipped
    assert quality.status_of(quality.load_summary(out, "nvidia"), 10) == "cut short"   # would be rerun
    assert quality.load_summary(out, "quartet2") is None
    # a summary already in --out is never overwritten by an import
    (src / "bf16.json").write_text(json.dumps({"losses": [[1, 9.0]], "valid": []}))
    quality.import_summaries(str(src), out)
    assert quality.load_summary(out, "bf16")["losses"][0] == [1, 5.0]
    with pytest.raises(SystemExit, match="not a directory"):
        quality.import_summaries(str(tmp_path / "nope"), out)
    # --report-only: the table from what is there, nothing trained, no corpus built
    quality.main(["--out", out, "--steps", "10", "--report-only"])
    table = open(os.path.join(out, "table.md")).read()
    assert "| nvidia | cut short | 6 | 5 |" in table and "| quartet2 | missing |" in table
    assert not os.path.exists(os.path.join(out, "corpus"))


def test_second_seed_runs_pair_with_the_second_bf16_seed(tmp_path):
    out = str(tmp_path)
    write(out, "bf16", [[1, 5.0], [10, 3.0]], [[10, 3.00]])
    write(out, "bf16-seed2", [[1, 5.0], [10, 3.1]], [[10, 3.10]])
    write(out, "nvidia", [[1, 5.0], [10, 3.1]], [[10, 3.10]])
    write(out, "nvidia-seed2", [[1, 5.0], [10, 3.3]], [[10, 3.30]])
    write(out, "quartet2-seed2", [[1, 5.0], [10, 3.2]], [[10, 3.20]])
    table = quality.report(out, steps=10)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    # the plotted curves pair the same way
    series = quality.gap_series({n: quality.load_summary(out, n) for n in
                                 ("bf16", "bf16-seed2", "nvidia", "nvidia-seed2", "quartet2-seed2")})
    assert series["quartet2-seed2"] == [(10, pytest.approx(0.10))] and series["nvidia"] == [(10, pytest.approx(0.10))]
    assert series["bf16-seed2"] == [(10, pytest.approx(0.10))] and "bf16" not in series
    # seed-2 runs: gap against bf16-seed2 (3.10), ratio against nvidia-seed2's gap (0.20)
    assert rows["nvidia-seed2 (vs bf16-seed2)"][4:6] == ["3.1000", "+0.2000"]
    assert rows["quartet2-seed2 (vs bf16-seed2)"][5] == "+0.1000"
    assert rows["quartet2-seed2 (vs bf16-seed2)"][7] == "0.50 (10)"
    assert rows["nvidia"][5] == "+0.1000" and rows["bf16-seed2"][5] == "+0.1000"
    assert "tetrajet2-seed2" not in table                # second seeds appear only when they were run
    assert [n for n, _, _ in quality.SEED2_RUNS][:2] == ["nvidia-seed2", "tetrajet2-seed2"]


def test_gpu_runs_checkpoint_and_resume_from_their_own_directory(tmp_path):
    """A run longer than one device call is split across calls: each GPU run saves a checkpoint every
    --save-interval iterations into its own directory and loads from there (Megatron starts fresh
    where there is none); the summary goes beside it."""
    import types
    a = types.SimpleNamespace(out=str(tmp_path), steps=820, layers=4, hidden=256, ffn=512, heads=4, seq=256,
                              micro_batch=256, global_batch=256, lr=2e-3, eval_interval=100, eval_iters=4,
                              cpu=False, save_interval=100)
    flags = quality.run_flags(a, "tetrajet2-full", "tetrajet2-full", 1234, str(tmp_path / "corpus"))
    value = lambda f: flags[flags.index(f) + 1]
    run_dir = os.path.join(str(tmp_path), "tetrajet2-full")
    assert value("--load") == run_dir and value("--save") == run_dir and value("--save-interval") == "100"
    assert value("--mfp4-summary") == os.path.join(run_dir, "summary.json")
