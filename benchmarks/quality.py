"""Training-quality benchmark: the same Llama-style GPT trained under every recipe against BF16.

    python -m benchmarks.quality --preset campaign --out runs/campaign --plan       # sizes, budget; trains nothing
    python -m benchmarks.quality --preset campaign --out runs/campaign --parallel 6 --deadline 540   # GPU, one call
    python -m benchmarks.quality --out runs/quality --parallel 8    # the small default preset (GPU)
    python -m benchmarks.quality --out runs/smoke --cpu --steps 20  # CPU smoke (megatron-core driver)

Every run: same model (RMSNorm, SwiGLU, RoPE, untied embeddings, no biases), same data and data order,
same validation set, same hyperparameters (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, cosine with 10%
warm-up to lr/10). The runs of a recipe differ only in the initialisation seed (`--seed` + k - 1 for
seed k, which also keys the FP4 rounding streams): the data order is drawn from `--data-seed`, passed
to the launcher as `--nvfp4-data-seed` (Megatron's `--seed` would otherwise drive both; the default
preset keeps that, as in its committed results, unless --data-seed is given), and validation is a
fixed held-out split of whole files. Seed k of a recipe is paired with seed k of BF16.

Presets (`--preset`; any flag given explicitly overrides the preset's value):
- `default`: 4 layers, hidden 256, SwiGLU ffn 512, 4 heads, seq 256, batch 256, 820 steps: 2.62M
  non-embedding parameters, 53.7M tokens = 20.5 tokens per parameter; byte-level Python-stdlib corpus;
  runs bf16, bf16-seed2 and one seed of each FP4 recipe (`--only nvidia-seed2 ...` adds second seeds).
  `--only quartet2-bf16late quartet2-bf16late-seed2`: quartet2 with the late switch to BF16
  (`--nvfp4-bf16-from 0.9`), paired with the quartet2 run of the same seed.
- `campaign` (issue 20): 6 layers, hidden 384, 3 heads of 128, SwiGLU ffn 1024 (Quartet II's shape
  rules: head dim 128, ffn = ceil_256(8/3 d)), seq 512, batch 256 x 512 = 131,072 tokens, lr 1.5e-3:
  10.62M non-embedding parameters, 1620 steps = 212.3M tokens = 20.0 tokens per parameter; the
  campaign corpus (data/corpus.py: the stdlib and every installed package's code and documentation,
  deduplicated, byte-level BPE of 16,384 tokens trained on the training split), checked to hold at
  least half the training tokens (each token seen at most twice) and 2M validation tokens; the whole
  held-out split is evaluated at every evaluation (`--full-validation`); recipes bf16, nvidia,
  tetrajet2, tetrajet2-full, quartet2, quartet2-plus x 3 seeds = 18 runs.

A campaign in pieces: runs already complete in --out are skipped; a run cut short keeps its partial
summary (written at every log interval) and continues from its last checkpoint (every --save-interval
iterations; GPU route) on the next command with the same --out. `--deadline S` ends the command after
S seconds (runs still going are stopped and resume next time; runs not started wait), so each
10-minute device call makes progress. Every call of every run (wall time, device, iterations reached)
is appended to <out>/runs.json.
Output: <out>/table.md (per run: final validation loss, gap to its seed's BF16 run; per recipe over the
seeds: mean gap with a 95% t interval, paired differences between recipes with their intervals, and
whether the published order quartet2 < tetrajet2 < nvidia is resolved; the run list with device time)
and <out>/gap.png (gap to BF16 over training, mean over seeds with 95% bands). A run with NaN/Inf or a
diverged loss is reported as such, never dropped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

from benchmarks._runs import Job, load_summary, run_jobs
from benchmarks._stats import mean_ci, paired_ci, verdict

RUNS = [  # the default preset's runs: (run name, recipe, seed offset)
    ("bf16", "bf16", 0), ("bf16-seed2", "bf16", 1), ("nvidia", "nvidia", 0), ("tetrajet2", "tetrajet2", 0),
    ("tetrajet2-full", "tetrajet2-full", 0), ("quartet2-no46", "quartet2-no46", 0),
    ("quartet2", "quartet2", 0), ("quartet2-plus", "quartet2-plus", 0),
]
# Second-seed runs of the FP4 recipes, on request (--only): each is paired with bf16-seed2 (same
# initialisation), so the gap's own seed-to-seed variation can be read off.
SEED2_RUNS = [(f"{name}-seed2", recipe, 1) for name, recipe, offset in RUNS if offset == 0 and name != "bf16"]
# Runs of a recipe with more launcher flags, on request (--only), paired with the plain recipe's run of
# the same seed (same initialisation, data order and FP4 streams until the flags act): the late switch to
# BF16 (issue 19) over the last 10% of the iterations.
VARIANT_FLAGS = {"quartet2-bf16late": ("quartet2", ["--nvfp4-bf16-from", "0.9"])}
VARIANT_RUNS = [(run_name_, recipe, k) for variant, (recipe, _) in VARIANT_FLAGS.items()
                for run_name_, k in ((variant, 0), (f"{variant}-seed2", 1))]
ALL_RUNS = RUNS + SEED2_RUNS + VARIANT_RUNS
CAMPAIGN_RECIPES = ("bf16", "nvidia", "tetrajet2", "tetrajet2-full", "quartet2", "quartet2-plus")
# the paired recipe differences the report gives (a - b, per seed), and the published order's pairs
DIFFERENCES = (("quartet2", "nvidia"), ("quartet2", "tetrajet2"), ("quartet2-plus", "quartet2"),
               ("tetrajet2-full", "tetrajet2"), ("tetrajet2", "nvidia"), ("quartet2-bf16late", "quartet2"))
PUBLISHED_ORDER = ("quartet2", "tetrajet2", "nvidia")      # Quartet II's 30M point: +1.26% < +1.58% < +1.65%

PRESETS = {
    "default": dict(layers=4, hidden=256, ffn=512, heads=4, seq=256, micro_batch=256, global_batch=256, steps=820,
                    tokens_per_param=None, lr=2e-3, eval_interval=100, eval_iters=4, full_validation=False,
                    corpus="stdlib", tokenizer_vocab=0, valid_fraction=0.02, seeds=None, recipes=None,
                    max_epochs=None, min_valid_tokens=None, data_seed=None),
    "campaign": dict(layers=6, hidden=384, ffn=1024, heads=3, seq=512, micro_batch=128, global_batch=256, steps=None,
                     tokens_per_param=20.0, lr=1.5e-3, eval_interval=100, eval_iters=4, full_validation=True,
                     corpus="campaign", tokenizer_vocab=16384, valid_fraction=0.02, seeds=3,
                     recipes=",".join(CAMPAIGN_RECIPES),
                     max_epochs=2.0, min_valid_tokens=2_000_000, data_seed=1234),
}
# GPU-time estimate of --plan: an ASSUMPTION to be re-measured (the summaries' median_step_s and
# runs.json's wall times replace it). Tokens per second of the whole GPU (an H100 shared by the
# campaign's runs side by side), per million non-embedding parameters: the default preset's runs
# (2.62M, 8 sharing an H100, 2026-11-23: bf16 243k, quartet2 183k, tetrajet2 106k tokens/s each, about
# 1.3M tokens/s together) scaled as if the step time grew with the parameter count.
ASSUMED_GPU_TOKENS_PER_S_AT_1M = 1.3e6 * 2.62


def non_embedding_params(layers: int, hidden: int, ffn: int) -> int:
    """Transformer-block linear parameters (SwiGLU: 3 matrices of hidden x ffn; attention: 4 of hidden^2)."""
    return layers * (4 * hidden * hidden + 3 * hidden * ffn)


# --------------------------------------------------------------------------------------------------
# Run names: <recipe> for seed 1, <recipe>-seed<k> for seed k
# --------------------------------------------------------------------------------------------------

def run_name(recipe: str, seed: int) -> str:
    return recipe if seed == 1 else f"{recipe}-seed{seed}"


def split_name(name: str) -> tuple:
    """(recipe, seed k) of a run name ("quartet2-plus-seed3" -> ("quartet2-plus", 3))."""
    m = re.fullmatch(r"(.+)-seed(\d+)", name)
    return (m.group(1), int(m.group(2))) if m else (name, 1)


def first_seed_of(name: str) -> str:
    """The seed-1 run of a later-seed FP4 run ("quartet2-seed2" -> "quartet2"); any other name itself
    (bf16-seedK is BF16's own later seed: in the run table, the seed-to-seed spread)."""
    recipe, _ = split_name(name)
    return name if recipe == "bf16" else recipe


def baseline_of(name: str) -> str:
    """The BF16 run a run's gap is paired with: the one with its seed (BF16's later seeds against seed 1:
    the seed-to-seed spread)."""
    recipe, seed = split_name(name)
    return "bf16" if recipe == "bf16" else run_name("bf16", seed)


def nvidia_of(name: str) -> str:
    return run_name("nvidia", split_name(name)[1])


def run_plan(a) -> list:
    """(name, recipe, seed offset) of the runs the preset and flags ask for, seed by seed (a campaign
    cut short has whole seeds first): the default preset's fixed list, or recipes x seeds."""
    if not a.seeds:
        return list(ALL_RUNS)
    return [(run_name(r, k), r, k - 1) for k in range(1, a.seeds + 1) for r in a.recipes]


# --------------------------------------------------------------------------------------------------
# Launcher flags
# --------------------------------------------------------------------------------------------------

def run_flags(a, name: str, recipe: str, seed: int, corpus: str, vocab: int = 256) -> list:
    out = os.path.join(a.out, name)
    warmup = max(1, a.steps // 10)
    common = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--ffn-hidden-size", a.ffn,
              "--num-attention-heads", a.heads, "--seq-length", a.seq, "--micro-batch-size", a.micro_batch,
              "--train-iters", a.steps, "--lr", a.lr, "--min-lr", a.lr / 10, "--lr-warmup-iters", warmup,
              "--weight-decay", 0.1, "--clip-grad", 1.0, "--seed", seed, "--swiglu",
              "--eval-interval", a.eval_interval, "--eval-iters", a.eval_iters, "--log-interval", 10,
              "--vocab-size", vocab, "--nvfp4-recipe", recipe, "--save", out]
    variant = VARIANT_FLAGS.get(split_name(name)[0])
    if variant is not None:
        common += variant[1]
    if a.data_seed is not None:   # the data order: the same for every seed and recipe
        common += ["--nvfp4-data-seed", a.data_seed]
    if a.full_validation:   # the whole held-out split at every evaluation (Megatron's flag)
        common.append("--full-validation")
    if a.cpu:   # the CPU driver's own flags (AdamW 0.9/0.95, RMSNorm and cosine are its defaults)
        extra = ["--nvfp4-cpu", "--data-path", os.path.join(corpus, "train"),
                 "--valid-data-path", os.path.join(corpus, "valid"), "--nvfp4-time-budget", 1e9,
                 "--load", out, "--save-interval", a.save_interval]     # resumes as the GPU route does
        if a.global_batch != a.micro_batch:
            extra += ["--global-batch-size", a.global_batch]
    else:       # Megatron's flags
        extra = ["--max-position-embeddings", a.seq, "--position-embedding-type", "rope",
                 "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                 "--global-batch-size", a.global_batch, "--lr-decay-style", "cosine",
                 "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--bf16", "--transformer-impl", "local",
                 "--attention-dropout", 0.0, "--hidden-dropout", 0.0,   # no dropout, as in the sweeps
                 "--tokenizer-type", "NullTokenizer", "--null-tokenizer-eod-id", 0,
                 "--train-data-path", os.path.join(corpus, "train"), "--valid-data-path", os.path.join(corpus, "valid"),
                 "--test-data-path", os.path.join(corpus, "valid"),
                 # each run's own index cache: runs side by side never write the same files
                 "--data-cache-path", os.path.join(out, "data_cache"),
                 "--nvfp4-summary", os.path.join(out, "summary.json"),
                 # a run cut short resumes from its last checkpoint on the next command (Megatron's
                 # --load; no checkpoint there = a fresh start), so long runs split across device calls
                 "--load", out, "--save-interval", a.save_interval]
    return [str(x) for x in common + extra]


# --------------------------------------------------------------------------------------------------
# Statuses and the report
# --------------------------------------------------------------------------------------------------

def status_of(summary, steps: int) -> str:
    if summary is None:
        return "missing"
    values = [l for _, l in summary["losses"]] + [l for _, l in summary.get("valid", [])]
    if any(not math.isfinite(v) for v in values if v is not None):
        return "NaN/Inf"
    if summary["losses"] and summary["losses"][-1][1] > summary["losses"][0][1]:
        return "diverged"
    last_iteration = summary["losses"][-1][0] if summary["losses"] else 0
    return "complete" if last_iteration >= steps and summary.get("valid") else "cut short"


def _known_names(out: str, names) -> list:
    """The runs to report: `names`, or the default preset's runs plus every other run with a summary
    in out (later seeds, campaign runs), ordered by seed then recipe."""
    if names:
        return list(names)
    found = sorted(d for d in os.listdir(out) if os.path.isfile(os.path.join(out, d, "summary.json"))) \
        if os.path.isdir(out) else []
    base = [n for n, _, _ in RUNS]
    extra = [n for n in found if n not in base]
    order = {r: i for i, r in enumerate([n for n, _, _ in RUNS] + list(CAMPAIGN_RECIPES))}
    extra.sort(key=lambda n: (split_name(n)[1], order.get(split_name(n)[0], 99), n))
    return base + extra


def final_losses(summaries: dict, steps: int) -> tuple:
    """({recipe: {seed: final validation loss}}, {run: why it is not in the statistics}). A run counts
    once its validation at iteration `steps` is finite (diverged runs count, flagged in the run table);
    NaN/Inf, cut-short and missing runs are listed with the reason."""
    finals, excluded = {}, {}
    for name, s in summaries.items():
        recipe, seed = split_name(name)
        st = status_of(s, steps)
        points = {int(i): v for i, v in (s or {}).get("valid", [])}
        v = points.get(int(steps))
        if v is not None and math.isfinite(v) and st in ("complete", "diverged"):
            finals.setdefault(recipe, {})[seed] = v
        elif s is not None:
            excluded[name] = st
    return finals, excluded


def _fmt(x, digits=4, sign=True):
    return "-" if x is None else (f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}")


def _ci_text(ci):
    if ci["mean"] is None:
        return "-"
    if ci["half"] is None:
        return f"{ci['mean']:+.4f} (1 seed)"
    return f"{ci['mean']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]"


def statistics(summaries: dict, steps: int) -> dict:
    """Per recipe the gaps to BF16 paired by seed with their 95% t interval; the paired differences
    between recipes (DIFFERENCES); the published order's verdict."""
    finals, excluded = final_losses(summaries, steps)
    bf16 = finals.get("bf16", {})
    gaps = {}
    for recipe, losses in finals.items():
        if recipe == "bf16":
            continue
        ci = paired_ci(losses, bf16)
        base = [bf16[s] for s in ci["seeds"]]
        ci["relative"] = 100 * ci["mean"] / (sum(base) / len(base)) if base else None
        ci["per_seed"] = {s: losses[s] - bf16[s] for s in ci["seeds"]}
        gaps[recipe] = ci
    nvidia_gap = gaps.get("nvidia", {}).get("mean")
    diffs = {}
    for a, b in DIFFERENCES:
        if a in finals and b in finals:
            ci = paired_ci(finals[a], finals[b])
            ci["per_seed"] = {s: finals[a][s] - finals[b][s] for s in ci["seeds"]}
            ci["reading"] = verdict(ci, nvidia_gap)
            diffs[(a, b)] = ci
    return {"gaps": gaps, "diffs": diffs, "excluded": excluded, "nvidia_gap": nvidia_gap,
            "order": order_verdict(diffs, set(finals)), "finals": finals}


def order_verdict(diffs: dict, present=None) -> str:
    """Is quartet2 < tetrajet2 < nvidia resolved at 95% (both intervals below 0), contradicted (one
    above 0), 'no difference at this scale' (every pairwise interval holds 0 and is narrower than
    0.3x NVIDIA's gap), or not resolved?"""
    q, t, n = PUBLISHED_ORDER
    pairs = [(q, t), (t, n), (q, n)]
    if any(p not in diffs for p in pairs):
        absent = {x for p in pairs if p not in diffs for x in p} - set(present or ())
        return "not testable: no final validation of " + ", ".join(sorted(absent)) + " yet"
    readings = {p: diffs[p]["reading"] for p in pairs}
    if readings[(q, t)] == "below 0" and readings[(t, n)] == "below 0":
        return f"resolved at 95%: {q} < {t} < {n}"
    against = [f"{a} - {b} above 0" for (a, b), r in readings.items() if r == "above 0"]
    if against:
        return "contradicted at 95%: " + "; ".join(against)
    if all(r == "no difference at this scale" for r in readings.values()):
        return ("no difference at this scale (every pairwise 95% interval holds 0 and is narrower than 0.3x "
                "NVIDIA's gap)")
    return "not resolved at 95% (" + "; ".join(f"{a} - {b}: {r}" for (a, b), r in readings.items()) + ")"


def _stats_section(st: dict, steps: int) -> list:
    lines = [f"\n### Over seeds: final validation loss at iteration {steps}, paired by seed, 95% t intervals\n",
             "| recipe | seeds | gap to BF16 per seed | mean gap [95% CI] | mean gap % | / NVIDIA's gap |",
             "|---|---|---|---|---|---|"]
    nv = st["nvidia_gap"]
    for recipe, ci in st["gaps"].items():
        per = ", ".join(f"{ci['per_seed'][s]:+.4f}" for s in ci["seeds"]) or "-"
        ratio = f"{ci['mean'] / nv:.2f}" if nv and ci["mean"] is not None else "-"
        rel = f"{ci['relative']:+.2f}%" if ci.get("relative") is not None else "-"
        seeds = ",".join(map(str, ci["seeds"])) or "-"
        lines.append(f"| {recipe} | {seeds} | {per} | {_ci_text(ci)} | {rel} | {ratio} |")
    if st["diffs"]:
        lines += ["", "| difference (paired by seed) | seeds | per seed | mean [95% CI] | CI width / NVIDIA's gap "
                  "| reading |", "|---|---|---|---|---|---|"]
    for (a, b), ci in st["diffs"].items():
        per = ", ".join(f"{ci['per_seed'][s]:+.4f}" for s in ci["seeds"]) or "-"
        width = f"{(ci['hi'] - ci['lo']) / nv:.2f}" if nv and nv > 0 and ci["half"] is not None else "-"
        lines.append(f"| {a} - {b} | {','.join(map(str, ci['seeds'])) or '-'} | {per} | {_ci_text(ci)} | {width} | "
                     f"{ci['reading']} |")
    lines.append(f"\nPublished order {' < '.join(PUBLISHED_ORDER)}: {st['order']}")
    if st["excluded"]:
        lines.append("Not in the statistics (reported above, never dropped): "
                     + ", ".join(f"{n} ({why})" for n, why in sorted(st["excluded"].items())))
    return lines


def report(out: str, steps: int, names=None) -> str:
    """The result table (markdown) and the gap plot, from whatever summaries exist.

    Per run: its last validation loss against its seed's BF16 run at the same iteration (a run cut short
    is compared where it stopped, not with BF16's end), and the ratio to NVIDIA's gap (same seed) at the
    last iteration both evaluated. Over seeds: the statistics section (statistics())."""
    names = _known_names(out, names)
    summaries = {n: load_summary(out, n) for n in set(names) | {"bf16", "bf16-seed2", "nvidia", "nvidia-seed2"}}
    summaries.update({baseline_of(n): load_summary(out, baseline_of(n)) for n in names})
    summaries.update({nvidia_of(n): load_summary(out, nvidia_of(n)) for n in names})
    valid = {n: dict((int(i), v) for i, v in s["valid"]) for n, s in summaries.items() if s and s.get("valid")}
    base = valid.get("bf16", {})

    def gap_at(name, it):
        ref = valid.get(baseline_of(name), {})
        return valid[name][it] - ref[it] if it in valid.get(name, {}) and it in ref else None

    # the card each run trained on: runs of different sessions may come from different GPUs (H100 /
    # H200); a pairing across cards is still a paired difference of seed and recipe, but cuBLAS's
    # choice of kernels differs, a perturbation of the size of FP4's own (see the table's note)
    lines = ["| run | status | iterations | last validation at | validation loss | BF16 there | gap to BF16 "
             "| gap % | gap / NVIDIA gap (at iteration) | device |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        s = summaries[n]
        st = status_of(s, steps)
        card = _short_device(s)
        trained = s["losses"][-1][0] if s and s["losses"] else 0
        if n not in valid:
            lines.append(f"| {n} | {st} | {trained} | - | - | - | - | - | - | {card} |")
            continue
        it = max(valid[n])
        gap = gap_at(n, it)
        if gap is None:
            lines.append(f"| {n} | {st} | {trained} | {it} | {valid[n][it]:.4f} | - | - | - | - | {card} |")
            continue
        ref = valid[baseline_of(n)]
        frac = "-"
        nvidia = nvidia_of(n)
        common = sorted(set(valid[n]) & set(valid.get(nvidia, {})) & set(ref))
        if common and split_name(n)[0] != "bf16":
            nv = gap_at(nvidia, common[-1])
            if nv:
                frac = f"{gap_at(n, common[-1]) / nv:.2f} ({common[-1]})"
        label = n if baseline_of(n) == "bf16" else f"{n} (vs {baseline_of(n)})"
        lines.append(f"| {label} | {st} | {trained} | {it} | {valid[n][it]:.4f} | {ref[it]:.4f} | {gap:+.4f} | "
                     f"{100 * gap / ref[it]:+.2f}% | {frac} | {card} |")
    if base and "bf16-seed2" in valid:
        common = sorted(set(base) & set(valid["bf16-seed2"]))
        if common:
            spreads = [abs(valid["bf16-seed2"][i] - base[i]) for i in common]
            lines.append(f"\nBF16 seed-to-seed spread (|bf16 - bf16-seed2|): {spreads[-1]:.4f} at iteration "
                         f"{common[-1]}; mean over the {len(common)} evaluations {sum(spreads) / len(spreads):.4f}, "
                         f"max {max(spreads):.4f}")
    st = statistics({n: summaries.get(n) for n in names}, steps)
    if st["gaps"]:
        lines += _stats_section(st, steps)
    lines += _run_list(out, names, summaries)
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    _plot_gaps(out, {n: summaries.get(n) for n in names})
    return table


def _short_device(summary) -> str:
    """'H100' / 'H200' / 'cpu' from a summary's device name ('-' when unknown)."""
    name = (summary or {}).get("device") or "-"
    for card in ("H100", "H200", "B200", "A100"):
        if card in name:
            return card
    return name


# --------------------------------------------------------------------------------------------------
# The run list: every call of every run, with its wall time (<out>/runs.json)
# --------------------------------------------------------------------------------------------------

def load_run_list(out: str) -> dict:
    path = os.path.join(out, "runs.json")
    if not os.path.exists(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def record_call(out: str, name: str, entry: dict, **meta) -> None:
    """Append one call of run `name` (its wall time, exit, status, iterations, device) to runs.json."""
    runs = load_run_list(out)
    run = runs.setdefault(name, {})
    run.update(meta)
    run.setdefault("calls", []).append(entry)
    tmp = os.path.join(out, "runs.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(runs, fh, indent=1)
    os.replace(tmp, os.path.join(out, "runs.json"))


def _run_list(out: str, names, summaries) -> list:
    runs = load_run_list(out)
    if not any(n in runs for n in names):
        return []
    lines = ["\n### Run list (every call of every run: <out>/runs.json)\n",
             "| run | recipe | init seed | data seed | calls | wall s | GPU s (wall / runs sharing it) | device | "
             "iterations |", "|---|---|---|---|---|---|---|---|---|"]
    total_wall = total_gpu = 0.0
    for n in names:
        r = runs.get(n)
        if not r:
            continue
        wall = sum(c["wall_s"] for c in r["calls"])
        gpu = sum(c["wall_s"] / max(1, c.get("sharing", 1)) for c in r["calls"])
        total_wall += wall
        total_gpu += gpu
        devices = sorted({c.get("device") or "-" for c in r["calls"]})
        s = summaries.get(n)
        trained = s["losses"][-1][0] if s and s["losses"] else 0
        lines.append(f"| {n} | {r.get('recipe', '-')} | {r.get('init_seed', '-')} | {r.get('data_seed', '-')} | "
                     f"{len(r['calls'])} | {wall:.0f} | {gpu:.0f} | {', '.join(devices)} | {trained} |")
    lines.append(f"\nTotal: {total_wall:.0f} s of run wall time, {total_gpu / 3600:.2f} GPU-hours")
    return lines


# --------------------------------------------------------------------------------------------------
# The gap plot
# --------------------------------------------------------------------------------------------------

def gap_series(summaries: dict) -> dict:
    """Per run, [(iteration, validation loss - its paired BF16 run's)] (bf16-seedK against bf16: the
    seed spread; a later-seed run against its seed's BF16 run)."""
    series = {}
    for name, s in summaries.items():
        if name == "bf16" or not s or not s.get("valid"):
            continue
        base = summaries.get(baseline_of(name))
        if not base or not base.get("valid"):
            continue
        ref = {int(i): v for i, v in base["valid"]}
        pts = [(int(it), v - ref[int(it)]) for it, v in s["valid"] if int(it) in ref and math.isfinite(v)]
        if pts:
            series[name] = pts
    return series


def gap_bands(summaries: dict) -> dict:
    """Per FP4 recipe, [(iteration, mean gap, lower, upper)] over its seeds: at each iteration where every
    seed that has reached it has a paired gap; bounds are the 95% t interval (None with one seed)."""
    series = gap_series(summaries)
    by_recipe = {}
    for name, pts in series.items():
        recipe, seed = split_name(name)
        if recipe != "bf16":
            by_recipe.setdefault(recipe, {})[seed] = dict(pts)
    bands = {}
    for recipe, seeds in by_recipe.items():
        iterations = sorted(set().union(*[set(p) for p in seeds.values()]))
        rows = []
        for it in iterations:
            ci = mean_ci([p[it] for p in seeds.values() if it in p])
            rows.append((it, ci["mean"], ci["lo"], ci["hi"], ci["n"]))
        bands[recipe] = rows
    return bands


def _plot_gaps(out: str, summaries: dict) -> None:
    bands = gap_bands(summaries)
    if not bands:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for recipe in sorted(bands):
        rows = bands[recipe]
        xs = [r[0] for r in rows]
        n = max(r[4] for r in rows)
        line, = ax.plot(xs, [r[1] for r in rows], marker="o", ms=3, label=f"{recipe} ({n} seed{'s' if n > 1 else ''})")
        banded = [r for r in rows if r[2] is not None]
        if banded:
            ax.fill_between([r[0] for r in banded], [r[2] for r in banded], [r[3] for r in banded],
                            color=line.get_color(), alpha=0.18, lw=0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss - BF16 (same seed)")
    ax.set_title("Gap to BF16 over training: mean over seeds, 95% t band")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gap.png"), dpi=120)
    plt.close(fig)


def import_summaries(src: str, out: str) -> None:
    """Copy src/<run>.json to out/<run>/summary.json for runs that have no summary in out yet."""
    import shutil
    if not os.path.isdir(src):
        raise SystemExit(f"--import-summaries: {src} is not a directory")
    for f in sorted(os.listdir(src)):
        name, ext = os.path.splitext(f)
        if ext != ".json" or load_summary(out, name) is not None:
            continue
        os.makedirs(os.path.join(out, name), exist_ok=True)
        shutil.copyfile(os.path.join(src, f), os.path.join(out, name, "summary.json"))
        print(f"{name}: summary imported from {os.path.join(src, f)}", flush=True)


# --------------------------------------------------------------------------------------------------
# Corpus, plan, runs
# --------------------------------------------------------------------------------------------------

def ensure_corpus(a) -> dict:
    """Build (or reuse) the preset's corpus under <out>/corpus; returns its corpus.json."""
    from megatron_fp4.data import corpus
    directory = os.path.join(a.out, "corpus")
    if a.corpus == "campaign":
        roots = a.corpus_src or corpus.campaign_sources()
        patterns = a.corpus_patterns or list(corpus.CAMPAIGN_PATTERNS)
        corpus.ensure(directory, roots, a.valid_fraction, patterns=patterns, tokenizer_vocab=a.tokenizer_vocab or None,
                      dedupe=True)
    else:
        corpus.ensure(directory, a.corpus_src[0] if a.corpus_src and len(a.corpus_src) == 1 else a.corpus_src,
                      a.valid_fraction, patterns=a.corpus_patterns, tokenizer_vocab=a.tokenizer_vocab or None)
    with open(os.path.join(directory, corpus.MANIFEST)) as fh:
        info = json.load(fh)
    return {**info, "vocab_size": info.get("built", {}).get("vocab_size", corpus.VOCAB_SIZE)}


def describe_plan(a, info: dict, runs: list) -> list:
    """The plan's lines: model size, token budget, corpus epochs and validation size, GPU-time estimate."""
    params = non_embedding_params(a.layers, a.hidden, a.ffn)
    tokens = a.steps * a.global_batch * a.seq
    counts = info["counts"]
    epochs = tokens / counts["train"]
    lines = [f"model: {a.layers} layers x hidden {a.hidden} ({a.heads} heads), SwiGLU ffn {a.ffn}: "
             f"{params / 1e6:.2f}M non-embedding parameters (+{2 * info['vocab_size'] * a.hidden / 1e6:.2f}M in the "
             f"untied embeddings, vocabulary {info['vocab_size']}); {a.steps} steps x {a.global_batch * a.seq} "
             f"tokens = "
             f"{tokens / 1e6:.1f}M tokens = {tokens / params:.1f} tokens per parameter",
             f"corpus: {counts['train'] / 1e6:.2f}M training tokens ({counts['train_files']} files, "
             f"{counts.get('train_bytes', counts['train']) / 1e6:.0f} MB) = {epochs:.2f} epochs; held-out validation "
             f"{counts['valid'] / 1e6:.2f}M tokens ({counts['valid_files']} whole files)"
             + (", all of it at every evaluation" if a.full_validation else f", {a.eval_iters} batches per evaluation")]
    rate = ASSUMED_GPU_TOKENS_PER_S_AT_1M / (params / 1e6)
    gpu_s = len(runs) * tokens / rate
    lines.append(f"GPU time estimate: {len(runs)} runs x {tokens / 1e6:.1f}M tokens at an ASSUMED {rate / 1e3:.0f}k "
                 f"tokens/s for the whole GPU (runs side by side; assumption to re-measure, see "
                 f"ASSUMED_GPU_TOKENS_PER_S_AT_1M) = {gpu_s / 3600:.1f} GPU-hours, about {math.ceil(gpu_s / 540)} "
                 f"device calls of 9 minutes")
    return lines


def check_budget(a, info: dict) -> None:
    """The preset's data requirements: each training token seen at most --max-epochs times, at least
    --min-valid-tokens held out."""
    tokens = a.steps * a.global_batch * a.seq
    counts = info["counts"]
    if a.max_epochs and tokens > a.max_epochs * counts["train"]:
        raise SystemExit(f"--max-epochs {a.max_epochs}: {tokens / 1e6:.1f}M training tokens are "
                         f"{tokens / counts['train']:.2f} epochs of the corpus's {counts['train'] / 1e6:.1f}M; add "
                         "corpus roots (--corpus-src DIR ...), or lower the budget (--steps / --tokens-per-param)")
    if a.min_valid_tokens and counts["valid"] < a.min_valid_tokens:
        raise SystemExit(f"--min-valid-tokens {a.min_valid_tokens}: the held-out split has only {counts['valid']} "
                         "tokens; raise --valid-fraction or add corpus roots (--corpus-src DIR ...)")


def run_all(todo: list, a, meta: dict) -> None:
    """Run (name, command) pairs, at most a.parallel at a time (each its own process; on one GPU they
    share it), each under a.timeout seconds and all within a.deadline; a run's output goes to
    <out>/<name>/log.txt, and each call is recorded in <out>/runs.json."""
    sharing = min(a.parallel, len(todo)) or 1

    def done(job, rc, seconds):
        summary = load_summary(a.out, job.name)
        step = summary.get("median_step_s") if summary else None
        step_txt = f", median step {1000 * step:.1f} ms" if step else ""
        status = status_of(summary, a.steps)
        print(f"{job.name}: exit {rc}, {status}, {seconds:.0f} s{step_txt}", flush=True)
        trained = summary["losses"][-1][0] if summary and summary["losses"] else 0
        record_call(a.out, job.name, {"ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(seconds, 1),
                                      "exit": rc, "status": status, "iterations": trained, "sharing": sharing,
                                      "device": (summary or {}).get("device")}, **meta[job.name])

    deadline = time.time() + a.deadline if a.deadline else None
    left = run_jobs([Job(name, cmd) for name, cmd in todo], a.out, timeout=a.timeout, slots=a.parallel, on_done=done,
                    deadline=deadline)
    for job in left:
        print(f"{job.name}: not started before the deadline (--deadline {a.deadline:.0f} s): next command", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="model, budget, corpus and runs (flags given explicitly override the preset's values)")
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--only", nargs="*", help="restrict to these run names (default: all of the preset)")
    p.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    p.add_argument("--cpu", action="store_true", help="CPU driver (smoke test)")
    p.add_argument("--plan", action="store_true",
                   help="build the corpus, print sizes, budget and run list; train nothing")
    for flag, kind in (("--layers", int), ("--hidden", int), ("--ffn", int), ("--heads", int), ("--seq", int),
                       ("--micro-batch", int), ("--global-batch", int), ("--steps", int), ("--lr", float),
                       ("--eval-interval", int), ("--eval-iters", int)):
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--tokens-per-param", type=float, default=None,
                   help="token budget per non-embedding parameter (sets --steps when --steps is not given)")
    p.add_argument("--seeds", type=int, default=None, help="initialisation seeds per recipe (campaign: 3)")
    p.add_argument("--recipes", default=None, help="comma-separated recipes of a seeded plan (campaign: the six)")
    p.add_argument("--seed", type=int, default=1234, help="initialisation seed of seed 1 (seed k: + k - 1)")
    p.add_argument("--data-seed", type=int, default=None,
                   help="the data order's seed, the same for every run (campaign: 1234; default preset: none, "
                        "as in its committed results: --seed drives both the data order and the initialisation)")
    p.add_argument("--full-validation", action=argparse.BooleanOptionalAction, default=None,
                   help="evaluate the whole held-out split at every evaluation (campaign: on)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (a run cut short is kept)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole command: runs still going then are stopped (they resume next "
                        "time from their last checkpoint), runs not started wait for the next command")
    p.add_argument("--save-interval", type=int, default=100,
                   help="checkpoint every N iterations (GPU route): a run cut short resumes there on the next "
                        "command with the same --out")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time (one GPU is shared: small models leave it mostly idle)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and plot from the summaries in --out (after "
                        "--import-summaries)")
    p.add_argument("--corpus", choices=("stdlib", "campaign"), default=None,
                   help="stdlib: the Python stdlib, byte-level; campaign: stdlib + installed packages, BPE")
    p.add_argument("--corpus-src", nargs="+", default=None, metavar="DIR",
                   help="corpus root directories (default: the --corpus choice's)")
    p.add_argument("--corpus-patterns", nargs="+", default=None, metavar="GLOB",
                   help="file-name patterns of the corpus files (e.g. '*.py' '*.md')")
    p.add_argument("--tokenizer-vocab", type=int, default=None,
                   help="byte-level BPE vocabulary trained on the training split (0: byte-level tokens)")
    p.add_argument("--valid-fraction", type=float, default=None,
                   help="share of the corpus files held out for validation, chosen by a hash of their path (0.02)")
    p.add_argument("--max-epochs", type=float, default=None,
                   help="refuse a budget that sees the training split more often (campaign: 2)")
    p.add_argument("--min-valid-tokens", type=int, default=None,
                   help="refuse a held-out split with fewer tokens (campaign: 2,000,000)")
    p.add_argument("--import-summaries", default=None, metavar="DIR",
                   help="start from earlier results: DIR/<run>.json (e.g. docs/quality) become the summaries "
                        "of runs that have none in --out, so only the missing or cut-short runs are trained")
    a = p.parse_args(argv)
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key, None) is None:
            setattr(a, key, value)
    if a.steps is None:
        tps = a.global_batch * a.seq
        a.steps = math.ceil(a.tokens_per_param * non_embedding_params(a.layers, a.hidden, a.ffn) / tps)
    a.recipes = [r for r in (a.recipes.split(",") if isinstance(a.recipes, str) else a.recipes or []) if r]
    if a.parallel < 1:
        p.error("--parallel must be at least 1")
    if a.seeds is not None and a.seeds < 1:
        p.error("--seeds must be at least 1")
    if a.seeds and "bf16" not in a.recipes:
        p.error("--recipes must include bf16: every gap is paired with the BF16 run of its seed")
    if a.global_batch % a.micro_batch:
        p.error(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch}")
    return a


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.import_summaries:
        import_summaries(a.import_summaries, a.out)
    plan = run_plan(a)
    known = [n for n, _, _ in plan]
    if a.report_only:
        print(report(a.out, a.steps, known if a.seeds else None), flush=True)
        return
    names = a.only or ([n for n, _, _ in RUNS] if not a.seeds else known)
    unknown = set(names) - set(known)
    if unknown:
        raise SystemExit(f"unknown run names {sorted(unknown)}; known: {known}")
    info = ensure_corpus(a)
    todo_plan = [r for r in plan if r[0] in names]
    for line in describe_plan(a, info, todo_plan):
        print(line, flush=True)
    check_budget(a, info)
    if a.plan:
        for name, recipe, offset in todo_plan:
            st = status_of(load_summary(a.out, name), a.steps)
            data_seed = a.seed + offset if a.data_seed is None else a.data_seed
            print(f"  {name}: recipe {recipe}, init seed {a.seed + offset}, data seed {data_seed}: {st}", flush=True)
        return
    corpus_dir = os.path.join(a.out, "corpus")
    todo, meta = [], {}
    for name, recipe, seed_offset in todo_plan:
        if not a.force and status_of(load_summary(a.out, name), a.steps) == "complete":
            print(f"{name}: complete, skipped", flush=True)
            continue
        if a.force:   # a forced rerun starts from scratch, not from the old run's checkpoint
            import shutil
            shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)
        elif os.path.isfile(os.path.join(a.out, name, "latest_checkpointed_iteration.txt")):
            print(f"{name}: resuming from its checkpoint", flush=True)
        os.makedirs(os.path.join(a.out, name), exist_ok=True)
        meta[name] = {"recipe": recipe, "init_seed": a.seed + seed_offset,
                      "data_seed": a.seed + seed_offset if a.data_seed is None else a.data_seed}
        todo.append((name, [sys.executable, "-m", "megatron_fp4.pretrain_gpt",
                            *run_flags(a, name, recipe, a.seed + seed_offset, corpus_dir, info["vocab_size"])]))
    run_all(todo, a, meta)
    # every run in --out, also those of earlier commands
    print(report(a.out, a.steps, known if a.seeds else None), flush=True)


if __name__ == "__main__":
    main()
