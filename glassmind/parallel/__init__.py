"""glassmind.parallel"""
