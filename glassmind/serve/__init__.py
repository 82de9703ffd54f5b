"""glassmind.serve"""
