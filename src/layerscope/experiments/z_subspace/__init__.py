"""experiments/z_subspace"""
