"""Tools for developing numbabn, run from a checkout: not part of the installed package.

``tools.bench`` holds the benchmarks (``python -m tools.bench``, ``make bench``), the
GPU checks (``make gpu-check``) and the offline compile of the CUDA kernels
(``make gpu-static``). Run them from the checkout's root, or with the root on
``PYTHONPATH``.
"""
