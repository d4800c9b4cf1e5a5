"""What hooks the plugin into Megatron (installed as megatron_fp4.patches).

`apply_all()` applies every patch: the --nvfp4-* flags and the plugin's start-time checks in
Megatron's argument validation (megatron_args), the training-loop hooks (megatron_training:
optimizer stabilizers after setup, prebuilt dataset helpers), and spec functions on every
model-builder path (megatron_model).
"""


def apply_all() -> None:
    from . import megatron_args, megatron_model, megatron_training
    megatron_args.apply()
    megatron_training.apply()
    megatron_model.apply()
