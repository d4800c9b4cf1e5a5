"""What hooks the plugin into Megatron (installed as megatron_fp4.patches).

`apply_all()` applies every patch: the --mfp4-* flags (megatron_args) and the training-loop hooks
(megatron_training: optimizer stabilizers after setup, prebuilt dataset helpers).
"""


def apply_all() -> None:
    from . import megatron_args, megatron_training
    megatron_args.apply()
    megatron_training.apply()
