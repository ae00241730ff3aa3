"""A continuous-batching engine over one paged KV cache (vLLM's scheduler, in small).

Every step schedules at most ``max_tokens_per_step`` tokens:
1. **Running requests** first: one token for every decoding request, then prompt chunks (chunked
   prefill: a long prompt is spread over several steps), their slots reserved in the cache. When
   the cache runs out, the most recently admitted request not yet given room this step is
   **preempted**: its blocks are freed, and it goes back to the front of the queue to be
   recomputed later from its prompt and the tokens it has generated so far (what it produces does
   not change). A request that cannot fit in an empty cache is a ValueError at submission.
2. **Admission**, oldest first, while tokens, ``max_num_seqs`` and free blocks allow (and nothing
   was preempted this step): with prefix caching the new sequence starts with the longest cached
   run of full blocks of its prompt (``add_sequence``), including blocks reserved earlier in the
   same step, and only the rest is prefilled.
3. **Run** the model once for all scheduled tokens, sample the next token of every request whose
   known tokens are all in the cache, and **finish** requests at EOS, a stop string or
   ``max_new_tokens``; finished requests free their blocks (prefix-cached full blocks stay cached).
"""
from __future__ import annotations

import numbers
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..cache import PagedKVCache
from ..errors import OutOfBlocksError


@dataclass
class Result:
    """One finished request: ``token_ids`` (the new tokens only, EOS not included), ``text`` (their
    decoded text, cut before a stop string), ``finish_reason`` ("length", "eos" or "stop"),
    ``prompt_tokens``, ``cached_tokens`` (prompt tokens served by the prefix cache at the last
    admission), ``preemptions``, ``ttft`` (seconds from submission to the first new token)."""
    index: int
    prompt: str
    token_ids: list
    text: str
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int = 0
    preemptions: int = 0
    ttft: float = float("nan")


@dataclass
class StreamEvent:
    """A new token of request ``index``: its id, the text it adds (may be empty while a multi-byte
    character is incomplete), and ``finished`` with the Result on the request's last event."""
    index: int
    token_id: int
    text: str
    finished: bool = False
    result: Result = None


@dataclass
class _Request:
    index: int
    prompt: str
    prompt_ids: list
    max_new: int
    rng: np.random.Generator
    submitted: float
    out: list = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    seq: int = None
    computed: int = 0          # tokens (prompt + out) whose K/V are in the cache
    cached: int = 0
    preemptions: int = 0
    ttft: float = float("nan")

    @property
    def tokens(self):
        return self.prompt_ids + self.out


