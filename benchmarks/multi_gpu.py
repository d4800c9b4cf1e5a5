"""Multi-GPU runs of the plugin on one 2-GPU node (multi-GPU issue), in one command:

    python -m benchmarks.multi_gpu --out runs/mgpu                      # 2 GPUs, all stages
    python -m benchmarks.multi_gpu --out runs/mgpu --stage tp          # one stage (tp | curves | grads)
    python -m benchmarks.multi_gpu --out runs/mgpu_cpu --cpu            # the same runs, tiny, 2 CPU ranks (gloo)
    python -m benchmarks.multi_gpu --out runs/mgpu --single-gpu         # one GPU: the one-rank runs only
    python -m benchmarks.multi_gpu --out runs/mgpu --single-gpu --stage curves,grads --share-gpu
                                        # their one-rank runs side by side on one GPU (no timings taken)

Every run is `python -m megatron_fp4.pretrain_gpt` under torchrun (Megatron's own loop and NCCL on
GPUs; the megatron-core CPU driver and gloo on CPU), its output in <out>/<run>/log.txt and its summary
in <out>/<run>/summary.json. Finished runs are skipped, so a command cut short resumes the rest.

Stages:
- tp:     TP=2 + sequence parallel, `bf16` and `quartet2`, launched through examples/multinode.sh in
          its single-node form (NNODES=1); a ~1B GPT (20 x 2048, SwiGLU 5632, 16 heads, vocab 32000),
          seq 2048, mock data. Step time, tokens/s, peak memory and the bytes all-gathered on the TP
          group per step, counted at every collective call (--nvfp4-count-collectives), plus the
          plugin's own account of its FP4 gathers against BF16 for the same tensors. The same model
          at TP=1 on one GPU is the scaling reference.
- curves: `tetrajet2-full` (OutControl + OsciReset, its schedule scaled to the run) for a few hundred
          steps on real text (the corpus builder's default corpus): one GPU, one GPU with another seed
          (the noise reference), PP=2, PP=2 with 2 virtual stages per rank, DP=2 with the distributed
          optimizer. Each parallel curve is compared with the one-GPU curve; "within noise" means its
          mean |loss difference| (training loss, 10-step means) is at most the seed-to-seed one.
- grads:  the first optimizer step's gradients (--nvfp4-dump-grads, gathered to the TP=1 layout) and the
          quantized layers' random-stream keys at TP=1 and TP=2+SP, same seed, FP32 parameters,
          `--use-cpu-initialization` (same weights): `bf16` (reduction order alone) and `quartet2`;
          controls at TP=1: the initial weights scaled by (1 +- 2^-22) (what a reduction-order-sized
          difference becomes after FP4 rounding decisions) and another recipe seed (other random draws).
          Pass: identical keys, and the TP=2 difference no larger than the last-bit controls' or below a
          tenth of the draw-to-draw difference. (FP32: with BF16 the TP partial sums are rounded before
          they are added, and FP4 turns that into a draw-sized difference.)

Writes <out>/table.md and <out>/curves.png (the curves stage's losses); --results-md FILE puts the table into FILE between
`<!-- multi-gpu:begin -->` and `<!-- multi-gpu:end -->` (appended when the markers are missing).
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from benchmarks._runs import Job, load_summary, put_marked_block, run_jobs
from megatron_fp4.testing.dist import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# model and run sizes: (GPU, CPU). The CPU sizes only exercise the same code paths.
SIZES = {
    "tp": {"gpu": dict(layers=20, hidden=2048, ffn=5632, heads=16, seq=2048, vocab=32000, mbs=2, gbs=2, steps=30),
           "cpu": dict(layers=2, hidden=256, ffn=512, heads=4, seq=64, vocab=256, mbs=2, gbs=2, steps=6)},
    "curves": {"gpu": dict(layers=8, hidden=512, ffn=1408, heads=8, seq=1024, vocab=256, mbs=4, gbs=16, steps=300),
               "cpu": dict(layers=4, hidden=256, ffn=512, heads=4, seq=64, vocab=256, mbs=2, gbs=4, steps=30)},
    "grads": {"gpu": dict(layers=4, hidden=1024, ffn=2816, heads=8, seq=2048, vocab=256, mbs=2, gbs=2, steps=1),
              "cpu": dict(layers=2, hidden=256, ffn=512, heads=4, seq=64, vocab=256, mbs=2, gbs=2, steps=1)},
}
STAGES = ("tp", "curves", "grads")
LAST_BIT = 2.0 ** -22     # FP32 reduction-order differences are of this relative size
GRAD_RUNS = [  # (name, TP size, recipe, extra flags)
    ("grads-tp1-bf16", 1, "bf16", []), ("grads-tp2-bf16", 2, "bf16", []),
    ("grads-tp1-quartet2", 1, "quartet2", []), ("grads-tp2-quartet2", 2, "quartet2", []),
    # KEY=VALUE form: argparse would take a bare "-2.38e-07" for an option
    ("grads-tp1-quartet2-plus-ulp", 1, "quartet2", [f"--nvfp4-perturb-init={LAST_BIT!r}"]),
    ("grads-tp1-quartet2-minus-ulp", 1, "quartet2", [f"--nvfp4-perturb-init={-LAST_BIT!r}"]),
    ("grads-tp1-quartet2-draws", 1, "quartet2", ["--nvfp4-override", "seed=4321"]),
]


def model_flags(z: dict, precision: str = "--bf16") -> list:
    return ["--num-layers", z["layers"], "--hidden-size", z["hidden"], "--ffn-hidden-size", z["ffn"],
            "--num-attention-heads", z["heads"], "--seq-length", z["seq"], "--max-position-embeddings", z["seq"],
            "--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--transformer-impl", "local",
            precision, "--tokenizer-type", "NullTokenizer", "--vocab-size", z["vocab"],
            "--micro-batch-size", z["mbs"], "--global-batch-size", z["gbs"], "--train-iters", z["steps"],
            "--lr-decay-style", "cosine", "--clip-grad", 1.0, "--weight-decay", 0.1]


def runs_for(stage: str, a) -> list:
    """[(name, nproc, via_multinode_script, flags)] of a stage."""
    z = SIZES[stage]["cpu" if a.cpu else "gpu"]
    base = model_flags(z)
    out = []
    if stage == "tp":
        common = base + ["--mock-data", "--lr", 3e-4, "--min-lr", 3e-5, "--lr-warmup-iters", 5, "--seed", 1234,
                         "--log-interval", 5, "--eval-iters", 0, "--eval-interval", 10 ** 6,
                         "--nvfp4-count-collectives"]
        for recipe in ("bf16", "quartet2"):
            out.append((f"tp2-sp-{recipe}", 2, True, common + ["--nvfp4-recipe", recipe]))
            if not a.skip_tp1:
                out.append((f"tp1-{recipe}", 1, False, common + ["--nvfp4-recipe", recipe]))
    elif stage == "curves":
        warmup = max(1, z["steps"] // 10)
        corpus = os.path.join(a.out, "corpus")
        data = (["--data-path", os.path.join(corpus, "train"), "--valid-data-path", os.path.join(corpus, "valid")]
                if a.cpu else
                ["--train-data-path", os.path.join(corpus, "train"), "--valid-data-path", os.path.join(corpus, "valid"),
                 "--test-data-path", os.path.join(corpus, "valid"), "--null-tokenizer-eod-id", 0,
                 "--attention-dropout", 0.0, "--hidden-dropout", 0.0])
        common = base + data + ["--lr", 1e-3, "--min-lr", 1e-4, "--lr-warmup-iters", warmup, "--log-interval", 1,
                                "--eval-interval", max(1, z["steps"] // 6), "--eval-iters", 4,
                                "--nvfp4-recipe", "tetrajet2-full"]
        layers_per_virtual = z["layers"] // 4          # PP=2 x 2 virtual stages
        out += [("curve-1gpu", 1, False, common + ["--seed", 1234]),
                ("curve-1gpu-seed2", 1, False, common + ["--seed", 1235]),
                ("curve-pp2", 2, False, common + ["--seed", 1234, "--pipeline-model-parallel-size", 2]),
                ("curve-pp2-vpp2", 2, False, common + ["--seed", 1234, "--pipeline-model-parallel-size", 2,
                                                       "--num-layers-per-virtual-pipeline-stage", layers_per_virtual]),
                ("curve-dp2-distopt", 2, False, common + ["--seed", 1234, "--use-distributed-optimizer"])]
    elif stage == "grads":
        # FP32 parameters and activations: with BF16 the TP partial sums are rounded to BF16 before
        # they are added, an ulp-sized difference in most activations, which FP4 rounding decisions
        # amplify to the size of a change of random draws (measured on CPU: 0.21 against 0.27)
        common = model_flags(z, "--nvfp4-fp32") + [
            "--mock-data", "--lr", 1e-4, "--min-lr", 1e-5, "--lr-warmup-iters", 0, "--seed", 1234,
            "--log-interval", 1, "--eval-iters", 0, "--eval-interval", 10 ** 6, "--use-cpu-initialization"]
        for name, tp, recipe, extra in GRAD_RUNS:
            if tp == 2:
                extra = ["--tensor-model-parallel-size", 2, "--sequence-parallel", *extra]
            out.append((name, tp, False, common + extra + [
                "--nvfp4-recipe", recipe, "--nvfp4-dump-grads", os.path.join(a.out, name, "grads.pt")]))
    return out


def run_environment() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")   # torchrun of this Python
    # Megatron refuses TP > 1 on Hopper without it (one hardware queue keeps TP communication in order)
    env.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return env


def command(name: str, nproc: int, via_script: bool, flags: list, a) -> tuple:
    """The argv and environment of one run."""
    run_dir = os.path.join(a.out, name)
    flags = [str(x) for x in flags] + ["--nvfp4-summary", os.path.join(run_dir, "summary.json")]
    if a.cpu:   # the CPU driver always writes a checkpoint: into the run's directory
        flags += ["--nvfp4-cpu", "--nvfp4-time-budget", "1e9", "--save", run_dir]
    # on GPUs no --save: nothing in these runs needs a checkpoint (a 1B one would take minutes)
    env = run_environment()
    port = str(free_port())
    if via_script:
        # examples/multinode.sh in its single-node form: the multi-node launch users run
        env.update(NNODES="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, GPUS_PER_NODE=str(nproc),
                   RUN_DIR="")   # no script --save: these runs need no checkpoint (the CPU ones pass their own)
        return ["bash", os.path.join(ROOT, "examples", "multinode.sh"), *flags], env
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
            "127.0.0.1", "--master-port", port, "-m", "megatron_fp4.pretrain_gpt", *flags], env


def finished(out: str, name: str, steps: int) -> bool:
    s = load_summary(out, name)
    return bool(s and s["losses"] and s["losses"][-1][0] >= steps and
                (not name.startswith("grads") or os.path.exists(os.path.join(out, name, "grads.pt"))))


def execute(todo: list, a, gpus: int) -> dict:
    """Run the commands; runs on disjoint GPUs go side by side (two one-GPU runs on a 2-GPU node)."""
    status, steps_of, jobs = {}, {}, []
    for name, nproc, via, flags, steps in todo:
        cmd, env = command(name, nproc, via, flags, a)
        jobs.append(Job(name, cmd, env, gpus=nproc, note=f"{nproc} rank{'s' if nproc > 1 else ''}"))
        steps_of[name] = steps

    def done(job, rc, seconds):
        ok = rc == 0 and finished(a.out, job.name, steps_of[job.name])
        rc = "timeout (killed: a hang or too slow)" if rc == "timeout" else rc
        status[job.name] = "complete" if ok else f"failed: exit {rc}"
        s = load_summary(a.out, job.name)
        step = s.get("median_step_s") if s else None
        print(f"{job.name}: {status[job.name]}, {seconds:.0f} s"
              + (f", median step {1000 * step:.1f} ms" if step else ""), flush=True)
        if not ok:
            tail = open(os.path.join(a.out, job.name, "log.txt")).read().splitlines()[-15:]
            print("\n".join("    " + t for t in tail), flush=True)

    # CPU ranks, or --serial: one run at a time; GPUs: as many as there are free GPUs for, or with
    # --share-gpu every one-rank run at once on the GPUs all can see (no hand-out)
    slots = 1 if not gpus or a.serial else len(jobs) or 1
    share = getattr(a, "share_gpu", False) and all(job.gpus <= 1 for job in jobs)
    run_jobs(jobs, a.out, timeout=a.timeout, slots=slots, gpus=0 if share else gpus, cwd=ROOT, on_done=done)
    return status


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------

def _tp_gather_bytes(s) -> tuple:
    per = (s["comm"].get("collectives") or {}).get("per_iteration", {})
    rec = per.get("all_gather_into_tensor/tp")
    return (rec["bytes"], rec["calls"]) if rec else (None, None)


def tp_table(a) -> list:
    lines = ["| run | ranks | step (median) | tokens/s | peak memory (GiB, last rank) | TP all-gather MiB/step (calls) "
             "| of which the plugin's FP4 gathers: MiB/step FP4 vs BF16 same tensors |",
             "|---|---|---|---|---|---|---|"]
    rows = {}
    for name in ("tp1-bf16", "tp2-sp-bf16", "tp1-quartet2", "tp2-sp-quartet2"):
        s = load_summary(a.out, name)
        if s is None:
            lines.append(f"| {name} | - | missing | | | | |")
            continue
        rows[name] = s
        step = s.get("median_step_s")
        gbytes, calls = _tp_gather_bytes(s)
        plugin = s["comm"].get("plugin_gathers")
        plug = "-"
        if plugin and s.get("iterations"):
            # the plugin's counters run from the start: per step over the iterations it saw
            n = max(1, int(plugin.get("iteration", 0)) + 1)
            plug = (f"{plugin['fp4_bytes'] / n / 2**20:.1f} vs {plugin['bf16_bytes_for_same_tensors'] / n / 2**20:.1f} "
                    f"({plugin['fp4_bytes'] / plugin['bf16_bytes_for_same_tensors']:.3f})")
        mem = s.get("peak_mem_gib")
        lines.append(f"| {name} | {s.get('world_size', '-')} | {1000 * step:.1f} ms | {s.get('tokens_per_s', 0):.0f} | "
                     f"{'-' if mem is None else f'{mem:.2f}'} | "
                     + (f"{gbytes / 2**20:.1f} ({calls:.0f})" if gbytes is not None else "-") + f" | {plug} |"
                     if step else f"| {name} | - | no step time | | | | |")
    notes = []
    for tp in ("tp1", "tp2-sp"):
        b, q = rows.get(f"{tp}-bf16"), rows.get(f"{tp}-quartet2")
        if b and q and b.get("median_step_s") and q.get("median_step_s"):
            notes.append(f"{tp}: quartet2 / bf16 step time {q['median_step_s'] / b['median_step_s']:.2f}x")
            if b.get("peak_mem_gib") and q.get("peak_mem_gib"):
                notes.append(f"{tp}: quartet2 / bf16 peak memory {q['peak_mem_gib'] / b['peak_mem_gib']:.2f}x")
    b, q = rows.get("tp2-sp-bf16"), rows.get("tp2-sp-quartet2")
    if b and q and _tp_gather_bytes(b)[0] and _tp_gather_bytes(q)[0]:
        notes.append(f"TP all-gather bytes per step, quartet2 / bf16: {_tp_gather_bytes(q)[0] / _tp_gather_bytes(b)[0]:.3f}")
    for r in ("bf16", "quartet2"):
        one, two = rows.get(f"tp1-{r}"), rows.get(f"tp2-sp-{r}")
        if one and two and one.get("median_step_s") and two.get("median_step_s"):
            notes.append(f"{r}: TP=2 step / TP=1 step {two['median_step_s'] / one['median_step_s']:.2f}x")
    return lines + [""] + [f"- {n}" for n in notes]


def _window_means(losses: dict, width: int = 10) -> dict:
    out = {}
    its = sorted(losses)
    for start in range(0, len(its) - width + 1, width):
        chunk = its[start:start + width]
        out[chunk[-1]] = sum(losses[i] for i in chunk) / width
    return out


def curves_table(a, status: dict) -> list:
    ref = load_summary(a.out, "curve-1gpu")
    lines = ["| run | status | steps | final training loss (last 10 mean) | last validation loss | "
             "mean abs diff to 1 GPU (10-step means) | max abs diff | OsciReset resets (last rank) |",
             "|---|---|---|---|---|---|---|---|"]
    noise = None
    ref_w = _window_means(dict(ref["losses"])) if ref else {}
    for name in ("curve-1gpu", "curve-1gpu-seed2", "curve-pp2", "curve-pp2-vpp2", "curve-dp2-distopt"):
        s = load_summary(a.out, name)
        if s is None:
            lines.append(f"| {name} | {status.get(name, 'missing')} | - | | | | | |")
            continue
        losses = dict(s["losses"])
        finite = all(math.isfinite(v) for v in losses.values() if v is not None)
        w = _window_means(losses)
        common = sorted(set(w) & set(ref_w))
        diffs = [abs(w[i] - ref_w[i]) for i in common]
        mean_d = sum(diffs) / len(diffs) if diffs else None
        if name == "curve-1gpu-seed2":
            noise = mean_d
        last10 = [losses[i] for i in sorted(losses)[-10:]]
        valid = s.get("valid") or []
        events = s.get("oscireset_events") or []
        resets = f"{len({e['update'] for e in events})} windows, {sum(int(e['reset']) for e in events)} weights"
        st = status.get(name, "complete" if finished(a.out, name, SIZES["curves"]["cpu" if a.cpu else "gpu"]["steps"])
                        else "cut short")
        if not finite:
            st += ", NaN/Inf"
        lines.append(f"| {name} | {st} | {max(losses)} | {sum(last10) / len(last10):.4f} | "
                     f"{valid[-1][1]:.4f} | " if valid else f"| {name} | {st} | {max(losses)} | "
                     f"{sum(last10) / len(last10):.4f} | - | ")
        lines[-1] += ("-" if name == "curve-1gpu" or mean_d is None else f"{mean_d:.4f}") + " | " + \
                     ("-" if name == "curve-1gpu" or not diffs else f"{max(diffs):.4f}") + f" | {resets} |"
    verdicts = []
    if noise is not None:
        for name in ("curve-pp2", "curve-pp2-vpp2", "curve-dp2-distopt"):
            s = load_summary(a.out, name)
            if s is None or ref is None:
                continue
            w = _window_means(dict(s["losses"]))
            common = sorted(set(w) & set(ref_w))
            if not common:
                continue
            d = sum(abs(w[i] - ref_w[i]) for i in common) / len(common)
            verdicts.append(f"{name}: mean |diff| {d:.4f} vs seed-to-seed {noise:.4f}: "
                            + ("within noise" if d <= noise else "NOT within noise"))
    return lines + [""] + [f"- {v}" for v in verdicts]


def plot_curves(a) -> None:
    """<out>/curves.png: the curves stage's training losses (10-step means) in every layout."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:          # matplotlib is optional
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name in ("curve-1gpu", "curve-1gpu-seed2", "curve-pp2", "curve-pp2-vpp2", "curve-dp2-distopt"):
        s = load_summary(a.out, name)
        if s is None or not s["losses"]:
            continue
        w = _window_means(dict(s["losses"]))
        ax.plot(list(w), list(w.values()), marker="o", ms=2, lw=1, label=name)
        drawn = True
    if drawn:
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (10-step mean)")
        ax.set_title("tetrajet2-full in every layout")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(a.out, "curves.png"), dpi=120)
    plt.close(fig)


