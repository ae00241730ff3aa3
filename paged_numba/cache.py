"""PagedKVCache: a KV cache that owns its blocks -- vLLM's block manager and cache writes, for NumPy.

Symbols: N physical blocks, bs block_size, Hkv KV heads, D head_dim, T new tokens, B sequences,
H query heads, Sq queries per sequence, M max blocks per sequence.

The cache holds two pools, ``k_blocks`` and ``v_blocks`` [N, bs, Hkv, D] (``pn.Tensor`` on the
cache's runtime, zero-initialized), a free list of physical blocks, and a reference count per
block. A sequence is a list of physical blocks and a length: token t is slot ``t % bs`` of block
``blocks[t // bs]``, as in a block table row.

- ``fork`` shares every block of a sequence (reference counts + 1); nothing is copied.
- ``append`` writes new tokens after the last one, taking fresh blocks from the free list as
  needed. When the last block is partly filled and shared with another sequence, it is copied to
  a fresh block first (copy-on-write), so the other sequences never see the new tokens. Every check
  (the sequence, shapes, dtypes, enough free blocks) runs before anything changes: a failing append
  raises and leaves the cache exactly as it was.
- ``free`` drops a sequence; a block whose count falls to 0 goes back to the free list.

Several layers (``num_layers``): one block table serves L pairs of pools (``layer_pools(l)``); the
caller takes slots with ``reserve`` and writes each layer with ``write_kv`` (copy-on-write copies
the block in every layer).

Prefix caching (``prefix_caching=True``): a full block is keyed by a hash chained over (the previous
block's hash, the block's token ids), so a key names the whole prefix up to the block's end.
``add_sequence(token_ids)`` starts the sequence with the longest cached run of full blocks of
``token_ids`` (shared, reference counted; nothing is copied or recomputed). Blocks that no sequence
holds any more stay cached and are handed out again -- least recently released first -- only when
the free list is empty (``free`` releases a sequence's blocks last to first, so the tail of a
prefix is evicted before its head). ``reserve`` keys a block as soon as its tokens are known:
write its K/V before another sequence is added with those tokens.
"""
from __future__ import annotations

import hashlib
import numbers
from collections import OrderedDict

import numpy as np

from .dtypes import DType, as_dtype, from_numpy_dtype
from .errors import OutOfBlocksError
from .ops import paged_attention_fwd, paged_attention_fwd_fp8, plan_attention, write_kv
from .ops.write_kv_config import _pool_scale, write_kv_config
from .runtime import get_runtime
from .tensor import Tensor, tensor

_POOL_TYPES = (DType.F32, DType.F16, DType.BF16, DType.FP8_E4M3, DType.FP8_E5M2)
_FLOATS = (DType.F32, DType.F16, DType.BF16)


def _positive_int(value, name) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if int(value) < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {int(value)}")
    return int(value)


class _Seq:
    __slots__ = ("blocks", "length", "tokens", "hashes")

    def __init__(self, blocks, length, tokens=None, hashes=None):
        self.blocks = blocks
        self.length = length
        self.tokens = tokens    # prefix caching: the token ids so far (None: not tracked)
        self.hashes = hashes    # prefix caching: the chained hash of every full block


def _block_hash(prev: bytes, token_ids) -> bytes:
    """The key of a full block: sha256 over the previous block's key and the block's token ids."""
    return hashlib.sha256(prev + np.asarray(token_ids, np.int64).tobytes()).digest()