def _int_arg(value, name, lo, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {value}")
    return int(value)


class Engine:
    """``Engine(model, num_blocks=..., block_size=16, runtime=None, prefix_caching=True,
    max_num_seqs=64, max_tokens_per_step=512)``: continuous batching of ``model`` (a
    ``LlamaModel``) over one ``PagedKVCache`` of ``num_blocks`` blocks per layer (float32 K/V).

    ``generate(prompts, ...)`` -> a list of ``Result`` in prompt order; ``stream(prompts, ...)``
    yields ``StreamEvent`` as tokens are produced. ``stats`` counts steps, tokens and prefix hits.
    """

    def __init__(self, model, num_blocks=512, block_size=16, runtime=None, prefix_caching=True, *,
                 max_num_seqs=64, max_tokens_per_step=512):
        from .llama import LlamaModel
        if not isinstance(model, LlamaModel):
            raise TypeError(f"model: expected a LlamaModel (from pn.models.load_gguf), got {type(model).__name__}")
        c = model.config
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_num_seqs = _int_arg(max_num_seqs, "max_num_seqs", 1)
        self.max_tokens_per_step = _int_arg(max_tokens_per_step, "max_tokens_per_step", 1)
        self.cache = PagedKVCache(num_blocks, block_size, c.num_kv_heads, c.head_dim, "f32", runtime=runtime,
                                  num_layers=c.num_layers, prefix_caching=prefix_caching)
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "preemptions": 0,
                      "prefill_time": 0.0, "peak_blocks": 0}

    # ------------------------------------------------------------------------- public
    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, stop=None,
                 seed=None) -> list:
        """Generate for every prompt (a str, a list of token ids, or a list of those) -> a list of
        Result, in prompt order. ``temperature`` 0 is greedy; otherwise softmax sampling with
        optional ``top_k`` / ``top_p`` from a generator seeded with (seed, prompt index)."""
        results = {}
        for ev in self.stream(prompts, max_new_tokens, temperature, top_k, top_p, stop, seed):
            if ev.finished:
                results[ev.index] = ev.result
        return [results[i] for i in sorted(results)]

    def stream(self, prompts, max_new_tokens=64, temperature=0.0, top_k=None, top_p=None, stop=None,
               seed=None):
        """The streaming form of ``generate``: yields a StreamEvent per new token, in the order
        they are produced (requests interleave). The arguments are checked at the call."""
        reqs = self._submit(prompts, max_new_tokens, seed)
        return self._run(reqs, self._sampling(temperature, top_k, top_p), self._stops(stop))

    def _run(self, reqs, sampling, stop):
        waiting = deque(reqs)
        running = []
        for r in list(waiting):        # requests that need no generation at all
            if r.max_new == 0:
                waiting.remove(r)
                yield StreamEvent(r.index, -1, "", True, self._result(r, "length"))
        try:
            while waiting or running:
                yield from self._step(waiting, running, sampling, stop)
        finally:                       # an abandoned or failed stream gives its blocks back
            for r in running:
                if r.seq is not None:
                    self.cache.free(r.seq)
                    r.seq = None

    # ------------------------------------------------------------------------- argument checks
    def _submit(self, prompts, max_new_tokens, seed):
        max_new = _int_arg(max_new_tokens, "max_new_tokens", 0)
        seed = _int_arg(seed, "seed", 0, allow_none=True)
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a str, a list of token ids or a list of those, "
                            f"got {type(prompts).__name__}")
        ctx = self.model.config.context_length
        cap = self.cache.num_blocks * self.cache.block_size
        reqs = []
        now = time.perf_counter()
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = self.tokenizer.encode(p)
            elif isinstance(p, (list, tuple, np.ndarray)) and all(isinstance(t, numbers.Integral) for t in p):
                ids = [int(t) for t in p]
                p = self.tokenizer.decode(ids)
            else:
                raise TypeError(f"prompts[{i}]: expected a str or a list of int token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompts[{i}]: the prompt is empty (expected at least one token)")
            bad = [t for t in ids if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise ValueError(f"prompts[{i}]: token id {bad[0]} is outside the vocabulary [0, "
                                 f"{self.model.config.vocab_size})")
            total = len(ids) + max_new
            if total > ctx:
                raise ValueError(f"prompts[{i}]: {len(ids)} prompt + {max_new} new tokens exceed the model's "
                                 f"context length {ctx}")
            if total > cap:
                raise ValueError(f"prompts[{i}]: {total} tokens need {-(-total // self.cache.block_size)} blocks, "
                                 f"but the cache has {self.cache.num_blocks}; make num_blocks larger")
            rng = np.random.default_rng([seed if seed is not None else int(time.time_ns() % 2**32), i])
            reqs.append(_Request(i, p, ids, max_new, rng, now))
        return reqs

    @staticmethod
    def _sampling(temperature, top_k, top_p):
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature >= 0:
            raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
        top_k = _int_arg(top_k, "top_k", 1, allow_none=True)
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
        return float(temperature), top_k, top_p

    @staticmethod
    def _stops(stop):
        if stop is None:
            return []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise TypeError(f"stop: expected a str or a list of non-empty str, got {stop!r}")
        return list(stop)

    # ------------------------------------------------------------------------- scheduling
    def _preempt(self, r, waiting, running):
        self.cache.free(r.seq)
        r.seq, r.computed = None, 0
        r.preemptions += 1
        self.stats["preemptions"] += 1
        running.remove(r)
        waiting.appendleft(r)

    def _schedule(self, waiting, running):
        """(request, token ids, slots) per scheduled request, slots reserved. Running requests come
        first (decodes, then prompt chunks, oldest first), preempting the youngest unscheduled one
        when the cache runs out; then waiting requests are admitted while the token budget, the
        sequence limit and the free blocks allow. A request admitted after another's chunk was
        reserved can hit that chunk's blocks: every layer writes the step's K/V before its
        attention, so they are in place when it reads them."""
        budget = self.max_tokens_per_step
        plan, planned = [], set()
        order = sorted(running, key=lambda r: (len(r.tokens) - r.computed != 1, running.index(r)))
        i = 0
        preempted = False
        while i < len(order) and budget > 0:
            r = order[i]
            n = min(len(r.tokens) - r.computed, budget)
            toks = r.tokens[r.computed:r.computed + n]
            try:
                slots = self.cache.reserve(r.seq, n, toks)
            except OutOfBlocksError:
                victim = next(v for v in reversed(running) if id(v) not in planned)
                if victim is r and not plan and len(running) == 1:
                    raise RuntimeError("the cache cannot hold one request; make num_blocks larger") from None
                order.remove(victim)
                self._preempt(victim, waiting, running)
                preempted = True
                continue
            plan.append((r, toks, slots))
            planned.add(id(r))
            budget -= n
            i += 1
        while waiting and not preempted and budget > 0 and len(running) < self.max_num_seqs:
            r = waiting[0]
            toks = r.tokens
            r.seq = self.cache.add_sequence(toks[:-1])     # the last known token is always recomputed
            r.computed = r.cached = self.cache.seq_len(r.seq)
            n = min(len(toks) - r.computed, budget)
            chunk = toks[r.computed:r.computed + n]
            try:
                slots = self.cache.reserve(r.seq, n, chunk)
            except OutOfBlocksError:
                self.cache.free(r.seq)                    # its hits go back to the cache
                r.seq, r.computed, r.cached = None, 0, 0
                break
            waiting.popleft()
            running.append(r)
            plan.append((r, chunk, slots))
            budget -= n
        return plan

    def _step(self, waiting, running, sampling, stop):
        plan = self._schedule(waiting, running)
        if not plan:
            if not running:
                raise RuntimeError("the engine could not schedule a waiting request in an idle cache")
            return
        used = self.cache.num_blocks - self.cache.num_free_blocks
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], used)
        items = []
        for r, toks, slots in plan:
            r.computed += len(toks)
            items.append((r.seq, toks, slots, r.computed == len(r.tokens)))
        # Decode tokens: the one new token of a request that has generated before; the rest is
        # prefill (prompt chunks, and the recompute of preempted requests).
        n_all = sum(len(t) for _, t, _ in plan)
        n_dec = sum(1 for r, t, _ in plan if len(t) == 1 and r.out and r.computed == len(r.tokens))
        t0 = time.perf_counter()
        logits = self.model.forward(self.cache, items)
        dt = time.perf_counter() - t0
        self.stats["steps"] += 1
        self.stats["prefill_tokens"] += n_all - n_dec
        self.stats["decode_tokens"] += n_dec
        if n_all > n_dec:
            self.stats["prefill_time"] += dt
        row = 0
        for (r, toks, _), (_, _, _, want) in zip(plan, items):
            if not want:
                continue
            tok = self._sample(logits[row], r.rng, *sampling)
            row += 1
            yield from self._emit(r, tok, stop, running)

    def _emit(self, r, tok, stop, running):
        eos = self.tokenizer.eos_token_id
        if np.isnan(r.ttft):
            r.ttft = time.perf_counter() - r.submitted
        reason = None
        if eos is not None and tok == eos:
            reason = "eos"
        else:
            r.out.append(tok)
            text = self.tokenizer.decode(r.out)
            for s in stop:
                at = text.find(s)
                if at >= 0:
                    text, reason = text[:at], "stop"
                    break
            if reason is None and len(r.out) >= r.max_new:
                reason = "length"
            if reason is not None or not text.endswith("\ufffd"):   # else: a multi-byte character is incomplete
                r.text = text
        delta = r.text[len(r.emitted):]
        r.emitted = r.text
        if reason is None:
            yield StreamEvent(r.index, tok, delta)
            return
        running.remove(r)
        self.cache.free(r.seq)
        r.seq = None
        yield StreamEvent(r.index, tok, delta, True, self._result(r, reason))

    def _result(self, r, reason):
        return Result(r.index, r.prompt, list(r.out), r.text, reason, len(r.prompt_ids), r.cached,
                      r.preemptions, r.ttft)

    @staticmethod
    def _sample(logits, rng, temperature, top_k, top_p):
        if temperature == 0.0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        if top_k is not None and top_k < z.size:
            kth = np.partition(z, -top_k)[-top_k]
            z = np.where(z >= kth, z, -np.inf)
        p = np.exp(z - z.max())
        p /= p.sum()
        if top_p is not None and top_p < 1.0:
            idx = np.argsort(-p)
            cum = np.cumsum(p[idx])
            keep = idx[:int(np.searchsorted(cum, top_p) + 1)]
            q = np.zeros_like(p)
            q[keep] = p[keep]
            p = q / q.sum()
        return int(rng.choice(p.size, p=p))
