"""Test-only helpers (the gloo CPU shim and a multi-process runner). Never imported at runtime."""
