"""Benchmark command: numbabn beside PyTorch, plain NumPy and a measured roofline.

Run ``python -m numbabn.bench --help``.
"""
