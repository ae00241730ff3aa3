"""Train through paged attention: fit parameters by gradient descent, in plain NumPy.

What it shows
-------------
* A paged KV cache as vLLM keeps it: a pool of K/V blocks [N, bs, Hkv, D], a shuffled block table,
  three sequences of different lengths that all share one prefix block (a "system prompt"), GQA
  (H = 4 query heads over Hkv = 2 KV heads), a causal prefill of Sq = 8 queries per sequence, and
  NaN in every slot no token reads (never read, so it never shows up in a result).
* ``pn.paged_attention_fwd`` -> (out, lse) and ``pn.paged_attention_bwd`` -> (dq, dk, dv) used as
  the forward / backward of one layer; the chain rule to the parameters is done in NumPy.
* Learnable: a query projection W [Din, D] (q = X @ W for every head) and the V pool. The target
  comes from a hidden teacher (W*, V*); loss = mean squared error; optimizer = Adam in NumPy.
* A gradient check first: the analytic gradient of a few random W coordinates, and of V
  coordinates inside the shared prefix block (whose gradient is the SUM over the three sequences
  that read it), against central finite differences of the float64 loss.

Run:  python examples/train_attention.py [--steps 100] [--seed 0] [--runtime cpu]
(the first run compiles numba's kernels, ~30-60 s; later runs load them from the cache).
Exit code 0 when the gradient check passes and the loss falls by more than --min-drop.
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
p.add_argument("--steps", type=int, default=100)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--runtime", default="cpu", help="cpu (default), cuda or auto")
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--min-drop", type=float, default=10.0, help="required loss[0] / loss[end]")
args = p.parse_args()
rng = np.random.default_rng(args.seed)
try:
    rt = pn.get_runtime(args.runtime)
except pn.RuntimeUnavailableError as e:
    sys.exit(f"runtime {args.runtime!r} is not available here: {e}")

# ---- the paged KV cache ------------------------------------------------------------------------
B, H, Hkv, Sq, D, Din, bs = 3, 4, 2, 8, 32, 16, 8
lens = np.array([37, 29, 20], np.int32)             # key lengths L_b (the last Sq are the queries)
nblk = -(-lens // bs)                               # blocks per sequence: 5, 4, 3
N = 1 + int((nblk - 1).sum()) + 2                   # 1 shared prefix block, private ones, 2 spare
pool = rng.permutation(N)                           # physical blocks handed out in random order
shared = int(pool[0])
table = np.full((B, nblk.max() + 1), -1, np.int32)  # -1 = unused entry (never read)
table[:, 0] = shared                                # every sequence starts with the shared block
nxt = 1
for b in range(B):
    table[b, 1:nblk[b]] = pool[nxt:nxt + nblk[b] - 1]
    nxt += nblk[b] - 1

read = np.zeros((N, bs), bool)                      # slots some valid token reads
for b in range(B):
    t = np.arange(lens[b])
    read[table[b, t // bs], t % bs] = True
k_blocks = np.where(read[..., None, None], rng.standard_normal((N, bs, Hkv, D)), np.nan).astype(np.float32)
v_true = np.where(read[..., None, None], rng.standard_normal((N, bs, Hkv, D)), np.nan).astype(np.float32)

# ---- data, teacher and student -----------------------------------------------------------------
X = rng.standard_normal((B, H, Sq, Din))            # fixed input features
W_true = 1.5 * rng.standard_normal((Din, D)) / np.sqrt(Din)   # the hidden teacher
W = 0.1 * rng.standard_normal((Din, D)) / np.sqrt(Din)        # the student starts far away
V = (v_true + 0.5 * rng.standard_normal(v_true.shape)).astype(np.float32)  # and with noisy values
attn = dict(causal=True, seq_lens=lens, runtime=rt)


def forward(W, V):
    """out [B, H, Sq, D] (float32), lse, q of one paged-attention layer with q = X @ W."""
    q = np.einsum("bhsi,id->bhsd", X, W).astype(np.float32)
    out, lse = pn.paged_attention_fwd(q, k_blocks, V, table, **attn)
    return out, lse, q


target = forward(W_true, v_true)[0].astype(np.float64)


def loss_fn(W, V):
    out = forward(W, V)[0]
    return float(np.mean((out.astype(np.float64) - target) ** 2))


def loss_and_grads(W, V):
    """loss, dL/dW [Din, D], dL/dV [N, bs, Hkv, D] (zero where no token reads)."""
    out, lse, q = forward(W, V)
    err = out.astype(np.float64) - target
    dout = (2.0 * err / err.size).astype(np.float32)                 # d mean(err^2) / d out
    dq, _dk, dv = pn.paged_attention_bwd(dout, q, k_blocks, V, out, lse, table, **attn)  # K is fixed
    dW = np.einsum("bhsi,bhsd->id", X, dq.astype(np.float64))        # chain rule through q = X @ W
    return float(np.mean(err ** 2)), dW, dv.astype(np.float64)


# ---- gradient check: analytic (paged backward) vs central finite differences ---------------------
loss0, dW, dV = loss_and_grads(W, V)


def bumped(x, idx, e):
    """A copy of x with x[idx] += e."""
    x = x.copy()
    x[idx] += e
    return x


# (name, analytic, loss as a function of the bump e, eps, gradient scale for the error floor)
sW, sV = np.abs(dW).max(), np.abs(dV).max()
checks = [(f"W[{i},{j}]", dW[i, j], lambda e, i=i, j=j: loss_fn(bumped(W, (i, j), e), V), 1e-2, sW)
          for i, j in zip(rng.integers(0, Din, 4), rng.integers(0, D, 4))]
# out is linear in V, so the loss is quadratic in V and the central difference is exact for any
# eps: a large one just shrinks the float32 rounding noise of the forward.
checks += [(f"V[shared {shared},{s},{h},{d}]", dV[shared, s, h, d],
            lambda e, s=s, h=h, d=d: loss_fn(W, bumped(V, (shared, s, h, d), e)), 1.0, sV)
           for s, h, d in zip(rng.integers(0, bs, 2), rng.integers(0, Hkv, 2), rng.integers(0, D, 2))]

# rel err = |analytic - numeric| / max(|analytic|, |numeric|, 1% of the largest gradient entry):
# the floor keeps a near-zero coordinate from turning float32 rounding noise into a huge ratio.
worst = 0.0
print(f"gradient check at step 0 (loss {loss0:.6f}), central differences of the float64 loss:")
for name, ana, f, eps, g in checks:
    num = (f(eps) - f(-eps)) / (2 * eps)
    rel = abs(ana - num) / max(abs(ana), abs(num), 1e-2 * g)
    worst = max(worst, rel)
    print(f"  {name:20s} eps {eps:g}  analytic {ana:+.6e}  numeric {num:+.6e}  rel err {rel:.1e}")
grad_ok = worst < 1e-2  # float32 kernels: ~1e-4 typical
print(f"gradient check max rel err {worst:.2e}: {'PASS' if grad_ok else 'FAIL'}")

# The shared block's dV is the sum of what each sequence alone sends it (one backward per sequence).
out, lse, q = forward(W, V)
dout = (2.0 * (out.astype(np.float64) - target) / target.size).astype(np.float32)
per_seq = sum(pn.paged_attention_bwd(dout[b:b + 1], q[b:b + 1], k_blocks, V, out[b:b + 1],
                                     lse[b:b + 1], table[b:b + 1], causal=True,
                                     seq_lens=lens[b:b + 1], runtime=rt)[2][shared] for b in range(B))
print(f"shared block {shared} (read by all {B} sequences): "
      f"max |dV - sum of per-sequence dV| = {np.abs(dV[shared] - per_seq).max():.1e}")

# ---- training: Adam on (W, V) --------------------------------------------------------------------
params = [W, V.astype(np.float64)]                  # float64 master copies; V runs as float32
m1, m2 = [0.0, 0.0], [0.0, 0.0]                      # Adam's first / second moment estimates
b1, b2, t0 = 0.9, 0.999, time.perf_counter()
losses = []
for step in range(args.steps + 1):
    loss, gW, gV = loss_and_grads(params[0], params[1].astype(np.float32))
    losses.append(loss)
    if step % 10 == 0 or step == args.steps:
        print(f"step {step:4d}  loss {loss:.6e}")
    if step == args.steps:
        break
    for n, g in enumerate((gW, gV)):
        m1[n] = b1 * m1[n] + (1 - b1) * g
        m2[n] = b2 * m2[n] + (1 - b2) * g * g
        mhat = m1[n] / (1 - b1 ** (step + 1))
        vhat = m2[n] / (1 - b2 ** (step + 1))
        params[n] = params[n] - args.lr * mhat / (np.sqrt(vhat) + 1e-8)  # NaN (unread) slots stay NaN

drop = losses[0] / max(losses[-1], 1e-300)
loss_ok = bool(np.isfinite(losses).all()) and drop > args.min_drop
print(f"loss {losses[0]:.6e} -> {losses[-1]:.6e} (drop x{drop:.1f}) in {args.steps} steps, "
      f"{time.perf_counter() - t0:.1f} s on {rt.name}: {'PASS' if loss_ok else 'FAIL'}")
sys.exit(0 if grad_ok and loss_ok else 1)
