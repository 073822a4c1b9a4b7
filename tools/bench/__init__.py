"""Benchmark command: numbabn beside PyTorch, plain NumPy and a measured roofline.

Run ``python -m tools.bench --help`` from the checkout's root. The package also
holds the GPU checks (:mod:`tools.bench.gpu_check`) and the offline compile of the
CUDA kernels (:mod:`tools.bench.gpu_static`, which reads :mod:`tools.bench.catalogue`).
"""
