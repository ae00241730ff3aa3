"""Cache writes on the CPU (vLLM's ``reshape_and_cache``): new K/V rows scattered into the pools.

Symbols: T new rows, Hkv KV heads, D head_dim, N physical blocks, bs block_size.
"""
from __future__ import annotations

from numba import njit, prange


@njit(parallel=True, cache=True)
def write_kv_rows(k_pool, v_pool, k, v, slots, start, stop):
    """Rows ``start <= t < stop`` of k, v into their slots (a range kernel: see ``launch.py``).

    Parameters
    ----------
    k_pool, v_pool : [N, bs, Hkv, D] storage (float32, uint16 or uint8), written in place
    k, v : [T, Hkv, D] of the pools' storage dtype (FP8 pools: codes already quantized by the
        client with the shared encoder); may be read-only
    slots : int64 [T]; row t goes to block ``slots[t] // bs``, offset ``slots[t] % bs``; negative
        slots are skipped; no slot appears twice (validated), so rows never write one element twice
    start, stop : int -- the rows this call writes
    """
    bs = k_pool.shape[1]
    Hkv = k.shape[1]
    D = k.shape[2]
    for t in prange(start, stop):
        s = slots[t]
        if s < 0:
            continue
        blk = s // bs
        off = s % bs
        for h in range(Hkv):
            for d in range(D):
                k_pool[blk, off, h, d] = k[t, h, d]
                v_pool[blk, off, h, d] = v[t, h, d]
