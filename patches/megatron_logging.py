"""megatron.training.training's logging and evaluation: what the GPU route's run history records.

`training_log` runs once per iteration with the reduced losses; `evaluate` returns the validation
losses (the same function serves the final test-set evaluation, told apart by the prefix that
`evaluate_and_print_results` passes). `install(on_iteration, on_validation)` wraps the three module
attributes, which `train()` and `pretrain()` look up at call time:

- `on_iteration(loss_dict, iteration, learning_rate)` before Megatron's own `training_log`;
- `on_validation(total_loss_dict)` after each validation (never for the test set);
- `after_iteration(iteration)` after Megatron's `training_log` (its log line printed), optional.

Written for megatron-core 0.19 (`megatron.training.training.training_log`, `evaluate`,
`evaluate_and_print_results`); each wrapper keeps the original as `__wrapped__`.
"""
from __future__ import annotations


def install(on_iteration, on_validation, after_iteration=None) -> None:
    from megatron.training import training
    original_log = training.training_log
    original_evaluate = training.evaluate
    original_print = training.evaluate_and_print_results
    context = {"prefix": ""}

    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs):
        on_iteration(loss_dict, iteration, learning_rate)
        result = original_log(loss_dict, total_loss_dict, learning_rate, iteration, *args, **kwargs)
        if after_iteration is not None:
            after_iteration(iteration)
        return result

    def evaluate_and_print_results(prefix, *args, **kwargs):
        context["prefix"] = str(prefix)          # "iteration N on test set" for the final test evaluation
        try:
            return original_print(prefix, *args, **kwargs)
        finally:
            context["prefix"] = ""

    def evaluate(*args, **kwargs):
        result = original_evaluate(*args, **kwargs)
        total_loss_dict = result[0] if isinstance(result, tuple) else None
        if total_loss_dict and "test set" not in context["prefix"]:
            on_validation(total_loss_dict)
        return result

    for wrapper, original in ((training_log, original_log), (evaluate, original_evaluate),
                              (evaluate_and_print_results, original_print)):
        wrapper.__wrapped__ = original
    training.training_log = training_log
    training.evaluate = evaluate
    training.evaluate_and_print_results = evaluate_and_print_results
