"""The plugin's --nvfp4-* flags in Megatron's own argument parser, and its start-time checks.

- `megatron.training.arguments.parse_args` looks `add_megatron_arguments` up at call time, so wrapping
  it makes any Megatron entry point (e.g. a Megatron-LM checkout's pretrain_gpt.py) accept the flags.
  Registered this way `--nvfp4-recipe` has no default: without it install() leaves Megatron's stock
  layers alone (and refuses the other plugin flags, which would do nothing). The launcher's own parser
  (pretrain_support.add_launcher_args) defaults to quartet2.
- `parse_and_validate_args` looks `validate_args` up at call time too; the wrapper runs the plugin's
  checks first (megatron_fp4/megatron/validate.py), so a mistake is reported before Megatron prints
  its argument table. With a recipe set in a Megatron-LM checkout (install()) it also
    * installs the plugin spec: `--spec megatron_fp4.spec gpt_layer_spec` when --spec is absent (any
      other --spec is refused: its linears would not run the recipe);
    * switches Megatron's default `--transformer-impl transformer_engine` to `local` when the flag is
      not on the command line (given explicitly, it is refused);
  and after Megatron's checks it logs the recipe and the linears kept in BF16 (global rank 0).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from megatron_fp4.errors import DEBUG_ENV, DEBUG_FLAG

_applied = False

DEFAULT_RECIPE = "quartet2"      # the launcher's; install() in a Megatron-LM checkout has none (stock layers)


def add_plugin_args(parser: argparse.ArgumentParser, default_recipe: Optional[str] = DEFAULT_RECIPE
                    ) -> argparse.ArgumentParser:
    g = parser.add_argument_group("megatron_fp4")
    g.add_argument("--nvfp4-recipe", default=default_recipe,
                   help="NVFP4 recipe: built-in name (" + ", ".join(_recipe_names()) + ") or YAML path"
                        + (f" (default {default_recipe})" if default_recipe else
                           " (required for the plugin; it installs the plugin spec)"))
    g.add_argument("--nvfp4-override", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe knob (repeatable); VALUE is parsed as YAML")
    g.add_argument("--nvfp4-bf16-modules", default="",
                   help="comma-separated fnmatch patterns of linears kept in BF16, e.g. "
                        "'decoder.layers.0.*,*.linear_fc2' (each must match a linear)")
    g.add_argument("--nvfp4-attention", choices=("sdpa", "megatron"), default="sdpa",
                   help="core attention of the plugin spec: sdpa (torch scaled_dot_product_attention: flash / "
                        "memory-efficient kernels, default) or megatron (Megatron's unfused DotProductAttention)")
    g.add_argument("--nvfp4-bf16-from", type=float, default=None, metavar="ITER|FRACTION",
                   help="late precision switch: from this iteration on (or this fraction of --train-iters, e.g. "
                        "0.9) the plugin linears run in BF16 (resume-safe: a function of the iteration)")
    g.add_argument("--nvfp4-bf16-from-scope", choices=("all", "forward"), default="all",
                   help="what --nvfp4-bf16-from switches: all GEMMs (default) or only the forward GEMM")
    g.add_argument(DEBUG_FLAG, action="store_true",
                   help=f"show the full traceback of a user error (also {DEBUG_ENV}=1); by default it is one line")
    return parser


def _recipe_names() -> list:
    from megatron_fp4.registry import available_recipes
    return available_recipes()


PLUGIN_SPEC = ["megatron_fp4.spec", "gpt_layer_spec"]


def _on_command_line(flag: str) -> bool:
    """Megatron's parse_args reads sys.argv."""
    return any(a == flag or a.startswith(flag + "=") for a in sys.argv[1:])


def _launcher(args) -> bool:
    """Parsed with the launcher's flags (pretrain_support.add_launcher_args adds --nvfp4-corpus-dir)."""
    return hasattr(args, "nvfp4_corpus_dir")


