"""Hooks into `megatron.training.training` for the plugin's launcher (and any Megatron entry point).

- `setup_model_and_optimizer` is wrapped so that, once the model, the optimizer and any resumed
  checkpoint exist, the recipe's optimizer-side stabilizers (OsciReset) are installed with the
  resumed iteration. `pretrain()` looks the function up in its module at call time, so replacing the
  module attribute is enough. (Wrapping `get_megatron_optimizer` would run before the checkpoint load,
  when the resumed iteration is not known yet.)
- After a resume each rank's OsciReset state (update counter, in-window buffers), which the checkpoint
  save writes beside Megatron's files (patches/megatron_checkpoint.py), is read back, so a run resumed
  mid-window continues as the uninterrupted run would. (OutControl's state is in the model's state
  dict already.)
- With `--nvfp4-perturb-init EPS` the same hook scales the initial weight matrices by (1 + EPS); with
  `--nvfp4-dump-grads PATH` it wraps the first optimizer step to write the reduced
  gradients at the TP=1 layout (megatron_fp4/megatron/diagnostics.py).
- `megatron.core.datasets.utils.compile_helpers` runs `make` in the package directory; the PyPI wheel
  ships the compiled `helpers_cpp` but no Makefile, so `initialize_megatron` would exit. The wrapper
  skips the build when the compiled helpers import.
"""
from __future__ import annotations

_applied = False


def _install_after_setup(model, optimizer) -> None:
    from megatron.training import get_args

    from megatron_fp4.megatron.optimizer_hooks import install_stabilizers
    args = get_args()
    train_iters = args.train_iters
    if not train_iters and getattr(args, "train_samples", None):
        train_iters = args.train_samples // args.global_batch_size
    iteration = int(getattr(args, "iteration", 0) or 0)
    hooks = install_stabilizers(optimizer, model, int(train_iters or 0), iteration)
    if getattr(args, "nvfp4_recipe", None):   # what runs where (issue #19): rank 0 logs it, --save gets precision.json
        from megatron_fp4.megatron.precision import announce
        announce(model, args.seq_length * args.micro_batch_size // (getattr(args, "context_parallel_size", 1) or 1),
                 getattr(args, "save", None))
    if getattr(args, "nvfp4_perturb_init", 0.0):
        from megatron_fp4.megatron.diagnostics import perturb_initial_weights
        perturb_initial_weights(model, optimizer, args.nvfp4_perturb_init)
    if getattr(args, "nvfp4_dump_grads", None):
        from megatron_fp4.megatron.diagnostics import install_first_step_grad_dump
        install_first_step_grad_dump(optimizer, model, args.nvfp4_dump_grads, bool(args.swiglu))
    if hooks is not None and iteration > 0 and getattr(args, "load", None):
        from megatron_fp4.megatron.optimizer_hooks import load_oscireset_state
        load_oscireset_state(optimizer, _iteration_dir(args.load, iteration), iteration)


def _iteration_dir(root: str, iteration: int) -> str:
    import os
    return os.path.join(root, "iter_{:07d}".format(iteration))   # Megatron's checkpoint layout


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.core.datasets import utils as dataset_utils
    from megatron.training import training

    original_setup = training.setup_model_and_optimizer

    def setup_model_and_optimizer(*args, **kwargs):
        model, optimizer, scheduler = original_setup(*args, **kwargs)
        if optimizer is not None:          # --skip-train builds no optimizer
            _install_after_setup(model, optimizer)
        return model, optimizer, scheduler

    setup_model_and_optimizer.__wrapped__ = original_setup
    training.setup_model_and_optimizer = setup_model_and_optimizer

    original_compile = dataset_utils.compile_helpers

    def compile_helpers():
        try:
            from megatron.core.datasets import helpers_cpp  # noqa: F401  (prebuilt in the wheel)
        except ImportError:
            return original_compile()
        return None

    compile_helpers.__wrapped__ = original_compile
    dataset_utils.compile_helpers = compile_helpers
    _applied = True
