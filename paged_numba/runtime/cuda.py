"""The ``cuda`` runtime (numba.cuda kernels). Not built yet: starting it raises."""
from __future__ import annotations

from ..errors import RuntimeUnavailableError


class CudaRuntime:
    def __init__(self):
        raise RuntimeUnavailableError(
            "the 'cuda' runtime is not implemented in this version of paged_numba; "
            "use runtime='cpu'")
