"""The training-quality benchmark's bookkeeping (benchmarks/quality.py): gaps, statuses, resume, the
campaign preset's sizes and flags, and CPU smoke runs of the whole pipeline (real text files, a BPE
tokenizer, the real launcher; 2 recipes x 3 seeds with intervals under -m slow)."""
import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks import quality

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rows_of(table):
    """The per-run table's rows (the first table of the report), by run label."""
    first = table.split("\n\n")[0]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in first.splitlines() if line.startswith("| ") and "---" not in line}


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
    rows = rows_of(table)
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


def real_text(tmp_path, n=12):
    """A directory of real text files: n small sources of the Python standard library (2-6 KB each)."""
    import shutil
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    src = tmp_path / "src"
    src.mkdir()
    size = lambda f: os.path.getsize(os.path.join(stdlib, f))   # noqa: E731
    names = sorted(f for f in os.listdir(stdlib) if f.endswith(".py") and 2000 <= size(f) <= 6000)[:n]
    assert len(names) == n
    for name in names:
        shutil.copy(os.path.join(stdlib, name), src / name)
    return src


def smoke_command(src, out, seeds):
    return [sys.executable, "-m", "benchmarks.quality", "--out", str(out),
            "--cpu", "--corpus-src", str(src), "--tokenizer-vocab", "300", "--full-validation", "--data-seed", "1234",
            "--seeds", str(seeds), "--recipes", "bf16,quartet2", "--steps", "3", "--layers", "2",
            "--hidden", "128", "--ffn", "256", "--heads", "2", "--seq", "64", "--micro-batch", "16",
            "--global-batch", "16",
            "--eval-interval", "3", "--eval-iters", "1", "--save-interval", "3", "--timeout", "300",
            "--parallel", str(min(3, 2 * seeds))]


def test_cpu_smoke_runs_resume_and_report(tmp_path, capsys):
    """The pipeline end to end on CPU at tiny size, one seed: corpus of real text files, BPE tokenizer
    trained on its training split, two recipes through the real launcher with the fixed data seed and
    full validation, the report; a second command resumes (nothing left to do)."""
    src, out = real_text(tmp_path), tmp_path / "q"
    cmd = smoke_command(src, out, seeds=1)
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "bf16: exit 0, complete" in first.stdout and "quartet2: exit 0, complete" in first.stdout
    assert "trained a byte-level BPE tokenizer (300 tokens)" in first.stdout
    manifest = json.loads((out / "corpus" / "corpus.json").read_text())
    assert manifest["built"]["vocab_size"] == 300 and manifest["tokenizer_vocab"] == 300
    table = (out / "table.md").read_text()
    assert "| quartet2 | complete |" in table and "| quartet2 | 1 |" in table      # per run; over seeds
    runs = json.loads((out / "runs.json").read_text())
    assert {n: (r["recipe"], r["init_seed"], r["data_seed"]) for n, r in runs.items()} == \
        {"bf16": ("bf16", 1234, 1234), "quartet2": ("quartet2", 1234, 1234)}
    log = (out / "quartet2" / "log.txt").read_text()
    assert "--nvfp4-data-seed 1234" in log.splitlines()[0] and "--vocab-size 300" in log.splitlines()[0]
    quality.main(cmd[3:])                         # the same command again (in-process): nothing to do
    second = capsys.readouterr().out
    assert "bf16: complete, skipped" in second and "quartet2: complete, skipped" in second
    assert "trained a byte-level BPE" not in second and "built corpus" not in second   # corpus, tokenizer reused


@pytest.mark.slow
def test_cpu_campaign_smoke_three_seeds_with_intervals(tmp_path):
    """2 recipes x 3 seeds on CPU: the report's paired gaps with 95% intervals, the run list, the band plot."""
    src, out = real_text(tmp_path), tmp_path / "q"
    proc = subprocess.run(smoke_command(src, out, seeds=3), cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = ["bf16", "quartet2", "bf16-seed2", "quartet2-seed2", "bf16-seed3", "quartet2-seed3"]
    summaries = {n: quality.load_summary(str(out), n) for n in names}
    assert all(quality.status_of(summaries[n], 3) == "complete" for n in names)
    final = lambda recipe, k: summaries[quality.run_name(recipe, k)]["valid"][-1][1]   # noqa: E731
    gaps = [final("quartet2", k) - final("bf16", k) for k in (1, 2, 3)]
    from _stats import mean_ci
    ci = mean_ci(gaps)
    table = (out / "table.md").read_text()
    assert f"| quartet2 | 1,2,3 | {gaps[0]:+.4f}, {gaps[1]:+.4f}, {gaps[2]:+.4f} | " \
           f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}] |" in table
    runs = json.loads((out / "runs.json").read_text())
    assert sorted(runs) == sorted(names) and {r["data_seed"] for r in runs.values()} == {1234}
    assert sorted({r["init_seed"] for r in runs.values()}) == [1234, 1235, 1236]
    assert ("Published order quartet2 < tetrajet2 < nvidia: not testable: no final validation of nvidia, tetrajet2 "
            "yet") in table
    assert os.path.getsize(out / "gap.png") > 1000


