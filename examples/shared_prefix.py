"""Shared-prefix (cascade) attention: one long prefix -- a system prompt -- shared by many
sequences is attended once for all of their queries, each suffix separately, and the two partial
results are merged by their LSEs with ``pn.merge_state``.

Plain paged attention reads the prefix's K/V once per sequence. The cascade puts the B decode
queries side by side as B queries of ONE sequence over the prefix blocks (non-causal: every query
comes after the whole prefix), so the prefix is read once; then it attends each sequence's own
suffix blocks and merges: ``s = ln(e^s_prefix + e^s_suffix)``, ``v = (e^s_prefix v_prefix +
e^s_suffix v_suffix) / e^s``. The result is checked against plain attention over prefix + suffix,
and the two timings are printed side by side.

Run:  python examples/shared_prefix.py [--runtime cpu|cuda|auto] [--batch 32] [--prefix 2048]
"""
import argparse
import os
import sys
import time

import numpy as np

try:
    import paged_numba as pn
except ImportError:  # not installed: use the checkout this example lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paged_numba as pn

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
p.add_argument("--batch", type=int, default=32, help="sequences sharing the prefix")
p.add_argument("--prefix", type=int, default=2048, help="prefix tokens (a multiple of the block size 16)")
p.add_argument("--reps", type=int, default=5, help="timed repetitions (the median is printed)")
args = p.parse_args()
rt = pn.get_runtime(args.runtime)
rng = np.random.default_rng(0)

B, H, Hkv, D, bs = args.batch, 16, 2, 64, 16
P = args.prefix // bs * bs
suffix = rng.integers(16, 129, B)                       # each sequence's own tokens after the prefix
n_pre, n_suf = P // bs, (suffix + bs - 1) // bs
N = n_pre + int(n_suf.sum())
k_blocks = pn.tensor(rng.standard_normal((N, bs, Hkv, D), dtype=np.float32), runtime=rt)
v_blocks = pn.tensor(rng.standard_normal((N, bs, Hkv, D), dtype=np.float32), runtime=rt)
prefix_blocks = np.arange(n_pre)                        # blocks 0 .. n_pre - 1, shared by everyone
suffix_table = np.full((B, int(n_suf.max())), -1, np.int32)
start = n_pre
for b in range(B):
    suffix_table[b, :n_suf[b]] = np.arange(start, start + n_suf[b])
    start += n_suf[b]
full_table = np.concatenate([np.broadcast_to(prefix_blocks, (B, n_pre)), suffix_table], axis=1).astype(np.int32)
full_lens = (P + suffix).astype(np.int32)
q = pn.tensor(rng.standard_normal((B, H, 1, D), dtype=np.float32), runtime=rt)   # one decode query each
q_prefix = pn.tensor(np.ascontiguousarray(q.numpy().transpose(2, 1, 0, 3)), runtime=rt)   # [1, H, B, D]


def plain():
    return pn.paged_attention_fwd(q, k_blocks, v_blocks, full_table, seq_lens=full_lens)


def cascade():
    # The prefix once, for all B queries (non-causal: each query sits after the whole prefix).
    o_p, s_p = pn.paged_attention_fwd(q_prefix, k_blocks, v_blocks, prefix_blocks[None].astype(np.int32),
                                      seq_lens=np.array([P], np.int32))
    # [1, H, B, D] -> [B, H, 1, D] (host round trip: a NumPy reshape, small next to the attention)
    o_p = pn.tensor(np.ascontiguousarray(o_p.numpy().transpose(2, 1, 0, 3)), runtime=rt)
    s_p = pn.tensor(np.ascontiguousarray(s_p.numpy().transpose(2, 1, 0)), runtime=rt)
    o_s, s_s = pn.paged_attention_fwd(q, k_blocks, v_blocks, suffix_table, seq_lens=suffix.astype(np.int32))
    return pn.merge_state(o_p, s_p, o_s, s_s)


def timed(fn):
    fn()                                                # warm-up (compiles on the first call)
    rt.synchronize()
    ts = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        fn()
        rt.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


want, want_lse = (x.numpy() for x in plain())
got, got_lse = (x.numpy() for x in cascade())
err = float(max(np.abs(got - want).max(), np.abs(got_lse - want_lse).max()))
t_plain, t_cascade = timed(plain), timed(cascade)
print(f"runtime {rt.name}: {B} sequences share a {P}-token prefix; suffixes of {suffix.min()}..{suffix.max()} "
      f"tokens; H{H}/{Hkv} D{D}")
print(f"K/V tokens read: plain {int(full_lens.sum())}, cascade {P + int(suffix.sum())}")
print(f"plain attention:   {t_plain * 1e3:8.2f} ms")
print(f"cascade + merge:   {t_cascade * 1e3:8.2f} ms  ({t_cascade / t_plain:.2f}x of plain; "
      f"time saved {(t_plain - t_cascade) * 1e3:.2f} ms)")
ok = err < 1e-4
print(f"max |cascade - plain| (out and lse) = {err:.2e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
