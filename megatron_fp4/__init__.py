"""megatron_fp4: fully-quantized NVFP4 pretraining for Megatron-Core (Quartet II, TetraJet-v2, NVIDIA)."""

SUPPORTED_MEGATRON_CORE = ((0, 19), (0, 20))   # [min, max)


def install() -> None:
    """Hook the plugin into a Megatron-LM checkout's training script (patches/):

    - the --nvfp4-* flags in Megatron's parser (--nvfp4-recipe, --nvfp4-override, --nvfp4-bf16-modules,
      --nvfp4-debug-errors), every one honoured: the recipe and its overrides by the plugin layers,
      the BF16 patterns at model build (a pattern that matches no linear is an error);
    - with --nvfp4-recipe set, the plugin's checks before Megatron's own argument validation: an
      invalid recipe, override or BF16 pattern, a model shape the recipe cannot quantize, and the
      refused combinations (TE `--fp8-*`/`--fp4-*`, `--transformer-impl transformer_engine`, MoE,
      FSDP, ...) stop the run before Megatron prints its arguments; the plugin spec
      (`--spec megatron_fp4.spec gpt_layer_spec`) and `--transformer-impl local` are set when left
      out; the run log names the linears kept in BF16;
    - the spec function on both of Megatron's model-builder paths (the config container's
      GPTModelBuilder and Megatron-LM's gpt_builders.gpt_builder);
    - the optimizer stabilizers after model/optimizer setup and their state beside each checkpoint;
    - user errors as one line on global rank 0, exit status 2 (--nvfp4-debug-errors or
      MEGATRON_FP4_DEBUG=1 for the traceback; megatron_fp4/errors.py).

    One line in a Megatron-LM checkout's pretrain_gpt.py, before its argument parsing:
        import megatron_fp4; megatron_fp4.install()
    Without --nvfp4-recipe the run keeps Megatron's stock layers.
    Raises UnsupportedMegatronError for megatron-core versions the patches were not written for.
    """
    from importlib.metadata import PackageNotFoundError, version

    from .errors import UsageError, install_excepthook

    class UnsupportedMegatronError(UsageError, RuntimeError):
        """megatron-core is missing or of a version the patches were not written for."""

    install_excepthook()
    lo, hi = SUPPORTED_MEGATRON_CORE
    need = f"pip install 'megatron-core>={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}'"
    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        raise UnsupportedMegatronError(f"megatron_fp4.install(): megatron-core is not installed; {need}") from None
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    if not lo <= parts < hi:
        raise UnsupportedMegatronError(f"megatron_fp4.install(): megatron-core {found} is not supported; {need}")
    from .patches import apply_all
    apply_all()
