"""experiments: one module per experiment, grouped by family."""
