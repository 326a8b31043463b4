"""experiments/cross_model"""