def test_campaign_preset_sizes_budget_and_flags(tmp_path):
    a = quality.parse_args(["--preset", "campaign", "--out", str(tmp_path)])
    params = quality.non_embedding_params(a.layers, a.hidden, a.ffn)
    tokens = a.steps * a.global_batch * a.seq
    assert params == 6 * (4 * 384 ** 2 + 3 * 384 * 1024) >= 10_000_000 and a.hidden // a.heads == 128
    assert tokens / params >= 20 and (a.steps - 1) * a.global_batch * a.seq / params < 20   # the fewest steps
    assert a.full_validation and a.seeds == 3 and a.tokenizer_vocab == 16384 and a.corpus == "campaign"
    plan = quality.run_plan(a)
    assert len(plan) == 18 and [n for n, _, _ in plan[:6]] == list(quality.CAMPAIGN_RECIPES)   # seed 1 first
    assert plan[6][0] == "bf16-seed2" and plan[-1] == ("quartet2-plus-seed3", "quartet2-plus", 2)
    f1 = quality.run_flags(a, "bf16", "bf16", a.seed, str(tmp_path / "corpus"), vocab=16384)
    f2 = quality.run_flags(a, "quartet2-seed2", "quartet2", a.seed + 1, str(tmp_path / "corpus"), vocab=16384)
    value = lambda flags, f: flags[flags.index(f) + 1]   # noqa: E731
    assert value(f1, "--nvfp4-data-seed") == value(f2, "--nvfp4-data-seed") == "1234"   # one data order
    assert (value(f1, "--seed"), value(f2, "--seed")) == ("1234", "1235")            # other initialisation
    assert "--full-validation" in f1 and value(f1, "--vocab-size") == "16384"
    assert value(f2, "--data-cache-path") == os.path.join(str(tmp_path), "quartet2-seed2", "data_cache")
    # the budget: each token at most twice, at least 2M held-out tokens, else a clear refusal
    info = {"vocab_size": 16384, "counts": {"train": tokens // 2, "valid": 2_000_000, "train_files": 9000,
                                            "valid_files": 200}}
    quality.check_budget(a, info)
    lines = quality.describe_plan(a, info, plan)
    assert "10.62M non-embedding parameters" in lines[0] and "20.0 tokens per parameter" in lines[0]
    assert "= 2.00 epochs" in lines[1] and "all of it at every evaluation" in lines[1] and "18 runs" in lines[2]
    with pytest.raises(SystemExit, match="--max-epochs 2.0: .* add corpus roots"):
        quality.check_budget(a, dict(info, counts=dict(info["counts"], train=tokens // 2 - 1)))
    with pytest.raises(SystemExit, match="--min-valid-tokens 2000000"):
        quality.check_budget(a, dict(info, counts=dict(info["counts"], valid=1_999_999)))
    # the default preset keeps its committed results' design: --seed drives the data order too
    d = quality.parse_args([])
    assert d.data_seed is None and "--nvfp4-data-seed" not in quality.run_flags(d, "bf16", "bf16", 1234, "c")
    # flags given explicitly override the preset
    b = quality.parse_args(["--preset", "campaign", "--seeds", "5", "--steps", "10", "--recipes", "bf16,nvidia"])
    assert (b.seeds, b.steps, b.recipes, b.layers) == (5, 10, ["bf16", "nvidia"], 6)
    with pytest.raises(SystemExit):
        quality.parse_args(["--preset", "campaign", "--recipes", "nvidia,quartet2"])       # no BF16 to pair with


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
    rows = rows_of(table)
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
                              cpu=False, save_interval=100, data_seed=1234, full_validation=False)
    flags = quality.run_flags(a, "tetrajet2-full", "tetrajet2-full", 1234, str(tmp_path / "corpus"))
    value = lambda f: flags[flags.index(f) + 1]
    run_dir = os.path.join(str(tmp_path), "tetrajet2-full")
    assert value("--load") == run_dir and value("--save") == run_dir and value("--save-interval") == "100"
    assert value("--nvfp4-summary") == os.path.join(run_dir, "summary.json")


def test_campaign_plan_builds_the_corpus_and_refuses_a_corpus_too_small(tmp_path, capsys):
    """--plan: the campaign's corpus (BPE, deduplicated, several roots), its sizes and the run list, no
    training; a corpus that the budget would see more than twice is refused with the knobs to turn."""
    src, out = real_text(tmp_path), str(tmp_path / "c")
    other = tmp_path / "more"
    other.mkdir()
    (other / "notes.md").write_text("# Notes\n\nPlain documentation text, several lines of it.\n" * 40)
    base = ["--preset", "campaign", "--out", out, "--corpus-src", str(src), str(other), "--tokenizer-vocab", "300",
            "--plan"]
    with pytest.raises(SystemExit, match="--max-epochs 2.0: 212.3M training tokens are .* add corpus roots"):
        quality.main(base)
    quality.main(base + ["--max-epochs", "0", "--min-valid-tokens", "0"])
    printed = capsys.readouterr().out
    assert "10.62M non-embedding parameters" in printed and "vocabulary 300" in printed
    assert "quartet2-plus-seed3: recipe quartet2-plus, init seed 1236, data seed 1234: missing" in printed
    manifest = json.load(open(os.path.join(out, "corpus", "corpus.json")))
    assert manifest["dedupe"] and manifest["counts"]["train_files"] + manifest["counts"]["valid_files"] == 13
    assert not os.path.exists(os.path.join(out, "bf16"))                     # nothing trained


def test_late_bf16_switch_runs_are_the_plain_recipe_plus_the_switch(tmp_path):
    """quartet2-bf16late(-seed2): quartet2 with --nvfp4-bf16-from 0.9, the same initialisation seed as the
    quartet2 run of its seed (so the pair differs only by the switch), and its gap paired with
    quartet2 in the statistics; the launcher's parser takes the flags."""
    import types
    a = types.SimpleNamespace(out=str(tmp_path), steps=820, layers=4, hidden=256, ffn=512, heads=4, seq=256,
                              micro_batch=256, global_batch=256, lr=2e-3, eval_interval=100, eval_iters=4,
                              cpu=False, save_interval=100, data_seed=None, full_validation=False)
    plan = dict((n, (r, k)) for n, r, k in quality.ALL_RUNS)
    assert plan["quartet2-bf16late"] == plan["quartet2"] == ("quartet2", 0)
    assert plan["quartet2-bf16late-seed2"] == plan["quartet2-seed2"] == ("quartet2", 1)
    late = quality.run_flags(a, "quartet2-bf16late-seed2", "quartet2", 1235, str(tmp_path / "corpus"))
    plain = quality.run_flags(a, "quartet2-seed2", "quartet2", 1235, str(tmp_path / "corpus"))
    value = lambda flags, f: flags[flags.index(f) + 1]
    assert value(late, "--nvfp4-bf16-from") == "0.9" and "--nvfp4-bf16-from" not in plain
    assert value(late, "--seed") == value(plain, "--seed") == "1235"
    assert value(late, "--nvfp4-recipe") == "quartet2"
    assert quality.baseline_of("quartet2-bf16late-seed2") == "bf16-seed2"
    # the paired difference against quartet2, seed by seed
    mk = lambda v1, v2: {"valid": [[820, v1]], "losses": [[820, v1]], "iterations": 820}
    stats = quality.statistics({"bf16": mk(1.0, 0), "bf16-seed2": mk(1.1, 0), "quartet2": mk(1.05, 0),
                                "quartet2-seed2": mk(1.16, 0), "quartet2-bf16late": mk(1.02, 0),
                                "quartet2-bf16late-seed2": mk(1.12, 0)}, 820)
    d = stats["diffs"][("quartet2-bf16late", "quartet2")]
    assert d["per_seed"] == {1: pytest.approx(-0.03), 2: pytest.approx(-0.04)}
    from megatron_fp4.patches.megatron_args import add_plugin_args
    import argparse
    p = argparse.ArgumentParser()
    add_plugin_args(p)
    assert p.parse_known_args(["--nvfp4-bf16-from", "0.9"])[0].nvfp4_bf16_from is not None
