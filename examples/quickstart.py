"""Quickstart: the smallest use of a paged KV cache.

Make a cache, add a sequence, append the K/V of a 10-token prompt (the cache takes blocks from its
pool as the sequence grows), then attend one new query over it -- and check the answer against
plain dense attention in NumPy.

Run:  python examples/quickstart.py [--runtime cpu|cuda|auto]
"""
import argparse
import os
import sys

import numpy as np

try:
    import paged_numba as pn
except ImportError:  # not installed: use the checkout this example lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paged_numba as pn

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
args = p.parse_args()
rng = np.random.default_rng(0)

H, Hkv, D = 4, 2, 8                    # 4 query heads share 2 KV heads (GQA)
cache = pn.PagedKVCache(num_blocks=16, block_size=4, num_kv_heads=Hkv, head_dim=D, runtime=args.runtime)
seq = cache.add_sequence()

k = rng.standard_normal((10, Hkv, D)).astype(np.float32)     # [T, Hkv, D]: 10 prompt tokens
v = rng.standard_normal((10, Hkv, D)).astype(np.float32)
cache.append(seq, k, v)
print(f"sequence {seq}: {cache.seq_len(seq)} tokens in blocks {cache.blocks(seq)}; "
      f"{cache.num_free_blocks} of {cache.num_blocks} blocks free (runtime {cache.runtime.name!r})")

q = rng.standard_normal((1, H, 1, D)).astype(np.float32)     # [B, H, Sq, D]: one query
out, lse = cache.attention(q, [seq])
print(f"out {out.shape} {out.dtype}, lse {lse.shape}")

# The same attention, dense: query head h reads KV head h // (H // Hkv).
kh = np.repeat(k, H // Hkv, axis=1).transpose(1, 0, 2)        # [H, T, D]
vh = np.repeat(v, H // Hkv, axis=1).transpose(1, 0, 2)
s = np.einsum("hd,htd->ht", q[0, :, 0], kh) / np.sqrt(D)
p_ = np.exp(s - s.max(-1, keepdims=True))
dense = np.einsum("ht,htd->hd", p_ / p_.sum(-1, keepdims=True), vh)
err = float(np.abs(out[0, :, 0] - dense).max())
ok = err < 1e-5
print(f"max |paged - dense| = {err:.2e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