def grads_table(a) -> list:
    import torch

    from megatron_fp4.megatron.diagnostics import compare_gradients

    def dump(name):
        path = os.path.join(a.out, name, "grads.pt")
        return torch.load(path, weights_only=False) if os.path.exists(path) else None

    lines = ["| comparison (first-step gradients, TP=1 layout) | relative L2 difference, all gradients "
             "| worst tensor (relative L2) |", "|---|---|---|"]
    results = {}
    pairs = [("split", "bf16: TP=2+SP vs TP=1", "grads-tp1-bf16", "grads-tp2-bf16"),
             ("split", "quartet2: TP=2+SP vs TP=1", "grads-tp1-quartet2", "grads-tp2-quartet2"),
             ("ulp", "quartet2: TP=1, weights x (1 + 2^-22)", "grads-tp1-quartet2", "grads-tp1-quartet2-plus-ulp"),
             ("ulp", "quartet2: TP=1, weights x (1 - 2^-22)", "grads-tp1-quartet2", "grads-tp1-quartet2-minus-ulp"),
             ("draws", "quartet2: TP=1, other random draws (recipe seed)", "grads-tp1-quartet2",
              "grads-tp1-quartet2-draws")]
    dumps = {}
    for kind, label, x, y in pairs:
        dx, dy = dumps.setdefault(x, dump(x)), dumps.setdefault(y, dump(y))
        if dx is None or dy is None:
            lines.append(f"| {label} | missing | |")
            continue
        r = compare_gradients(dx, dy)
        results[label] = (kind, r)
        lines.append(f"| {label} | {r['relative_l2']:.3e} | {r['worst_tensor']} ({r['worst_tensor_relative_l2']:.3e}) |")
    notes = []
    one, two = dumps.get("grads-tp1-quartet2"), dumps.get("grads-tp2-quartet2")
    keys_equal = None
    if one is not None and two is not None:
        keys_equal = one.get("keys") == two.get("keys") and bool(one.get("keys"))
        notes.append(f"random-stream keys of the {len(one.get('keys', {}))} quantized layers at TP=1 and TP=2: "
                     + ("identical" if keys_equal else "DIFFERENT"))
    split = results.get("quartet2: TP=2+SP vs TP=1", (None, None))[1]
    draws = results.get("quartet2: TP=1, other random draws (recipe seed)", (None, None))[1]
    ulps = [r["relative_l2"] for kind, r in results.values() if kind == "ulp"]
    if split and draws and ulps and keys_equal is not None:
        envelope = max(ulps)
        bound = max(envelope, 0.1 * draws["relative_l2"])
        ok = keys_equal and split["relative_l2"] <= bound
        notes.append(f"quartet2 TP=2 vs TP=1: {split['relative_l2']:.3e}; last-bit perturbations at TP=1: up to "
                     f"{envelope:.3e}; other draws: {draws['relative_l2']:.3e} -> "
                     + ("PASS (same keys; the split changes the gradients no more than a last-bit difference does, "
                        "or less than a tenth of a change of draws)" if ok else "FAIL"))
    return lines + [""] + [f"- {n}" for n in notes]


