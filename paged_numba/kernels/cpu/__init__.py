"""CPU kernels: parallel ``@numba.njit`` loops, compiled with ``cache=True``."""
