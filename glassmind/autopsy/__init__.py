"""glassmind.autopsy"""
