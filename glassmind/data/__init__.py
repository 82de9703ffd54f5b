"""glassmind.data"""
