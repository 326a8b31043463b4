"""experiments/surgery"""
