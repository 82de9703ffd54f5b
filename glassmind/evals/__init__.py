"""glassmind.evals"""
