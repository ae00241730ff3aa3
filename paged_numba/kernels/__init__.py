"""Kernels: arrays and scalars in, arrays out. Host <-> device moves and launch geometry live in
the runtimes' clients (``paged_numba/runtime``)."""
