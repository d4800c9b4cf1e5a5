"""Training-quality benchmark: the same Llama-style GPT trained under every recipe against BF16.

    python benchmarks/quality.py --out runs/quality --parallel 8    # GPU: Megatron's training loop
    python benchmarks/quality.py --out runs/quality --only quartet2 nvidia
    python benchmarks/quality.py --out runs/smoke --cpu --steps 20  # CPU smoke (megatron-core driver)

Every run: same model (RMSNorm, SwiGLU, RoPE, untied embeddings, no biases), same data and order (the
corpus builder's default corpus, byte-level, held-out validation split of whole files), same
hyperparameters (AdamW 0.9/0.95, weight decay 0.1, clip 1.0, cosine with 10% warm-up to lr/10), same
seed — except the second BF16 run, whose seed differs, to measure the seed-to-seed spread. On request
(`--only nvidia-seed2 ...`) every FP4 recipe also runs with that second seed, its gap paired with
bf16-seed2, which shows how much a gap itself moves from seed to seed.
Runs already complete in --out are skipped, so the command resumes the missing recipes only; a run cut
short keeps its partial summary (written at every log interval) and is reported as such, and the next
command with the same --out continues it from its last checkpoint (every --save-interval iterations;
GPU route), so a run longer than one device call is split across calls; a run with a
non-finite loss is reported as NaN/Inf, a run whose loss ends above where it started as diverged.
Output: <out>/table.md (final validation loss, gap to BF16 absolute and %, gap as a fraction of
NVIDIA's gap, each paired with BF16 at the same iteration) and <out>/gap.png (gap to BF16 over training).

Default size (chosen so that all eight runs fit one ~10-minute device call on an H100, sharing the
GPU with --parallel 8): 4 layers, hidden 256, SwiGLU ffn 512, 4 heads, seq 256, batch 256, 820 steps:
2.62M non-embedding parameters, 53.7M tokens = 20.5 tokens per parameter.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _runs import Job, load_summary, run_jobs  # noqa: E402

RUNS = [  # (run name, recipe, seed offset)
    ("bf16", "bf16", 0), ("bf16-seed2", "bf16", 1), ("nvidia", "nvidia", 0), ("tetrajet2", "tetrajet2", 0),
    ("tetrajet2-full", "tetrajet2-full", 0), ("quartet2-no46", "quartet2-no46", 0),
    ("quartet2", "quartet2", 0), ("quartet2-plus", "quartet2-plus", 0),
]
# Second-seed runs of the FP4 recipes, on request (--only): each is paired with bf16-seed2 (same
# initialisation and data order), so the gap's own seed-to-seed variation can be read off.
SEED2_RUNS = [(f"{name}-seed2", recipe, 1) for name, recipe, offset in RUNS if offset == 0 and name != "bf16"]
ALL_RUNS = RUNS + SEED2_RUNS


def first_seed_of(name: str) -> str:
    """The seed-1 run of a second-seed FP4 run ("quartet2-seed2" -> "quartet2"); any other name itself
    (bf16-seed2 is BF16's own second seed, the spread, not a paired run)."""
    return name[:-len("-seed2")] if name.endswith("-seed2") and name != "bf16-seed2" else name


def baseline_of(name: str) -> str:
    """The BF16 run a run's gap is paired with: the one with its seed."""
    return "bf16" if first_seed_of(name) == name else "bf16-seed2"


def nvidia_of(name: str) -> str:
    return "nvidia" if first_seed_of(name) == name else "nvidia-seed2"


def non_embedding_params(layers: int, hidden: int, ffn: int) -> int:
    """Transformer-block linear parameters (SwiGLU: 3 matrices of hidden x ffn; attention: 4 of hidden^2)."""
    return layers * (4 * hidden * hidden + 3 * hidden * ffn)


def run_flags(a, name: str, recipe: str, seed: int, corpus: str) -> list:
    out = os.path.join(a.out, name)
    warmup = max(1, a.steps // 10)
    common = ["--num-layers", a.layers, "--hidden-size", a.hidden, "--ffn-hidden-size", a.ffn,
              "--num-attention-heads", a.heads, "--seq-length", a.seq, "--micro-batch-size", a.micro_batch,
              "--train-iters", a.steps, "--lr", a.lr, "--min-lr", a.lr / 10, "--lr-warmup-iters", warmup,
              "--weight-decay", 0.1, "--clip-grad", 1.0, "--seed", seed, "--swiglu",
              "--eval-interval", a.eval_interval, "--eval-iters", a.eval_iters, "--log-interval", 10,
              "--mfp4-recipe", recipe, "--save", out]
    if a.cpu:   # the CPU driver's own flags (AdamW 0.9/0.95, RMSNorm and cosine are its defaults)
        extra = ["--mfp4-cpu", "--data-path", os.path.join(corpus, "train"),
                 "--valid-data-path", os.path.join(corpus, "valid"), "--mfp4-time-budget", 1e9]
    else:       # Megatron's flags
        extra = ["--max-position-embeddings", a.seq, "--position-embedding-type", "rope",
                 "--normalization", "RMSNorm", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
                 "--global-batch-size", a.global_batch, "--lr-decay-style", "cosine",
                 "--adam-beta1", 0.9, "--adam-beta2", 0.95, "--bf16", "--transformer-impl", "local",
                 "--attention-dropout", 0.0, "--hidden-dropout", 0.0,   # no dropout, as in the sweeps
                 "--tokenizer-type", "NullTokenizer", "--vocab-size", 256, "--null-tokenizer-eod-id", 0,
                 "--train-data-path", os.path.join(corpus, "train"), "--valid-data-path", os.path.join(corpus, "valid"),
                 "--test-data-path", os.path.join(corpus, "valid"),
                 "--mfp4-summary", os.path.join(out, "summary.json"),
                 # a run cut short resumes from its last checkpoint on the next command (Megatron's
                 # --load; no checkpoint there = a fresh start), so long runs split across device calls
                 "--load", out, "--save-interval", a.save_interval]
    return [str(x) for x in common + extra]


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


def report(out: str, steps: int, names=None) -> str:
    """The result table (markdown) and the gap plot, from whatever summaries exist.

    Gaps are paired by iteration: each run's last validation loss is compared with BF16's validation
    loss at the same iteration (a run cut short is compared where it stopped, not with BF16's end),
    and the ratio to NVIDIA's gap is taken at the last iteration both runs evaluated. Every run uses
    BF16's seed, initialisation and data order, so these gaps are paired differences; the BF16
    seed-to-seed spread (another seed: other initialisation and data order) bounds the noise."""
    names = names or [n for n, _, _ in RUNS] + [n for n, _, _ in SEED2_RUNS if load_summary(out, n) is not None]
    summaries = {n: load_summary(out, n) for n in set(names) | {"bf16", "bf16-seed2", "nvidia", "nvidia-seed2"}}
    valid = {n: dict((int(i), v) for i, v in s["valid"]) for n, s in summaries.items() if s and s.get("valid")}
    base = valid.get("bf16", {})

    def gap_at(name, it):
        ref = valid.get(baseline_of(name), {})
        return valid[name][it] - ref[it] if it in valid.get(name, {}) and it in ref else None

    # the card each run trained on: runs of different sessions may come from different GPUs (H100 /
    # H200); a pairing across cards is still a paired difference of seed, data order and recipe, but
    # cuBLAS's choice of kernels differs, a perturbation of the size of FP4's own (see the table's note)
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
        if common and n not in ("bf16", "bf16-seed2"):
            nv = gap_at(nvidia, common[-1])
            if nv:
                frac = f"{gap_at(n, common[-1]) / nv:.2f} ({common[-1]})"
        label = n if baseline_of(n) == "bf16" else f"{n} (vs bf16-seed2)"
        lines.append(f"| {label} | {st} | {trained} | {it} | {valid[n][it]:.4f} | {ref[it]:.4f} | {gap:+.4f} | "
                     f"{100 * gap / ref[it]:+.2f}% | {frac} | {card} |")
    if base and "bf16-seed2" in valid:
        common = sorted(set(base) & set(valid["bf16-seed2"]))
        if common:
            spreads = [abs(valid["bf16-seed2"][i] - base[i]) for i in common]
            lines.append(f"\nBF16 seed-to-seed spread (|bf16 - bf16-seed2|): {spreads[-1]:.4f} at iteration "
                         f"{common[-1]}; mean over the {len(common)} evaluations {sum(spreads) / len(spreads):.4f}, "
                         f"max {max(spreads):.4f}")
    table = "\n".join(lines)
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    _plot_gaps(out, summaries)
    return table


def _short_device(summary) -> str:
    """'H100' / 'H200' / 'cpu' from a summary's device name ('-' when unknown)."""
    name = (summary or {}).get("device") or "-"
    for card in ("H100", "H200", "B200", "A100"):
        if card in name:
            return card
    return name


def gap_series(summaries: dict) -> dict:
    """Per run, [(iteration, validation loss - its paired BF16 run's)] (bf16-seed2 against bf16: the
    seed spread; a second-seed run against bf16-seed2)."""
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


def _plot_gaps(out: str, summaries: dict) -> None:
    series = gap_series(summaries)
    if not series:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for name in sorted(series, key=lambda n: (first_seed_of(n) != n, n)):
        recipe = first_seed_of(name)
        second = recipe != name
        line, = ax.plot(*zip(*series[name]), marker="o", ms=3, ls="--" if second else "-",
                        color=colors.get(recipe), label=f"{recipe} (seed 2, vs bf16-seed2)" if second else name)
        colors[recipe] = line.get_color()
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss - paired BF16")
    ax.set_title("Gap to BF16 over training (bf16-seed2: the seed-to-seed spread)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gap.png"), dpi=120)
    plt.close(fig)


def import_summaries(src: str, out: str) -> None:
    """Copy src/<run>.json to out/<run>/summary.json for runs that have no summary in out yet."""
    import shutil
    if not os.path.isdir(src):
        raise SystemExit(f"--import-summaries: {src} is not a directory")
    for name, _, _ in ALL_RUNS:
        path = os.path.join(src, f"{name}.json")
        if os.path.exists(path) and load_summary(out, name) is None:
            os.makedirs(os.path.join(out, name), exist_ok=True)
            shutil.copyfile(path, os.path.join(out, name, "summary.json"))
            print(f"{name}: summary imported from {path}", flush=True)


def run_all(todo: list, a) -> None:
    """Run (name, command) pairs, at most a.parallel at a time (each its own process; on one GPU they
    share it), each under a.timeout seconds; a run's output goes to <out>/<name>/log.txt."""
    def done(job, rc, seconds):
        summary = load_summary(a.out, job.name)
        step = summary.get("median_step_s") if summary else None
        step_txt = f", median step {1000 * step:.1f} ms" if step else ""
        print(f"{job.name}: exit {rc}, {status_of(summary, a.steps)}, {seconds:.0f} s{step_txt}", flush=True)

    run_jobs([Job(name, cmd) for name, cmd in todo], a.out, timeout=a.timeout, slots=a.parallel, on_done=done)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/quality")
    p.add_argument("--only", nargs="*", help="restrict to these run names (default: all)")
    p.add_argument("--force", action="store_true", help="rerun runs that are already complete")
    p.add_argument("--cpu", action="store_true", help="CPU driver (smoke test)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=820)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval-interval", type=int, default=100)
    p.add_argument("--eval-iters", type=int, default=4)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (a run cut short is kept)")
    p.add_argument("--save-interval", type=int, default=100,
                   help="checkpoint every N iterations (GPU route): a run cut short resumes there on the next "
                        "command with the same --out")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at a time (one GPU is shared: small models leave it mostly idle)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and plot from the summaries in --out (after --import-summaries)")
    p.add_argument("--corpus-src", default=None, help="text files for the corpus (default: Python stdlib)")
    p.add_argument("--import-summaries", default=None, metavar="DIR",
                   help="start from earlier results: DIR/<run>.json (e.g. docs/quality) become the summaries "
                        "of runs that have none in --out, so only the missing or cut-short runs are trained")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error("--parallel must be at least 1")
    os.makedirs(a.out, exist_ok=True)
    if a.import_summaries:
        import_summaries(a.import_summaries, a.out)
    if a.report_only:
        print(report(a.out, a.steps), flush=True)
        return
    from megatron_fp4.data.corpus import ensure
    corpus = os.path.join(a.out, "corpus")
    ensure(corpus, a.corpus_src)
    params = non_embedding_params(a.layers, a.hidden, a.ffn)
    tokens = a.steps * a.global_batch * a.seq
    print(f"model: {params / 1e6:.2f}M non-embedding parameters; {tokens / 1e6:.1f}M tokens = "
          f"{tokens / params:.1f} tokens per parameter", flush=True)
    names = a.only or [n for n, _, _ in RUNS]
    unknown = set(names) - {n for n, _, _ in ALL_RUNS}
    if unknown:
        raise SystemExit(f"unknown run names {sorted(unknown)}; known: {[n for n, _, _ in ALL_RUNS]}")
    todo = []
    for name, recipe, seed_offset in ALL_RUNS:
        if name not in names:
            continue
        if not a.force and status_of(load_summary(a.out, name), a.steps) == "complete":
            print(f"{name}: complete, skipped", flush=True)
            continue
        if a.force:   # a forced rerun starts from scratch, not from the old run's checkpoint
            import shutil
            shutil.rmtree(os.path.join(a.out, name), ignore_errors=True)
        elif os.path.isfile(os.path.join(a.out, name, "latest_checkpointed_iteration.txt")):
            print(f"{name}: resuming from its checkpoint", flush=True)
        os.makedirs(os.path.join(a.out, name), exist_ok=True)
        todo.append((name, [sys.executable, "-m", "megatron_fp4.pretrain_gpt",
                            *run_flags(a, name, recipe, a.seed + seed_offset, corpus)]))
    run_all(todo, a)
    print(report(a.out, a.steps), flush=True)   # every run in --out, also those of earlier commands


if __name__ == "__main__":
    main()
