"""glassmind.train"""
