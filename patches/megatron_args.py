"""Register the plugin's --mfp4-* flags with Megatron's own argument parser.

`megatron.training.arguments.parse_args` looks `add_megatron_arguments` up at call time, so wrapping
it makes any Megatron entry point (e.g. a Megatron-LM checkout's pretrain_gpt.py) accept the flags.
"""
from __future__ import annotations

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.training import arguments

    from megatron_fp4.pretrain_gpt import add_plugin_args
    original = arguments.add_megatron_arguments

    def add_megatron_arguments(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        if not any(a.dest == "mfp4_recipe" for a in parser._actions):
            add_plugin_args(parser)
        return parser

    add_megatron_arguments.__wrapped__ = original
    arguments.add_megatron_arguments = add_megatron_arguments
    _applied = True
