"""megatron.core.tensor_parallel.layers: the apex check of gradient-accumulation fusion.

ColumnParallelLinear / RowParallelLinear refuse `gradient_accumulation_fusion` when apex's
`fused_weight_gradient_mlp_cuda` is missing (the module flag `_grad_accum_fusion_available`). The
plugin's linears accumulate into `main_grad` themselves (megatron_fp4/linear.py), so the check is lifted
for the duration of their parent's `__init__` and restored after; Megatron's own linears keep it.
Written for megatron-core 0.19 (`megatron.core.tensor_parallel.layers._grad_accum_fusion_available`).
"""
from __future__ import annotations


def fusion_available() -> bool:
    """Whether Megatron's own wgrad-fusion kernel (apex) is there."""
    from megatron.core.tensor_parallel import layers
    return bool(layers._grad_accum_fusion_available)


def init_allowing_fusion(parent_init, self, config, *args, **kwargs):
    """`parent_init(self, *args, config=config, **kwargs)` with the apex check lifted when the config
    asks for gradient-accumulation fusion."""
    from megatron.core.tensor_parallel import layers
    if not getattr(config, "gradient_accumulation_fusion", False) or layers._grad_accum_fusion_available:
        return parent_init(self, *args, config=config, **kwargs)
    layers._grad_accum_fusion_available = True
    try:
        return parent_init(self, *args, config=config, **kwargs)
    finally:
        layers._grad_accum_fusion_available = False
