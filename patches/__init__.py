"""What hooks the plugin into Megatron (installed as megatron_fp4.patches)."""
