"""How far FP4 training amplifies last-bit weight differences (CPU, gloo, one rank): the driver's
small GPT trained a few steps as is and with every initial 2-D weight scaled by (1 + 2^-22), i.e. a
one-ulp-scale perturbation like the FP32 reduction-order differences between TP=1 and TP=2. The
grad-norm differences per step set the tolerance of the TP-parity tests after step 1
(tests/megatron/test_megatron_integration.py).

    .venv/bin/python -m benchmarks.fp4_perturbation [--recipe quartet2] [--steps 5]
"""
import argparse

SMALL = dict(num_layers=2, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4, seq_length=64,
             micro_batch_size=2, num_microbatches=2)


def train(rank, world, settings, steps, scale):
    import torch
    from megatron_fp4.megatron import driver
    build = driver.build_model

    def scaled_build(s):
        chunks, config = build(s)
        with torch.no_grad():
            for p in chunks[0].parameters():
                if p.dim() == 2:
                    p.mul_(scale)
        return chunks, config

    driver.build_model = scaled_build
    s = driver.GPTSettings(**settings)
    s.train_steps = steps
    return driver.run_training(s)["grad_norms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", default="quartet2")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    from megatron_fp4.testing import dist
    from benchmarks import fp4_perturbation as me
    settings = dict(SMALL, recipe=a.recipe)
    base = dist.run(me.train, 1, settings, a.steps, 1.0, timeout=600)[0]
    pert = dist.run(me.train, 1, settings, a.steps, 1.0 + 2.0 ** -22, timeout=600)[0]
    print(f"recipe {a.recipe}: relative grad-norm difference per step, weights x (1 + 2^-22)")
    for i, (x, y) in enumerate(zip(base, pert), 1):
        print(f"step {i}: {x:.7f} vs {y:.7f}  rel {abs(x - y) / x:.1e}")


if __name__ == "__main__":
    main()
