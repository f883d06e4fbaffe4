def check_fits(cfg, rows, chunk_steps, dtype, param_dtype, available=None):  # placeholder until the mem branch lands
    pass