def write_results(a, status: dict) -> str:
    device = "CPU (gloo, 2 ranks)" if a.cpu else _device_name()
    parts = [f"Device: {device}. Command: `python -m benchmarks.multi_gpu --out {a.out}"
             + (" --cpu" if a.cpu else "") + "`" + (" (CPU sizes: code paths only, no performance meaning)" if a.cpu else ""),
             "", "**1. TP=2 + sequence parallel vs TP=1** (" + _size_text("tp", a) + ", mock data)", "", *tp_table(a),
             "", "**2. Loss curves, tetrajet2-full** (" + _size_text("curves", a) + ", default corpus)", "",
             *curves_table(a, status),
             "", "**3. First-step gradients, TP=1 vs TP=2+SP** (" + _size_text("grads", a) + ")", "", *grads_table(a)]
    table = "\n".join(parts)
    plot_curves(a)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(table + "\n")
    if a.results_md:
        put_marked_block(a.results_md, "multi-gpu", table, "## Multi-GPU runs (multi-GPU issue)")
    return table


def _size_text(stage, a) -> str:
    z = SIZES[stage]["cpu" if a.cpu else "gpu"]
    params = z["layers"] * (4 * z["hidden"] ** 2 + 3 * z["hidden"] * z["ffn"])
    return (f"{z['layers']} layers x {z['hidden']}, SwiGLU {z['ffn']}, {z['heads']} heads, vocab {z['vocab']}: "
            f"{params / 1e6:.1f}M non-embedding parameters; seq {z['seq']}, micro-batch {z['mbs']}, "
            f"global batch {z['gbs']}, {z['steps']} steps")


