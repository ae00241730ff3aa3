"""CUDA kernels (numba.cuda); imported only by ``runtime/cuda.py``."""
