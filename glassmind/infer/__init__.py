"""glassmind.infer"""
