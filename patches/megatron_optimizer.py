"""The optimizer step of megatron.core.optimizer instances: where the stabilizers and the first-step
gradient dump run.

Megatron's `MegatronOptimizer.step()` unscales and clips the gradients, calls
`step_with_ready_grads()` (the inner optimizer updates the main parameters, then mixed-precision
optimizers copy them into the model's parameters with `_copy_main_params_to_model_params`), and returns
(success, grad norm, zeros). The plugin hooks the instance, never the class:

- `wrap_step(optimizer, around)`: `optimizer.step(...)` becomes `around(original_step, ...)` (a
  ChainedOptimizer's step too);
- `once_before_step(optimizer, fn)`: `fn()` before the next step only; the optimizer's own `step` is
  put back at that call;
- `after_member_update(member, fn)`: `fn()` runs inside one member optimizer's step after its main
  parameters are updated and before they are copied to the model (FP32Optimizer, whose parameters are
  the masters: after its step).

Written for megatron-core 0.19 (`step`, `step_with_ready_grads`, `_copy_main_params_to_model_params`).
"""
from __future__ import annotations


def wrap_step(optimizer, around) -> None:
    original = optimizer.step

    def step(*args, **kwargs):
        return around(original, *args, **kwargs)

    step.__wrapped__ = original
    optimizer.step = step


def once_before_step(optimizer, fn) -> None:
    original = optimizer.step

    def step(*args, **kwargs):
        optimizer.step = original
        fn()
        return original(*args, **kwargs)

    step.__wrapped__ = original
    optimizer.step = step


def after_member_update(member, fn) -> None:
    original_step = member.step_with_ready_grads
    copies = hasattr(member, "_copy_main_params_to_model_params")
    in_step = {"flag": False}

    def step_with_ready_grads(*args, **kwargs):
        in_step["flag"] = True
        try:
            result = original_step(*args, **kwargs)
        finally:
            in_step["flag"] = False
        if not copies:
            fn()                      # FP32Optimizer: the params are the masters
        return result

    step_with_ready_grads.__wrapped__ = original_step
    member.step_with_ready_grads = step_with_ready_grads
    if copies:
        original_copy = member._copy_main_params_to_model_params

        def copy_main_params_to_model_params(*args, **kwargs):
            if in_step["flag"]:
                fn()
            return original_copy(*args, **kwargs)

        copy_main_params_to_model_params.__wrapped__ = original_copy
        member._copy_main_params_to_model_params = copy_main_params_to_model_params
