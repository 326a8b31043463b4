"""experiments/nonlinearity"""
