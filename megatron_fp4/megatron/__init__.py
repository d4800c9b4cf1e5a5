"""Megatron-Core integration: NVFP4 tensor-parallel linears, plugin config, run state."""
from .config import (NVFP4TransformerConfig, UnsupportedConfigError, check_supported,
                     check_supported_args, config_from, resolve_recipe)
from .layers import NVFP4ColumnParallelLinear, NVFP4RowParallelLinear, gather_nvfp4_rows
from .state import comm_stats, format_comm_stats, reset_comm_stats, set_iteration
from .transformer import NVFP4TransformerLayer, TorchNorm, tag_model

__all__ = [
    "NVFP4ColumnParallelLinear", "NVFP4RowParallelLinear", "NVFP4TransformerConfig",
    "NVFP4TransformerLayer", "TorchNorm", "UnsupportedConfigError", "check_supported",
    "check_supported_args", "comm_stats", "config_from", "format_comm_stats", "gather_nvfp4_rows",
    "reset_comm_stats", "resolve_recipe", "set_iteration", "tag_model",
]
