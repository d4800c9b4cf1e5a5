"""Rank functions for tests/megatron/test_precision.py (importable by module name for the forkserver)."""
import driver_settings


def precision_rows(rank, world, settings_kwargs, run_dir):
    """Build the driver's GPT at the given layout and run the start hook; return (rows, printed lines)."""
    from megatron_fp4.megatron import driver, precision
    s = driver_settings.settings(**settings_kwargs)
    driver.initialize_parallel(s)
    chunks, _ = driver.build_model(s)
    printed = []
    rows = precision.announce(chunks, s.seq_length * s.micro_batch_size, run_dir, log=printed.append)
    local = precision.precision_table(chunks, s.seq_length * s.micro_batch_size)
    return {"rows": rows, "local": local, "printed": printed}
