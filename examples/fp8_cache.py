"""An FP8 KV cache: half the memory of BF16, and what it costs in accuracy.

What it shows
-------------
* The same tokens (4 sequences of 64 to 500 tokens, 4 KV heads, head_dim 64) appended to four
  ``pn.PagedKVCache``s: f32 (the reference), bf16, fp8_e4m3 and fp8_e5m2. FP8 caches take
  per-tensor scales (here the absolute max over the data / the format's max, as a calibration step
  would give); they store ``value / scale`` rounded to nearest even, and attention multiplies back.
* Pool memory per dtype: FP8 is exactly half of BF16 (a quarter of F32).
* The error of a decode step (16 query heads, GQA) against the f32 cache, and the round-trip error
  of the stored values.

Run:  python examples/fp8_cache.py [--runtime cpu]
Exit code 0 when FP8 halves BF16's memory and its errors stay within the expected bounds.
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
p.add_argument("--seed", type=int, default=0)
p.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
args = p.parse_args()
rng = np.random.default_rng(args.seed)

lens = [200, 333, 64, 500]
H, HKV, D, bs = 16, 4, 64, 16
N = sum(-(-L // bs) for L in lens)
data = [(rng.standard_normal((L, HKV, D)).astype(np.float32),
         rng.standard_normal((L, HKV, D)).astype(np.float32)) for L in lens]
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
k_amax = max(float(np.abs(k).max()) for k, _ in data)
v_amax = max(float(np.abs(v).max()) for _, v in data)

caches = {}
for dtype in ("f32", "bf16", "fp8_e4m3", "fp8_e5m2"):
    scales = {}
    if dtype in FP8_MAX:
        scales = dict(k_scale=k_amax / FP8_MAX[dtype], v_scale=v_amax / FP8_MAX[dtype])
    cache = pn.PagedKVCache(N, bs, HKV, D, dtype, runtime=args.runtime, **scales)
    for k, v in data:
        s = cache.add_sequence()
        half = len(k) // 2
        cache.append(s, k[:half], v[:half])       # a prompt, then more tokens
        cache.append(s, k[half:], v[half:])
    caches[dtype] = cache
ids = caches["f32"].seq_ids
print(f"runtime {caches['f32'].runtime.name!r}; {len(lens)} sequences of {lens} tokens, {HKV} KV heads, "
      f"head_dim {D}, block_size {bs}, {N} blocks")

q = rng.standard_normal((len(lens), H, 1, D)).astype(np.float32)
ref, _ = caches["f32"].attention(q, ids)
nbytes = {dt: c.k_blocks.numpy().nbytes + c.v_blocks.numpy().nbytes for dt, c in caches.items()}
rows = {}
print(f"{'cache':9s} {'K+V pool':>10s} {'vs bf16':>8s} {'max |out - f32|':>16s} {'rel. rms':>9s} "
      f"{'max |K - k| / amax':>19s}")
for dt, cache in caches.items():
    out, _ = cache.attention(q, ids)      # bf16 cache: q is converted to bf16; FP8 caches keep f32 q
    out = out.astype(np.float64)
    err = float(np.abs(out - ref).max())
    rel = float(np.sqrt(((out - ref) ** 2).mean() / (ref ** 2).mean()))
    kp = cache.k_blocks.numpy().astype(np.float64) * cache.k_scale
    k_err = 0.0
    for s, (k, _) in zip(ids, data):
        blocks = np.asarray(cache.blocks(s))
        t = np.arange(len(k))
        k_err = max(k_err, float(np.abs(kp[blocks[t // bs], t % bs] - k).max()) / k_amax)
    rows[dt] = (err, rel, k_err)
    print(f"{dt:9s} {nbytes[dt] / 2**20:8.2f} MiB {nbytes[dt] / nbytes['bf16']:7.2f}x {err:16.2e} {rel:9.2e} "
          f"{k_err:19.2e}")

halved = nbytes["fp8_e4m3"] * 2 == nbytes["bf16"] == nbytes["fp8_e5m2"] * 2
ordered = rows["f32"][1] < 1e-6 < rows["bf16"][1] < rows["fp8_e4m3"][1] < rows["fp8_e5m2"][1]
bounded = rows["fp8_e4m3"][1] < 0.05 and rows["fp8_e5m2"][1] < 0.1
ok = halved and ordered and bounded
print(f"FP8 pool = {nbytes['fp8_e4m3'] / nbytes['bf16']:.2f} x BF16 pool; relative error of the attention "
      f"output: bf16 {rows['bf16'][1]:.1e}, fp8_e4m3 {rows['fp8_e4m3'][1]:.1e}, fp8_e5m2 "
      f"{rows['fp8_e5m2'][1]:.1e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
