"""GPTSettings for the multi-rank tests: the small, short runs these tests are sized for (ffn 1024,
micro-batch 2, lr 3e-3 with 10 warm-up steps over a 100-step schedule), on top of which each test sets
its model. The main job's own defaults (megatron_fp4/defaults.py) are for a real run."""

SMALL_RUN = dict(ffn_hidden_size=1024, micro_batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=10, train_steps=100)


def settings(**kwargs):
    from megatron_fp4.megatron import driver
    return driver.GPTSettings(**{**SMALL_RUN, **kwargs})
