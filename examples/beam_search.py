"""Beam search over a PagedKVCache: beams fork from one prompt and share its blocks.

What it shows
-------------
* A one-layer attention model (rotary positions, GQA: 4 query heads over 2 KV heads; random
  weights, so the tokens mean nothing) scores continuations of a 37-token prompt; beam search keeps
  the best ``--beams`` hypotheses for ``--steps`` steps.
* The prompt's K/V is written once. Every step each surviving hypothesis is ``cache.fork``-ed from
  its parent beam -- sharing all of the parent's blocks -- the chosen token is appended (the
  partly filled last block is copied first: copy-on-write), and the old beams are freed. Full
  prompt blocks stay shared by every beam to the end.
* Each step's attention is checked against dense attention over each beam's own tokens, and the
  blocks in use are compared with what every beam would need with its own copy of its tokens.

Run:  python examples/beam_search.py [--beams 4] [--steps 12] [--runtime cpu]
Exit code 0 when every attention matched the dense one and sharing saved memory.
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
p.add_argument("--beams", type=int, default=4)
p.add_argument("--steps", type=int, default=12)
p.add_argument("--prompt", type=int, default=37, help="prompt length")
p.add_argument("--block-size", type=int, default=8)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
args = p.parse_args()
rng = np.random.default_rng(args.seed)

VOCAB, DM, H, HKV, D = 64, 32, 4, 2, 16
W = args.beams
emb = rng.standard_normal((VOCAB, DM)).astype(np.float32)
wq, wk, wv = (rng.standard_normal((DM, n * D)).astype(np.float32) / np.sqrt(DM) for n in (H, HKV, HKV))
wo = rng.standard_normal((H * D, DM)).astype(np.float32) / np.sqrt(H * D)
unemb = rng.standard_normal((DM, VOCAB)).astype(np.float32) / np.sqrt(DM) * 4


def rope(x, pos):
    """Rotary embedding of x [T, heads, D] at positions pos [T]."""
    half = D // 2
    ang = np.asarray(pos, np.float64)[:, None, None] * 10000.0 ** (-np.arange(half) / half)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang), x1 * np.sin(ang) + x2 * np.cos(ang)],
                          -1).astype(np.float32)


def kv(tokens, start):
    """K, V [T, HKV, D] of ``tokens`` at positions start, start + 1, ..."""
    x = emb[tokens]
    pos = np.arange(start, start + len(tokens))
    return rope((x @ wk).reshape(-1, HKV, D), pos), (x @ wv).reshape(-1, HKV, D)


def dense_attention(q, K, V):
    """float64 attention of q [H, D] (the newest position) over K, V [L, HKV, D]."""
    Kh = np.repeat(K.astype(np.float64), H // HKV, axis=1)
    Vh = np.repeat(V.astype(np.float64), H // HKV, axis=1)
    s = np.einsum("hd,lhd->hl", q, Kh) / np.sqrt(D)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hl,lhd->hd", w / w.sum(-1, keepdims=True), Vh)


bs = args.block_size
max_len = args.prompt + args.steps
cache = pn.PagedKVCache(2 * W * -(-max_len // bs) + 4, bs, HKV, D, runtime=args.runtime)
prompt = rng.integers(0, VOCAB, args.prompt)
root = cache.add_sequence()
cache.append(root, *kv(prompt, 0))
print(f"runtime {cache.runtime.name!r}; prompt of {args.prompt} tokens in {len(cache.blocks(root))} blocks of "
      f"{bs}; beam width {W}, {args.steps} steps")

# A beam: (sequence id, score, its generated tokens). Starts as the prompt alone.
beams = [(root, 0.0, [])]
max_err = 0.0
for step in range(args.steps):
    ids = [b[0] for b in beams]
    last = np.array([b[2][-1] if b[2] else prompt[-1] for b in beams])
    pos = np.array([cache.seq_len(s) - 1 for s in ids])
    q = np.stack([rope((emb[t] @ wq).reshape(1, H, D), [p])[0] for t, p in zip(last, pos)])   # [W, H, D]
    out, _ = cache.attention(q[:, :, None, :], ids)                                           # [W, H, 1, D]
    for i, (s, _, toks) in enumerate(beams):
        K, V = kv(np.concatenate([prompt, toks]).astype(np.int64), 0)
        max_err = max(max_err, float(np.abs(out[i, :, 0] - dense_attention(q[i], K, V)).max()))
    x = emb[last] + out[:, :, 0].reshape(len(beams), H * D) @ wo
    x = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    logits = x @ unemb
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    cand = (np.array([b[1] for b in beams])[:, None] + logp).reshape(-1)
    best = np.argsort(-cand, kind="stable")[:W]
    new = []
    for c in best:
        parent, tok = divmod(int(c), VOCAB)
        child = cache.fork(beams[parent][0])                 # shares every block of the parent
        cache.append(child, *kv(np.array([tok]), cache.seq_len(child)))   # copy-on-write of the tail
        new.append((child, float(cand[c]), beams[parent][2] + [tok]))
    for s, _, _ in beams:
        cache.free(s)
    beams = new

for s, score, toks in beams:
    print(f"beam {s:3d}: score {score:8.3f}  tokens {toks}")
in_use = cache.num_blocks - cache.num_free_blocks
own = sum(-(-cache.seq_len(s) // bs) for s, _, _ in beams)
refs = cache.ref_counts
shared = int((refs > 1).sum())
by_all = int((refs == len(beams)).sum())
saved = 1 - in_use / own
print(f"blocks: {in_use} in use ({in_use * cache.block_nbytes / 1024:.1f} KiB), {shared} of them shared "
      f"({by_all} by all {len(beams)} beams); with a copy per beam: {own} blocks "
      f"({own * cache.block_nbytes / 1024:.1f} KiB); sharing saved {100 * saved:.0f}%")
ok = max_err < 1e-4 and saved > 0 and by_all >= args.prompt // bs
print(f"max |paged - dense| over {args.steps} steps = {max_err:.2e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
