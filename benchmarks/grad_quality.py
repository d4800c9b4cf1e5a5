"""Gradient quality of each recipe at one trained model state (CPU; the training-quality issue's
investigation of the recipe order).

    .venv/bin/python -m benchmarks.grad_quality --out runs/grad_quality [--train-steps 200] [--draws 8]

A small Llama-style GPT (the main job's shape, SwiGLU) is trained in FP32 (`bf16` recipe: no
quantization) on the default corpus for --train-steps steps. At that state, on fixed held-out batches,
every recipe computes the full gradient with --draws different recipe seeds (other random draws, same
weights and data); the FP32 gradient is the reference. Per recipe, over the four quantized block
linears' weight gradients (and over all gradients):

- error of one draw: ||g_d - g|| / ||g|| (mean over draws), what one training step sees;
- noise: the draws' spread around their own mean, sqrt(mean_d ||g_d - mean||^2) / ||g||;
- bias: ||mean - g|| / ||g|| with the expected share of noise removed (noise^2 / draws), i.e. what
  averaging many steps would not remove (forward quantization, clipping, scale bias);
- cosine similarity of one draw with g;
- the loss of the recipe's (quantized) forward pass minus the FP32 loss on the same batches: what
  forward quantization alone adds to a validation loss at these weights.

Writes <out>/table.md and <out>/results.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os

MODEL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4, seq_length=128,
             micro_batch_size=8, num_microbatches=1, swiglu=True)
VARIANTS = [  # (label, recipe, overrides)
    ("nvidia", "nvidia", {}),
    ("tetrajet2", "tetrajet2", {}),
    ("tetrajet2, RHT-32 + 16/17 headroom (Quartet II repo's re-implementation)", "tetrajet2",
     {"rht_size": 32, "sr_headroom": 17 / 16}),
    ("quartet2-no46", "quartet2-no46", {}),
    ("quartet2", "quartet2", {}),
]
QUANTIZED = ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "linear_fc2.weight")


def _loss(model, batch):
    import torch
    out = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"]
    return torch.sum(out.float().view(-1) * mask.view(-1)) / mask.sum()


def _gradients(model, batches, losses: list = None) -> dict:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for b in batches:
        loss = _loss(model, b) / len(batches)
        loss.backward()
        total += loss.item()
    if losses is not None:
        losses.append(total)
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank, world, corpus, train_steps, draws, eval_batches, variants, log_every):
    import torch

    from megatron_fp4.data.corpus import load_tokens
    from megatron_fp4.megatron import driver
    from megatron_fp4.pretrain_gpt import _windows
    s = driver.GPTSettings(**MODEL, recipe="bf16", lr=2e-3, min_lr=2e-4, warmup_steps=max(1, train_steps // 10),
                           train_steps=max(train_steps, 1), weight_decay=0.1)
    driver.initialize_parallel(s)
    chunks, config = driver.build_model(s)
    optimizer, scheduler = driver.build_optimizer(s, chunks)
    driver.setup_model_hooks(config, chunks, optimizer)
    train = _windows(load_tokens(os.path.join(corpus, "train")), s, s.seed)
    for it in range(train_steps):
        loss, _ = driver.train_step(s, chunks, optimizer, scheduler, [train], it)
        if (it + 1) % log_every == 0 or it == 0:
            print(f"  FP32 training step {it + 1}/{train_steps}: loss {loss:.4f}", flush=True)
    state = {k: v.detach().clone() for k, v in chunks[0].module.state_dict().items() if torch.is_tensor(v)}
    valid = _windows(load_tokens(os.path.join(corpus, "valid")), s, 4321)
    batches = [next(valid) for _ in range(eval_batches)]

    def model_for(recipe, overrides):
        cfg = driver.transformer_config(driver.GPTSettings(**MODEL, recipe=recipe, recipe_overrides=overrides))
        models, _ = driver.build_model(s, config=cfg, wrap_ddp=False)
        missing, unexpected = models[0].load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("decoder.layers") or "nvfp4" not in k for k in missing):
            raise RuntimeError(f"state does not fit {recipe}: missing {missing[:4]}, unexpected {unexpected[:4]}")
        return models[0]

    from megatron_fp4.megatron import state as mstate
    mstate.set_iteration(0)
    ref_loss = []
    reference = _gradients(model_for("bf16", {}), batches, ref_loss)
    results = {}
    for label, recipe, overrides in variants:
        per_draw, losses = [], []
        for d in range(draws):
            mstate.set_iteration(0)
            per_draw.append(_gradients(model_for(recipe, dict(overrides, seed=1000 + d)), batches, losses))
        results[label] = _metrics(reference, per_draw)
        # the loss of the quantized forward (deterministic RTN: the same for every draw) minus FP32's:
        # what forward quantization alone adds to a validation loss at these weights
        results[label]["forward_loss_gap"] = sum(losses) / len(losses) - ref_loss[0]
        r = results[label]["quantized linears"]
        print(f"  {label}: one draw {r['error_one_draw']:.4f}, noise {r['noise']:.4f}, bias {r['bias']:.4f}, "
              f"cosine {r['cosine_one_draw']:.4f}, forward loss gap {results[label]['forward_loss_gap']:+.4f}",
              flush=True)
    return {"results": results, "train_loss_last": loss}


def _metrics(reference: dict, draws: list) -> dict:
    import torch
    groups = {"quantized linears": [n for n in reference if n.endswith(QUANTIZED)], "all gradients": list(reference)}
    out = {}
    k = len(draws)
    for group, names in groups.items():
        g = torch.cat([reference[n].flatten() for n in names])
        gs = [torch.cat([d[n].flatten() for n in names]) for d in draws]
        mean = torch.stack(gs).mean(0)
        norm = g.norm().item()
        one = [(x - g).norm().item() / norm for x in gs]
        noise2 = sum((x - mean).pow(2).sum().item() for x in gs) / max(k - 1, 1)   # unbiased spread
        bias2 = max((mean - g).pow(2).sum().item() - noise2 / k, 0.0)
        cos = [torch.nn.functional.cosine_similarity(x, g, dim=0).item() for x in gs]
        out[group] = {"error_one_draw": sum(one) / k, "noise": math.sqrt(noise2) / norm,
                      "bias": math.sqrt(bias2) / norm, "cosine_one_draw": sum(cos) / k,
                      "error_of_mean": (mean - g).norm().item() / norm, "draws": k}
    return out


def table(res: dict, a) -> str:
    lines = [f"Model: {MODEL['num_layers']} layers x {MODEL['hidden_size']}, SwiGLU {MODEL['ffn_hidden_size']}, seq "
             f"{MODEL['seq_length']}; trained {a.train_steps} FP32 steps of {MODEL['micro_batch_size']} sequences on the "
             f"default corpus; gradients on {a.eval_batches} held-out batches, {a.draws} draws per recipe; reference: "
             "the FP32 gradient. Relative to ||g|| over the four block linears' weight gradients "
             "(all gradients in parentheses).", "",
             "| recipe | error of one draw | noise (draw spread) | bias (after removing noise/draws) | cosine with g "
             "| forward loss - FP32 loss |",
             "|---|---|---|---|---|---|"]
    for label, r in res.items():
        q, al = r["quantized linears"], r["all gradients"]
        lines.append(f"| {label} | {q['error_one_draw']:.4f} ({al['error_one_draw']:.4f}) | {q['noise']:.4f} "
                     f"({al['noise']:.4f}) | {q['bias']:.4f} ({al['bias']:.4f}) | {q['cosine_one_draw']:.4f} | "
                     f"{r['forward_loss_gap']:+.4f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grad_quality")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=2)
    p.add_argument("--only", nargs="*", help="labels of the variants to measure (default: all)")
    a = p.parse_args(argv)
    if a.draws < 2:
        p.error("--draws must be at least 2 (the noise is the spread between draws)")
    os.makedirs(a.out, exist_ok=True)
    from megatron_fp4.data.corpus import ensure
    corpus = os.path.join(a.out, "corpus")
    ensure(corpus)
    variants = [v for v in VARIANTS if not a.only or v[0] in a.only]
    from megatron_fp4.testing import dist

    from benchmarks import grad_quality as me
    res = dist.run(me.worker, 1, corpus, a.train_steps, a.draws, a.eval_batches, variants,
                   max(1, a.train_steps // 5), timeout=3600, threads=os.cpu_count() or 1)[0]
    text = table(res["results"], a)
    with open(os.path.join(a.out, "table.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print(text, flush=True)


if __name__ == "__main__":
    main()
