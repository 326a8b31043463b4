"""experiments/weights"""