def parse_stages(text: str) -> tuple:
    """'all' or a comma-separated list of stages, in the order of STAGES."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if names == ["all"]:
        return STAGES
    unknown = [n for n in names if n not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {unknown or text!r}: choose all or from {', '.join(STAGES)}")
    return tuple(n for n in STAGES if n in names)


def _device_name() -> str:
    try:
        import torch
        n = torch.cuda.device_count()
        return f"{n} x {torch.cuda.get_device_name(0)}" if n else "no GPU"
    except Exception:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/multi_gpu")
    p.add_argument("--stage", type=parse_stages, default=STAGES, metavar="all|" + "|".join(STAGES) + "[,...]",
                   help="the stages to run: all (the default) or a comma-separated list, e.g. curves,grads")
    p.add_argument("--cpu", action="store_true", help="2 CPU ranks with gloo and tiny sizes (exercises the code)")
    p.add_argument("--skip-tp1", action="store_true", help="no TP=1 reference runs in the tp stage")
    p.add_argument("--single-gpu", action="store_true",
                   help="only the one-rank runs (references and controls), on one GPU; the table marks the rest missing")
    p.add_argument("--serial", action="store_true", help="one run at a time even when GPUs are free")
    p.add_argument("--share-gpu", action="store_true",
                   help="one-rank runs side by side on the same GPU (curves and grads only: their losses and "
                        "gradients do not depend on it; step times would, so the tp stage refuses it)")
    p.add_argument("--timeout", type=float, default=540, help="seconds per run; a run past it counts as hung")
    p.add_argument("--force", action="store_true", help="rerun finished runs")
    p.add_argument("--results-md", default=None, help="also put the table into this markdown file")
    a = p.parse_args(argv)
    if a.share_gpu and "tp" in a.stage:
        p.error("--share-gpu: the tp stage measures step times, which runs sharing a GPU would distort")
    os.makedirs(a.out, exist_ok=True)
    gpus = 0
    if not a.cpu:
        import torch
        gpus = torch.cuda.device_count()
        if gpus < 1 or (gpus < 2 and not a.single_gpu):
            raise SystemExit(f"multi_gpu.py needs 2 GPUs (found {gpus}); --single-gpu makes the one-rank runs "
                             "on one GPU, --cpu runs everything on CPU ranks")
    stages = a.stage
    if "curves" in stages:
        from megatron_fp4.data import corpus
        corpus.ensure(os.path.join(a.out, "corpus"))
    todo = []
    for stage in stages:
        steps = SIZES[stage]["cpu" if a.cpu else "gpu"]["steps"]
        for name, nproc, via, flags in runs_for(stage, a):
            if a.single_gpu and nproc > 1:
                print(f"{name}: needs {nproc} GPUs, left for a 2-GPU machine", flush=True)
                continue
            if not a.force and finished(a.out, name, steps):
                print(f"{name}: finished earlier, skipped", flush=True)
                continue
            todo.append((name, nproc, via, flags, steps))
    status = execute(todo, a, gpus)
    table = write_results(a, status)
    print(table, flush=True)
    return status


if __name__ == "__main__":
    main()
