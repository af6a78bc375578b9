"""Generators of files the repository keeps (not tests, not part of the bssl package):
record_presets.py writes bssl/readers.json."""
