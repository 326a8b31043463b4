"""experiments/geometry"""
