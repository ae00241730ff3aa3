"""A/B of two checkouts on the CPU runtime by process CPU time (steadier than wall time on a shared
machine): the median CPU milliseconds per call of the plain forward / backward workloads of
cpu_forward.py and cpu_backward.py, plus a small decode, for the paged_numba at REPO.

    NUMBA_NUM_THREADS=1 python benchmarks/cpu_ab.py REPO fwd|bwd|all

Run it alternately on the two checkouts (e.g. ``git archive COMMIT | tar -x -C /tmp/old``), a few
rounds each, and compare medians; the first run on a checkout compiles (its warm-up call).
"""
import sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
import paged_numba as pn
which = sys.argv[2]
rng = np.random.default_rng(0)
def case(B, H, Hkv, Sq, D, L, bs=16):
    M = -(-L // bs); N = B * M + 4
    perm = rng.permutation(N)[:B * M].reshape(B, M).astype(np.int32)
    k = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32); v = rng.standard_normal((N, bs, Hkv, D), dtype=np.float32)
    q = rng.standard_normal((B, H, Sq, D), dtype=np.float32)
    return q, k, v, perm, np.full(B, L, np.int32)
def med(fn, rep):
    fn(); ts = []
    for _ in range(rep):
        t = time.process_time(); fn(); ts.append(time.process_time() - t)
    return 1e3 * float(np.median(ts))
out = []
if which in ("fwd", "all"):
    q, k, v, bt, sl = case(4, 32, 8, 1, 128, 2048)
    out.append(("fwd decode B4 H32/8 D128 L2048", med(lambda: pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu"), 15)))
    q, k, v, bt, sl = case(1, 8, 8, 1024, 64, 1024)
    out.append(("fwd prefill causal B1 H8 D64 L1024", med(lambda: pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime="cpu"), 9)))
    q, k, v, bt, sl = case(2, 8, 2, 1, 64, 256)
    out.append(("fwd small decode B2 H8/2 D64 L256", med(lambda: pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu"), 51)))
if which in ("bwd", "all"):
    q, k, v, bt, sl = case(1, 8, 8, 1024, 64, 1024)
    o, l = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, causal=True, runtime="cpu"); d = np.ones_like(o)
    out.append(("bwd causal B1 H8 D64 L1024", med(lambda: pn.paged_attention_bwd(d, q, k, v, o, l, bt, seq_lens=sl, causal=True, runtime="cpu"), 7)))
    q, k, v, bt, sl = case(4, 32, 8, 1, 128, 2048)
    o, l = pn.paged_attention_fwd(q, k, v, bt, seq_lens=sl, runtime="cpu"); d = np.ones_like(o)
    out.append(("bwd decode B4 H32/8 D128 L2048", med(lambda: pn.paged_attention_bwd(d, q, k, v, o, l, bt, seq_lens=sl, runtime="cpu"), 7)))
for n, t in out:
    print(f"{n}\t{t:.2f}")
