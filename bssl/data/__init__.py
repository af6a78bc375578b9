"""Data sources (random access) and grain pipelines."""
