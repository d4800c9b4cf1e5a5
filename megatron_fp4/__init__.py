"""megatron_fp4: fully-quantized NVFP4 pretraining for Megatron-Core (Quartet II, TetraJet-v2, NVIDIA)."""

SUPPORTED_MEGATRON_CORE = ((0, 19), (0, 20))   # [min, max)


def install() -> None:
    """Hook the plugin into Megatron: the --mfp4-* flags, the optimizer stabilizers after model and
    optimizer setup, their checkpoint state, and the prebuilt dataset helpers (patches/); launch with
    `--transformer-impl local --spec megatron_fp4.spec gpt_layer_spec`.

    One line in a Megatron-LM checkout's pretrain_gpt.py, before its argument parsing:
        import megatron_fp4; megatron_fp4.install()
    Raises RuntimeError for megatron-core versions the patches were not written for.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("megatron-core")
    except PackageNotFoundError:
        raise RuntimeError("megatron_fp4.install(): megatron-core is not installed") from None
    parts = tuple(int(p) for p in found.split(".")[:2] if p.isdigit())
    lo, hi = SUPPORTED_MEGATRON_CORE
    if not lo <= parts < hi:
        raise RuntimeError(f"megatron_fp4.install(): megatron-core {found} is not supported "
                           f"(need >= {'.'.join(map(str, lo))}, < {'.'.join(map(str, hi))})")
    from .patches import apply_all
    apply_all()
