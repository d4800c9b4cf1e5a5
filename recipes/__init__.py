"""Built-in recipe YAML files (package data, loaded by megatron_fp4.registry)."""
