"""experiments/lens"""
