"""glassmind.studies"""