def prepare_args(args):
    """The plugin's part of Megatron's argument validation (before Megatron's own). Returns
    (RunPlan, notes) when a plugin recipe is set, else None. Raises UsageError / RecipeError."""
    from megatron_fp4.errors import UsageError
    from megatron_fp4.megatron.validate import check_data_paths, validate_run

    launcher = _launcher(args)
    spec = list(args.spec) if getattr(args, "spec", None) else None
    if launcher and not args.nvfp4_recipe:
        args.nvfp4_recipe = DEFAULT_RECIPE
    if not args.nvfp4_recipe:
        stray = [f for f, v in (("--nvfp4-override", args.nvfp4_override), ("--nvfp4-bf16-modules", args.nvfp4_bf16_modules))
                 if v]
        for flag in ("--nvfp4-attention", "--nvfp4-bf16-from", "--nvfp4-bf16-from-scope"):
            if _on_command_line(flag):
                stray.append(flag)
        if spec == PLUGIN_SPEC:
            stray.append("--spec megatron_fp4.spec gpt_layer_spec")
        if stray:
            raise UsageError(f"{stray[0]} needs --nvfp4-recipe NAME|PATH (without a recipe Megatron's stock layers "
                             "run and it would do nothing); add e.g. --nvfp4-recipe quartet2")
        return None
    notes = []
    if launcher:
        if spec:
            raise UsageError(f"--spec {' '.join(spec)}: the launcher sets the layer spec itself "
                             "(megatron_fp4.spec.gpt_layer_spec); drop --spec")
    else:
        if spec is None:
            args.spec = list(PLUGIN_SPEC)
            notes.append("--spec megatron_fp4.spec gpt_layer_spec set by install()")
        elif spec != PLUGIN_SPEC:
            raise UsageError(f"--spec {' '.join(spec)}: with --nvfp4-recipe the linears must come from the plugin "
                             "spec, or they would not run the recipe; drop --spec (install() sets it) or pass "
                             "--spec megatron_fp4.spec gpt_layer_spec")
        if getattr(args, "transformer_impl", "local") != "local" and not _on_command_line("--transformer-impl"):
            notes.append(f"--transformer-impl local set by install() (Megatron's default is {args.transformer_impl})")
            args.transformer_impl = "local"
    world = getattr(args, "world_size", None) or int(os.environ.get("WORLD_SIZE", "1"))
    plan = validate_run(args, world)
    check_data_paths(args, skip_under=getattr(args, "nvfp4_corpus_dir", None))
    if launcher and getattr(args, "nvfp4_corpus_dir", None):
        from megatron_fp4.data.corpus import check_source
        check_source(getattr(args, "nvfp4_corpus_src", None))
    return plan, notes


class one_line_argparse_errors:
    """While Megatron parses the launcher's flags: argparse's `error` (usage text, exit 2) raises a
    UsageError instead (reported in one line). Patches `argparse.ArgumentParser.error` for the block."""

    def __enter__(self):
        from megatron_fp4.errors import UsageError
        self._original = argparse.ArgumentParser.error

        def error(parser, message):
            raise UsageError(f"{message} (Megatron's argument parser; `--help` lists the flags)")

        argparse.ArgumentParser.error = error
        return self

    def __exit__(self, *exc):
        argparse.ArgumentParser.error = self._original
        return False


def apply() -> None:
    global _applied
    if _applied:
        return
    from megatron.training import arguments

    original = arguments.add_megatron_arguments

    def add_megatron_arguments(parser, *args, **kwargs):
        from megatron_fp4.megatron.validate import check_renamed_flags
        check_renamed_flags(sys.argv[1:])     # Megatron's parse_args reads sys.argv
        parser = original(parser, *args, **kwargs)
        if not any(a.dest == "nvfp4_recipe" for a in parser._actions):
            add_plugin_args(parser, default_recipe=None)
        return parser

    add_megatron_arguments.__wrapped__ = original
    arguments.add_megatron_arguments = add_megatron_arguments

    original_validate = arguments.validate_args

    def validate_args(args, *more, **kwargs):
        prepared = prepare_args(args) if hasattr(args, "nvfp4_recipe") else None
        result = original_validate(args, *more, **kwargs)
        if prepared is not None:
            from megatron_fp4.errors import reporting_rank
            plan, notes = prepared
            plan.apply()                 # run-wide switches (--nvfp4-bf16-from) for this process's layers
            if reporting_rank():
                print(plan.bf16_line() + "".join(f"; {n}" for n in notes), flush=True)
        return result

    validate_args.__wrapped__ = original_validate
    arguments.validate_args = validate_args
    _applied = True
