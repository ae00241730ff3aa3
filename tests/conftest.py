"""pytest set-up: the CUDA simulator switch (before numba is imported) and the ``runtime_name``
fixture. The helpers the test modules import live in ``helpers.py``."""
from __future__ import annotations

import ctypes
import os


from gpu_probe import real_gpu as _real_gpu  # noqa: E402


# One suite for every runtime (Keras-style): with no GPU, the "cuda" runtime is tested on numba's
# CUDA simulator -- set before numba is first imported. PAGED_NUMBA_TEST_SIM=0 turns that off.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and os.environ.get("PAGED_NUMBA_TEST_SIM", "1") != "0":
    if not _real_gpu():
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest  # noqa: E402

from helpers import ALL_RUNTIMES, UNAVAILABLE, is_sim  # noqa: E402


@pytest.fixture(params=ALL_RUNTIMES)
def runtime_name(request) -> str:
    """Every runtime: "cpu" always, "cuda" on a GPU or the simulator -- a lane that cannot start
    here skips with the runtime's reason (visible with ``-rs``). On the simulator (seconds per
    launch) only modules that set ``SIM_OK = True`` -- tiny shapes -- run."""
    if request.param in UNAVAILABLE:
        pytest.skip(f"runtime {request.param!r} cannot start here: {UNAVAILABLE[request.param]}")
    if is_sim(request.param) and not getattr(request.module, "SIM_OK", False):
        pytest.skip("CUDA simulator: this module's shapes are for real devices (see test_tiny_grid.py)")
    return request.param