def _token_ids(token_ids, name) -> list:
    arr = np.asarray(token_ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise TypeError(f"{name}: expected a 1-D sequence of int token ids, got "
                        f"{arr.ndim}-D dtype {arr.dtype}")
    return [int(t) for t in arr]


class PagedKVCache:
    """A paged KV cache of ``num_blocks`` blocks of ``block_size`` tokens x ``num_kv_heads`` x
    ``head_dim``, stored as ``dtype`` (f32, f16, bf16, fp8_e4m3 or fp8_e5m2) on ``runtime``.

    FP8 caches store ``value / k_scale`` (``v_scale``) rounded to nearest even and saturated, and
    attention dequantizes with the same scales (real value = code x scale); the scales must stay
    1.0 for the other dtypes.
    """

    def __init__(self, num_blocks, block_size, num_kv_heads, head_dim, dtype="f32", *, runtime=None,
                 k_scale=1.0, v_scale=1.0, num_layers=1, prefix_caching=False):
        N = _positive_int(num_blocks, "num_blocks")
        bs = _positive_int(block_size, "block_size")
        Hkv = _positive_int(num_kv_heads, "num_kv_heads")
        D = _positive_int(head_dim, "head_dim")
        dt = as_dtype(dtype)
        if dt not in _POOL_TYPES:
            raise TypeError(f"dtype: expected one of {', '.join(d.value for d in _POOL_TYPES)}, got {dt.value}")
        self._k_scale = _pool_scale(k_scale, "k_scale", dt)
        self._v_scale = _pool_scale(v_scale, "v_scale", dt)
        self._rt = get_runtime(runtime)
        self._dtype = dt
        nl = _positive_int(num_layers, "num_layers")
        if not isinstance(prefix_caching, (bool, np.bool_)):
            raise TypeError(f"prefix_caching: expected a bool, got {type(prefix_caching).__name__}")
        shape = (N, bs, Hkv, D)
        self._layers = [tuple(Tensor(self._rt.from_host(np.zeros(shape, dt.storage)), dt, self._rt)
                              for _ in range(2)) for _ in range(nl)]
        self._k, self._v = self._layers[0]
        self._free = list(range(N - 1, -1, -1))   # a stack: pop() hands out 0, 1, 2, ... first
        self._ref = np.zeros(N, np.int64)
        self._seqs: dict = {}
        self._next_id = 0
        # Prefix caching: key -> block, block -> key, and the cached blocks nobody holds (LRU first).
        self._prefix = bool(prefix_caching)
        self._cached: dict = {}
        self._key_of: dict = {}
        self._idle: OrderedDict = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    # ------------------------------------------------------------------------- description
    @property
    def k_blocks(self) -> Tensor:
        """The K pool [N, bs, Hkv, D] (the live storage; ``.numpy()`` gives a host copy)."""
        return self._k

    @property
    def v_blocks(self) -> Tensor:
        """The V pool [N, bs, Hkv, D] (the live storage; ``.numpy()`` gives a host copy)."""
        return self._v

    @property
    def runtime(self):
        return self._rt

    @property
    def dtype(self) -> DType:
        return self._dtype

    @property
    def num_blocks(self) -> int:
        return self._k.shape[0]

    @property
    def block_size(self) -> int:
        return self._k.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self._k.shape[2]

    @property
    def head_dim(self) -> int:
        return self._k.shape[3]

    @property
    def k_scale(self) -> float:
        return self._k_scale

    @property
    def v_scale(self) -> float:
        return self._v_scale

    @property
    def num_free_blocks(self) -> int:
        """Blocks an append can take: the free list plus the cached blocks no sequence holds."""
        return len(self._free) + len(self._idle)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    def layer_pools(self, layer) -> tuple:
        """``(k_blocks, v_blocks)`` of one layer (layer 0 is ``k_blocks`` / ``v_blocks``)."""
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, numbers.Integral):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        if not 0 <= int(layer) < len(self._layers):
            raise ValueError(f"layer: expected 0 <= layer < {len(self._layers)}, got {int(layer)}")
        return self._layers[int(layer)]

    @property
    def prefix_caching(self) -> bool:
        return self._prefix

    @property
    def num_cached_blocks(self) -> int:
        """Full blocks registered in the prefix cache (held by a sequence or idle)."""
        return len(self._cached)

    @property
    def prefix_stats(self) -> dict:
        """``{"hits", "misses", "evictions"}``: full blocks of ``add_sequence`` token ids found in
        the cache, full blocks looked up and not found, cached blocks evicted for reuse."""
        return {"hits": self._hits, "misses": self._misses, "evictions": self._evictions}

    @property
    def block_nbytes(self) -> int:
        """Bytes of one block, K and V together."""
        _, bs, Hkv, D = self._k.shape
        return 2 * bs * Hkv * D * self._dtype.itemsize

    @property
    def seq_ids(self) -> list:
        """The live sequences, in the order they were created."""
        return list(self._seqs)

    @property
    def ref_counts(self) -> np.ndarray:
        """A copy of the reference count of every physical block (0 = free)."""
        return self._ref.copy()

    def blocks(self, seq_id) -> list:
        """The physical blocks of a sequence, in token order (a copy)."""
        return list(self._get(seq_id).blocks)

    def seq_len(self, seq_id) -> int:
        """Number of tokens of a sequence."""
        return self._get(seq_id).length

    def __repr__(self) -> str:
        N, bs, Hkv, D = self._k.shape
        return (f"PagedKVCache(num_blocks={N}, block_size={bs}, num_kv_heads={Hkv}, head_dim={D}, "
                f"dtype={self._dtype.value!r}, runtime={self._rt.name!r}, sequences={len(self._seqs)}, "
                f"free_blocks={len(self._free)})")

    # ------------------------------------------------------------------------- sequences
    def _get(self, seq_id) -> _Seq:
        if isinstance(seq_id, (bool, np.bool_)) or not isinstance(seq_id, numbers.Integral):
            raise TypeError(f"seq_id: expected an int, got {type(seq_id).__name__}")
        try:
            return self._seqs[int(seq_id)]
        except KeyError:
            raise KeyError(f"seq_id {int(seq_id)}: no such sequence (never added, or freed)") from None

    def add_sequence(self, token_ids=None) -> int:
        """A new sequence; returns its id (ids are never reused). Takes no fresh block.

        With prefix caching and ``token_ids`` (the tokens the sequence is about to hold), the
        sequence starts with the longest cached run of full blocks of ``token_ids``: those blocks
        are shared (reference counts + 1) and ``seq_len`` says how many tokens it already holds;
        append the rest. Without prefix caching ``token_ids`` is ignored and the sequence is empty."""
        toks = None if token_ids is None else _token_ids(token_ids, "token_ids")
        sid = self._next_id
        self._next_id += 1
        if not self._prefix:
            self._seqs[sid] = _Seq([], 0)
            return sid
        bs = self.block_size
        blocks, hashes, key = [], [], b""
        if toks is not None:
            for i in range(len(toks) // bs):
                key = _block_hash(key, toks[i * bs:(i + 1) * bs])
                b = self._cached.get(key)
                if b is None:
                    self._misses += len(toks) // bs - i
                    break
                self._hits += 1
                if self._ref[b] == 0:
                    del self._idle[b]
                self._ref[b] += 1
                blocks.append(b)
                hashes.append(key)
        n = len(blocks) * bs
        self._seqs[sid] = _Seq(blocks, n, [] if toks is None else toks[:n], hashes)
        return sid

    def fork(self, seq_id) -> int:
        """A new sequence with the same tokens, sharing every block (copy-on-write); returns its id."""
        parent = self._get(seq_id)
        sid = self._next_id
        self._next_id += 1
        for b in parent.blocks:
            self._ref[b] += 1
        self._seqs[sid] = _Seq(list(parent.blocks), parent.length,
                               None if parent.tokens is None else list(parent.tokens),
                               None if parent.hashes is None else list(parent.hashes))
        return sid

    def free(self, seq_id) -> None:
        """Drop a sequence; blocks no other sequence holds go back to the free list."""
        seq = self._get(seq_id)
        del self._seqs[int(seq_id)]
        for b in reversed(seq.blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                if b in self._key_of:
                    self._idle[b] = None      # stays cached; the most recently released is last
                else:
                    self._free.append(b)

    def _rows(self, x, name):
        """k or v as the write takes it: a Tensor on this runtime (NumPy data converted)."""
        N, bs, Hkv, D = self._k.shape
        if isinstance(x, Tensor):
            if x.runtime is not self._rt:
                raise ValueError(f"{name}: a Tensor on {x.runtime.name!r}, but the cache is on {self._rt.name!r}")
            shape = x.shape
        else:
            x = np.asarray(x)
            shape = x.shape
            if x.dtype.kind != "f" and from_numpy_dtype(x.dtype) not in _POOL_TYPES:
                raise TypeError(f"{name}: expected a float array (converted to the cache's {self._dtype.value}), "
                                f"got dtype {x.dtype}")
        if len(shape) != 3 or tuple(shape[1:]) != (Hkv, D):
            raise ValueError(f"{name}: expected [T, Hkv={Hkv}, D={D}], got shape {tuple(shape)}")
        if isinstance(x, Tensor):
            return x
        own = from_numpy_dtype(x.dtype)
        if self._dtype.is_fp8:
            target = own if own in _FLOATS else DType.F32   # the write quantizes F32 / F16 / BF16
        else:
            target = self._dtype
        if own != target:
            with np.errstate(over="ignore"):
                x = x.astype(target.numpy)
        return tensor(x, self._rt)

    def _plan(self, seq, seq_id, T):
        """(need, cow, fresh blocks in the order they will be used) for T more tokens, or raises
        OutOfBlocksError; changes nothing."""
        bs = self.block_size
        L = seq.length
        grow = -(-(L + T) // bs) - len(seq.blocks)
        cow = L % bs != 0 and self._ref[seq.blocks[-1]] > 1
        need = grow + int(cow)
        if need > self.num_free_blocks:
            what = f"{grow} to grow from {L} to {L + T} tokens" + (", 1 to copy a shared last block" if cow else "")
            raise OutOfBlocksError(f"append: sequence {int(seq_id)} needs {need} free block(s) ({what}), but only "
                                   f"{self.num_free_blocks} of {self.num_blocks} are free; free sequences or make the "
                                   "cache larger (nothing was changed)")
        n_free = min(need, len(self._free))
        fresh = self._free[len(self._free) - n_free:][::-1]   # the blocks pop() would hand out, in order
        fresh += list(self._idle)[:need - n_free]           # then the least recently released cached blocks
        return need, cow, fresh

    def _commit(self, seq, T, need, cow, fresh, token_ids):
        """Take the planned blocks (evicting idle cached ones), copy a shared last block, register
        blocks that fill up, and return the slots of the T new tokens (int64 [T])."""
        bs = self.block_size
        L = seq.length
        n_free = min(need, len(self._free))
        del self._free[len(self._free) - n_free:]
        for b in fresh[n_free:]:
            del self._idle[b]
            del self._cached[self._key_of.pop(b)]
            self._evictions += 1
        blocks = list(seq.blocks)
        if cow:
            old = seq.blocks[-1]
            blocks[-1] = fresh[0]
            for pools in self._layers:
                for pool in pools:
                    self._rt.client.run_copy_block(pool.storage, old, fresh[0])
            self._ref[old] -= 1
        blocks += fresh[int(cow):]
        for b in fresh:
            self._ref[b] = 1
        seq.blocks = blocks
        seq.length = L + T
        if seq.tokens is not None:
            if token_ids is None:
                seq.tokens = seq.hashes = None          # untracked from here on
            else:
                seq.tokens += token_ids
                self._register(seq)
        t = np.arange(L, L + T)
        return np.asarray(blocks, np.int64)[t // bs] * bs + t % bs

    def _register(self, seq):
        """Key the sequence's newly full blocks; a block whose key is cached already stays private."""
        bs = self.block_size
        for i in range(len(seq.hashes), seq.length // bs):
            key = _block_hash(seq.hashes[-1] if seq.hashes else b"", seq.tokens[i * bs:(i + 1) * bs])
            seq.hashes.append(key)
            b = seq.blocks[i]
            if key not in self._cached and b not in self._key_of:
                self._cached[key] = b
                self._key_of[b] = key

    def _check_tokens(self, token_ids, T):
        if token_ids is None:
            return None
        toks = _token_ids(token_ids, "token_ids")
        if len(toks) != T:
            raise ValueError(f"token_ids: expected {T} ids (one per new token), got {len(toks)}")
        return toks

    def reserve(self, seq_id, num_tokens, token_ids=None) -> np.ndarray:
        """Take room for ``num_tokens`` more tokens of a sequence and return their slots (int64
        [T], slot = block * bs + offset, ready for ``write_kv`` into every layer's pools). Grows the
        sequence like ``append`` (copy-on-write of a shared last block in every layer, all or
        nothing: ``OutOfBlocksError`` leaves the cache unchanged) but writes no K/V: the caller
        writes them before the next attention. ``token_ids`` (prefix caching): the ids of the new
        tokens, so the blocks they fill can be reused by later sequences; without them the
        sequence's later blocks are not cached."""
        seq = self._get(seq_id)
        if isinstance(num_tokens, (bool, np.bool_)) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 0:
            raise ValueError(f"num_tokens: expected an int >= 0, got {num_tokens!r}")
        T = int(num_tokens)
        toks = self._check_tokens(token_ids, T)
        if T == 0:
            return np.zeros(0, np.int64)
        need, cow, fresh = self._plan(seq, seq_id, T)
        return self._commit(seq, T, need, cow, fresh, toks)

    def append(self, seq_id, k, v, token_ids=None) -> None:
        """Append T tokens to a sequence: ``k``, ``v`` [T, Hkv, D], NumPy arrays of any float dtype
        (converted to the cache's dtype; FP8 caches quantize value / scale) or Tensors on the cache's
        runtime. All or nothing: raises ``OutOfBlocksError`` (or KeyError / ValueError / TypeError)
        with the cache unchanged. ``token_ids`` (prefix caching): the T token ids, as in ``reserve``.
        A cache of several layers takes ``reserve`` + ``write_kv`` per layer instead."""
        if len(self._layers) != 1:
            raise ValueError(f"append: this cache has {len(self._layers)} layers; take slots with reserve() "
                             "and write each layer's pools (layer_pools(l)) with write_kv")
        seq = self._get(seq_id)
        k = self._rows(k, "k")
        v = self._rows(v, "v")
        if v.shape != k.shape:
            raise ValueError(f"v: expected k's shape {k.shape}, got {v.shape}")
        T = k.shape[0]
        toks = self._check_tokens(token_ids, T)
        if T == 0:
            return
        need, cow, fresh = self._plan(seq, seq_id, T)
        bs = self.block_size
        blocks = list(seq.blocks)
        if cow:
            blocks[-1] = fresh[0]
        blocks += fresh[int(cow):]
        t = np.arange(seq.length, seq.length + T)
        slots = np.asarray(blocks, np.int64)[t // bs] * bs + t % bs
        write_kv_config(self._k, self._v, k, v, slots, k_scale=self._k_scale, v_scale=self._v_scale)
        # Checked: commit.
        slots = self._commit(seq, T, need, cow, fresh, toks)
        write_kv(self._k, self._v, k, v, slots, k_scale=self._k_scale, v_scale=self._v_scale)

    # ------------------------------------------------------------------------- attention
    def block_table(self, seq_ids):
        """``(block_table int32 [B, M], seq_lens int32 [B])`` of the sequences ``seq_ids`` (a list
        of ids, or one id), -1 in unused entries; M = the most blocks any of them holds (>= 1).
        Ready for the ops: ``pn.paged_attention_fwd(q, cache.k_blocks, cache.v_blocks, table,
        seq_lens=lens)``."""
        ids = [seq_ids] if isinstance(seq_ids, numbers.Integral) else list(seq_ids)
        seqs = [self._get(s) for s in ids]
        M = max([1] + [len(s.blocks) for s in seqs])
        table = np.full((len(seqs), M), -1, np.int32)
        for b, s in enumerate(seqs):
            table[b, :len(s.blocks)] = s.blocks
        lens = np.array([s.length for s in seqs], np.int32)
        return table, lens

    def plan(self, seq_ids, q_len=1, *, num_heads=None, causal=True, scale=None, cu_seqlens_q=None,
             window_left=-1, softcap=0.0, alibi_slopes=None, stream=None, check_finite=False):
        """The ``pn.plan_attention`` plan of the sequences ``seq_ids`` as they are now (their block
        table and lengths copied into the plan), for q [B, num_heads, q_len, D] -- or token-major
        [T, H, D] with ``cu_seqlens_q`` -- on the cache's runtime; ``num_heads`` defaults to the
        cache's KV heads. Run it on every layer's pools: ``plan.run(q, *cache.layer_pools(l))``
        (FP8 caches: ``plan.run_fp8(q, k, v, k_scale=cache.k_scale, v_scale=cache.v_scale)``).
        Appending to the sequences afterwards does not change the plan: plan again per step."""
        table, lens = self.block_table(seq_ids)
        H = self.num_kv_heads if num_heads is None else num_heads
        return plan_attention(table, lens, num_heads=H, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                              block_size=self.block_size, q_len=q_len, causal=causal, scale=scale,
                              cu_seqlens_q=cu_seqlens_q, window_left=window_left, softcap=softcap,
                              alibi_slopes=alibi_slopes, runtime=self._rt, stream=stream,
                              check_finite=check_finite)

    def attention(self, q, seq_ids, *, causal=True, scale=None, cu_seqlens_q=None, window_left=-1,
                  softcap=0.0, alibi_slopes=None):
        """Attention of the queries ``q`` [B, H, Sq, D] over the cached tokens of ``seq_ids``
        (B ids) -> ``(out [B, H, Sq, D], lse float32 [B, H, Sq])``.

        The Sq queries of sequence b are its last Sq tokens (append them first): query i sits at
        position ``L_b - Sq + i`` and, when ``causal``, sees keys ``j <= L_b - Sq + i``
        (bottom-right, like the ops). NumPy q of any float dtype is converted to the cache's dtype
        (FP8 caches: F32 / F16 / BF16 q is kept, others become F32), and out comes back as a NumPy
        array of that dtype; a Tensor q (on the cache's runtime) is used as is and gives Tensors.

        A mixed batch (prefill appends and decodes together): ``cu_seqlens_q`` (int [B + 1],
        non-decreasing from 0) with a token-major q [T, H, D]; sequence b's queries are rows
        ``cu[b]:cu[b + 1]``, its last q_len_b <= L_b tokens; out is [T, H, D], lse [T, H].
        ``window_left``, ``softcap`` and ``alibi_slopes`` go to the op as they are."""
        table, lens = self.block_table(seq_ids)
        as_tensor = isinstance(q, Tensor)
        q = self._attention_q(q, len(lens), cu_seqlens_q is not None)
        kw = dict(causal=causal, seq_lens=lens, scale=scale, cu_seqlens_q=cu_seqlens_q, window_left=window_left,
                  softcap=softcap, alibi_slopes=alibi_slopes)
        if self._dtype.is_fp8:
            out, lse = paged_attention_fwd_fp8(q, self._k, self._v, table, k_scale=self._k_scale,
                                               v_scale=self._v_scale, **kw)
        else:
            out, lse = paged_attention_fwd(q, self._k, self._v, table, **kw)
        return (out, lse) if as_tensor else (out.numpy(), lse.numpy())

    def _attention_q(self, q, B, ragged):
        """q checked against the cache ([B, H, Sq, D], or [T, H, D] when ragged) and made a Tensor
        on the cache's runtime in the dtype attention uses (``attention``'s docstring)."""
        as_tensor = isinstance(q, Tensor)
        if not as_tensor:
            q = np.asarray(q)
            if q.dtype.kind != "f" and from_numpy_dtype(q.dtype) not in _POOL_TYPES:
                raise TypeError(f"q: expected a float array, got dtype {q.dtype}")
        if ragged:
            if len(q.shape) != 3 or q.shape[2] != self.head_dim:
                raise ValueError(f"q: expected token-major [T, H, D={self.head_dim}] with cu_seqlens_q, "
                                 f"got shape {tuple(q.shape)}")
        elif len(q.shape) != 4 or q.shape[0] != B or q.shape[3] != self.head_dim:
            raise ValueError(f"q: expected [B={B} (one per seq_id), H, Sq, D={self.head_dim}], "
                             f"got shape {tuple(q.shape)}")
        if not as_tensor:
            own = from_numpy_dtype(q.dtype)
            if self._dtype.is_fp8:
                target = own if own in _FLOATS or own == self._dtype else DType.F32
            else:
                target = self._dtype
            with np.errstate(over="ignore"):
                q = tensor(q if own == target else q.astype(target.numpy), self._rt)
        return q


__all__ = ["PagedKVCache"]
