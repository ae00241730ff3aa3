"""Generate tokens with a tiny transformer whose KV cache is a PagedKVCache.

What it shows
-------------
* A 2-layer decoder (random weights; RMSNorm, rotary positions, GQA attention with 4 query heads
  over 2 KV heads, a GELU MLP) written in NumPy, with one ``pn.PagedKVCache`` per layer.
* A batch of prompts of different lengths is prefilled one sequence at a time (causal attention of
  the prompt over itself), then all sequences decode together, greedily, one token per step:
  ``cache.append`` the new token's K/V, then ``cache.attention`` over everything cached so far.
* Every attention call is checked against dense float64 attention over the same tokens, kept on the
  side in plain arrays.
* Throughput (tokens/s, without the check) and the memory the paged cache holds versus a
  contiguous cache sized for the maximum context of every sequence.

Run:  python examples/generate.py [--tokens 32] [--max-len 512] [--runtime cpu]
Exit code 0 when every attention call matched the dense one.
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
p.add_argument("--tokens", type=int, default=32, help="new tokens per sequence")
p.add_argument("--prompts", type=int, nargs="+", default=[5, 23, 40], help="prompt lengths")
p.add_argument("--max-len", type=int, default=512, help="context a contiguous cache would reserve")
p.add_argument("--block-size", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--runtime", default=None, help="cpu, cuda or auto (default: $PAGED_NUMBA_RUNTIME or auto)")
args = p.parse_args()
rng = np.random.default_rng(args.seed)

# ---- a tiny decoder with random weights --------------------------------------------------------
VOCAB, DM, LAYERS, H, HKV, D, FF = 96, 64, 2, 4, 2, 16, 128


def dense_init(*shape):
    return (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)


emb = rng.standard_normal((VOCAB, DM)).astype(np.float32)
unemb = dense_init(DM, VOCAB) * 4
layers = [dict(wq=dense_init(DM, H * D), wk=dense_init(DM, HKV * D), wv=dense_init(DM, HKV * D),
               wo=dense_init(H * D, DM), w1=dense_init(DM, FF), w2=dense_init(FF, DM)) for _ in range(LAYERS)]


def rmsnorm(x):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)


def gelu(x):
    return 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x ** 3)))


def rope(x, pos):
    """Rotary position embedding of x [B, T, heads, D] at positions pos [B, T]."""
    half = D // 2
    freq = 10000.0 ** (-np.arange(half) / half)
    ang = pos[..., None, None] * freq                       # [B, T, 1, half]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).astype(np.float32)


def dense_attention(q, K, V):
    """float64 causal attention of q [H, T, D] (the last T positions) over K, V [L, HKV, D]."""
    T, L = q.shape[1], K.shape[0]
    Kh = np.repeat(K.astype(np.float64), H // HKV, axis=1).transpose(1, 0, 2)
    Vh = np.repeat(V.astype(np.float64), H // HKV, axis=1).transpose(1, 0, 2)
    s = q.astype(np.float64) @ Kh.transpose(0, 2, 1) / np.sqrt(D)
    s[:, np.arange(L)[None, :] > (L - T + np.arange(T))[:, None]] = -np.inf
    w = np.exp(s - s.max(-1, keepdims=True))
    return (w / w.sum(-1, keepdims=True)) @ Vh


# ---- the caches --------------------------------------------------------------------------------
bs = args.block_size
B = len(args.prompts)
blocks_needed = sum(-(-(L + args.tokens) // bs) for L in args.prompts)
caches = [pn.PagedKVCache(blocks_needed + 4, bs, HKV, D, runtime=args.runtime) for _ in range(LAYERS)]
seqs = [caches[0].add_sequence() for _ in range(B)]
for c in caches[1:]:
    assert [c.add_sequence() for _ in range(B)] == seqs
EMPTY = (np.zeros((0, HKV, D), np.float32),) * 2
dense_kv = [{} for _ in range(LAYERS)]                 # layer -> {seq_id: (K, V) as plain arrays}
stats = dict(max_err=0.0, checks=0, check_s=0.0)


def forward(ids, tokens, pos):
    """Logits of the last position for sequences ``ids`` fed ``tokens`` [b, T] at ``pos`` [b, T]."""
    b, T = tokens.shape
    x = emb[tokens]
    for li, w in enumerate(layers):
        h = rmsnorm(x)
        q = rope((h @ w["wq"]).reshape(b, T, H, D), pos)
        k = rope((h @ w["wk"]).reshape(b, T, HKV, D), pos)
        v = (h @ w["wv"]).reshape(b, T, HKV, D)
        for i, s in enumerate(ids):
            caches[li].append(s, k[i], v[i])
        qh = np.ascontiguousarray(q.transpose(0, 2, 1, 3))           # [b, H, T, D]
        out, _ = caches[li].attention(qh, ids, causal=True)
        t0 = time.perf_counter()                                      # the check, timed apart
        for i, s in enumerate(ids):
            K, V = (np.concatenate([a, n]) for a, n in zip(dense_kv[li].get(s, EMPTY), (k[i], v[i])))
            dense_kv[li][s] = (K, V)
            stats["max_err"] = max(stats["max_err"], float(np.abs(out[i] - dense_attention(qh[i], K, V)).max()))
            stats["checks"] += 1
        stats["check_s"] += time.perf_counter() - t0
        x = x + out.transpose(0, 2, 1, 3).reshape(b, T, H * D) @ w["wo"]
        x = x + gelu(rmsnorm(x) @ w["w1"]) @ w["w2"]
    return rmsnorm(x[:, -1]) @ unemb


print(f"runtime {caches[0].runtime.name!r}; {LAYERS} layers, {H} heads / {HKV} KV heads, head_dim {D}; "
      f"block_size {bs}; prompts {args.prompts}")
t_start = time.perf_counter()
warm = [c.add_sequence() for c in caches]              # a throwaway sequence: compiles on a first run
forward(warm[:1], rng.integers(0, VOCAB, (1, 3)), np.arange(3.0)[None])
forward(warm[:1], rng.integers(0, VOCAB, (1, 1)), np.full((1, 1), 3.0))
for c, w in zip(caches, warm):
    c.free(w)
stats.update(max_err=0.0, checks=0, check_s=0.0)
t_warm = time.perf_counter() - t_start

prompts = [rng.integers(0, VOCAB, L) for L in args.prompts]
generated = [[] for _ in range(B)]
t0 = time.perf_counter()
nxt = np.empty(B, np.int64)
for i, (s, toks) in enumerate(zip(seqs, prompts)):                    # prefill, one sequence at a time
    logits = forward([s], toks[None, :], np.arange(len(toks))[None, :].astype(np.float64))
    nxt[i] = int(np.argmax(logits[0]))
t_prefill = time.perf_counter() - t0
check_prefill = stats["check_s"]
t0 = time.perf_counter()
for step in range(args.tokens):                                       # decode: all sequences together
    for i in range(B):
        generated[i].append(int(nxt[i]))
    pos = np.array([[caches[0].seq_len(s)] for s in seqs], np.float64)
    logits = forward(seqs, nxt[:, None], pos)
    nxt = np.argmax(logits, -1)
t_decode = time.perf_counter() - t0 - (stats["check_s"] - check_prefill)

for i in range(B):
    print(f"sequence {i}: prompt {len(prompts[i])} tokens -> generated {generated[i][:12]}...")
n_prompt = sum(args.prompts)
print(f"prefill: {n_prompt} tokens in {t_prefill * 1e3:.0f} ms; decode: {B * args.tokens} tokens in "
      f"{t_decode * 1e3:.0f} ms = {B * args.tokens / t_decode:.0f} tokens/s (dense check excluded; "
      f"warm-up {t_warm:.1f} s)")
used = sum((c.num_blocks - c.num_free_blocks) * c.block_nbytes for c in caches)
contiguous = LAYERS * B * args.max_len * 2 * HKV * D * 4
tokens_held = sum(caches[0].seq_len(s) for s in seqs)
print(f"memory: paged cache holds {used / 1024:.1f} KiB in {sum(c.num_blocks - c.num_free_blocks for c in caches)} "
      f"blocks for {tokens_held} tokens x {LAYERS} layers; a contiguous cache of max length {args.max_len} "
      f"would reserve {contiguous / 1024:.1f} KiB ({contiguous / used:.1f}x more)")
ok = stats["max_err"] < 1e-4 and stats["checks"] == LAYERS * B * (1 + args.tokens)
print(f"checked {stats['checks']} attention calls against dense attention: max |paged - dense| = "
      f"{stats['max_err']:.2e}: {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
