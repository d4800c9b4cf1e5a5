"""Everything the plugin patches in Megatron and torch (installed as megatron_fp4.patches), one module
per patched target. Written for megatron-core >= 0.19, < 0.20 (setup.py pins it) and torch >= 2.4;
each module names the attributes it replaces, and every wrapper keeps the original as `__wrapped__`.

| module | patched target | why | applied by |
|---|---|---|---|
| megatron_args | `megatron.training.arguments.add_megatron_arguments`, `validate_args`; `argparse.ArgumentParser.error` while the launcher parses | the `--nvfp4-*` flags in Megatron's parser; the plugin's checks before Megatron's argument table; the plugin spec and `--transformer-impl local` set by install(); one-line parser errors | apply_all, launcher (GPU) |
| megatron_model | `megatron.core.transformer.transformer_block._get_block_submodules` | a spec *function* on Megatron-LM's `gpt_builders.gpt_builder` path ("specialize for function.") | apply_all |
| megatron_training | `megatron.training.training.setup_model_and_optimizer`; `megatron.core.datasets.utils.compile_helpers` | stabilizers (OsciReset) once the optimizer and resumed iteration exist, OsciReset state read back on resume, diagnostics hooks; no `make` of the prebuilt dataset helpers | apply_all, launcher (GPU) |
| megatron_checkpoint | `megatron.training.checkpointing.save_checkpoint` (and `training.save_checkpoint`), `get_checkpoint_name`, `get_checkpoint_tracker_filename` during a save | atomic saves (partial folder renamed when complete, tracker replaced after) with each rank's OsciReset state inside | apply_all, launcher (GPU) |
| megatron_logging | `megatron.training.training.training_log`, `evaluate`, `evaluate_and_print_results` | the GPU route's run history (loss, step time, memory, validation) for summary.json and the plot | launcher (GPU) |
| megatron_optimizer | instance methods `step`, `step_with_ready_grads`, `_copy_main_params_to_model_params` of megatron.core optimizers | OsciReset after the main-parameter update; the first-step gradient dump | stabilizer and diagnostics set-up (both routes) |
| megatron_tensor_parallel | `megatron.core.tensor_parallel.layers._grad_accum_fusion_available` during the plugin linears' `__init__` | the plugin's linears fuse wgrad into `main_grad` themselves (no apex kernel needed) | the plugin's TP layers |
| megatron_dist_checkpointing | `megatron.core.dist_checkpointing.strategies.filesystem_async._results_queue` | a thread queue instead of a Manager process for the CPU route's synchronous saves | CPU-route checkpoints |
| torch_collectives | `torch.distributed` collectives and Megatron's import-time bindings of them | `--nvfp4-count-collectives` | both routes, when asked |
| torch_cpu | `torch.cuda` functions, tensor factories, `Tensor.type`, Megatron's CUDA RNG helpers | megatron-core on CPU with gloo (the CPU route and the tests) | CPU route, tests |

`apply_all()` is what `megatron_fp4.install()` runs in a Megatron-LM checkout.
"""


def apply_all() -> None:
    from . import megatron_args, megatron_checkpoint, megatron_model, megatron_training
    megatron_args.apply()
    megatron_training.apply()
    megatron_checkpoint.apply()
    megatron_model.apply()
