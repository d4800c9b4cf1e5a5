"""User mistakes reported as one line, without a traceback, on every route.

A `UsageError` (and the plugin's other user-facing errors: recipe, refused configuration, corpus)
names the flag or file and the fix. The launcher (`python -m megatron_fp4.pretrain_gpt`,
`megatron-fp4-pretrain`) and `megatron_fp4.install()` in a Megatron-LM checkout print it as

    megatron_fp4: error: <message>

on global rank 0 only (under torchrun every rank fails the same way; the others exit quietly) and
exit with status 2. The full traceback comes back with `--nvfp4-debug-errors` or the environment
variable `MEGATRON_FP4_DEBUG=1`. Anything else (a bug, a crash) keeps its normal traceback.
"""
from __future__ import annotations

import os
import sys

DEBUG_FLAG = "--nvfp4-debug-errors"
DEBUG_ENV = "MEGATRON_FP4_DEBUG"
USAGE_EXIT_CODE = 2


class UsageError(ValueError):
    """A user mistake (flag, file, combination): the message names it and the fix, in one line."""


def user_error_types() -> tuple:
    """The exception types reported as one line: UsageError and the errors derived from it, plus
    the recipe loader's RecipeError (a bad name, file or knob)."""
    from .registry import RecipeError
    return (UsageError, RecipeError)


def debug_requested(argv=None) -> bool:
    """--nvfp4-debug-errors on the command line (sys.argv when argv is None) or MEGATRON_FP4_DEBUG=1."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    argv = sys.argv[1:] if argv is None else argv
    return any(a == DEBUG_FLAG for a in argv)


def one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def reporting_rank() -> bool:
    """Global rank 0 (torchrun's RANK), or a process outside torchrun."""
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def report(err: BaseException, stream=None) -> None:
    """Print the one-line form on the reporting rank."""
    if reporting_rank():
        print(f"megatron_fp4: error: {one_line(err)}", file=stream or sys.stderr, flush=True)


def run_reporting_user_errors(fn, argv=None):
    """Call fn(); a user error becomes one line on rank 0 and SystemExit(2), unless debugging."""
    try:
        return fn()
    except user_error_types() as err:
        if debug_requested(argv):
            raise
        report(err)
        raise SystemExit(USAGE_EXIT_CODE) from None


_previous_hook = None


def install_excepthook() -> None:
    """For a Megatron-LM checkout's script (install()): an uncaught user error prints one line on rank 0
    and the process exits with status 2; everything else goes to the previous hook unchanged."""
    global _previous_hook
    if _previous_hook is not None:
        return
    _previous_hook = sys.excepthook

    def excepthook(kind, value, tb):
        if isinstance(value, user_error_types()) and not debug_requested():
            report(value)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(USAGE_EXIT_CODE)     # the interpreter would exit with 1 after a hook returns
        _previous_hook(kind, value, tb)

    sys.excepthook = excepthook
