"""CPU kernels: ``@numba.njit`` loops compiled with ``cache=True``, built by memoized factories
whose closure constants (DType codes, the inner path) select what a call compiles.

- ``codecs.py``           storage bits <-> float32 (in the kernels; whole arrays for the client)
- ``gemm.py``             the matrix primitives: 512-bit register-blocked microkernels (``matmul``)
                          and the dot-product loops of the decode path
- ``paged_attention.py``  the fused forward
- ``paged_attention_bwd.py``  the backward (delta, dK/dV, dQ)
- ``write_kv.py``         cache writes (vLLM's reshape_and_cache)
- ``launch.py``           runs a kernel's item range on one thread (small calls) or numba's pool
"""

# fastmath without nnan/ninf: -inf must stay -inf (lse = -inf for rows that see no key).
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
