"""The ``cuda`` runtime, the only package that imports ``numba.cuda``.

``plan.py`` (pure Python) holds all launch geometry, ``scratch.py`` the buffers kept across calls,
``client.py`` the ops (plan -> scratch -> launch), ``runtime.py`` the Runtime. Importing this package
imports numba.cuda (through ``runtime.py``); ``plan.py`` alone does not.
"""
from .client import CudaClient
from .plan import (DECODE_MAX_SQ, decode_geometry, decode_rows, lanes_per_row, mma_bwd_tiles, mma_tiles, partition,
                   word_dtype)
from .runtime import CudaRuntime, _import_cuda

# the names of the single-module runtime/cuda.py, for scripts written against it
_word_dtype = word_dtype
_tpg = lanes_per_row
_decode_rows = decode_rows

__all__ = ["CudaClient", "CudaRuntime", "DECODE_MAX_SQ", "decode_geometry", "decode_rows", "lanes_per_row",
           "mma_bwd_tiles", "mma_tiles", "partition", "word_dtype"]
