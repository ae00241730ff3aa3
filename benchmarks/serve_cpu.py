"""Serving SmolLM2-135M from the paged cache on the CPU: the three targets, one run, side by side.

1. 16 concurrent prompts (20-200 tokens, 64 new tokens each, greedy): throughput of
   ``pn.models.Engine`` vs Hugging Face transformers' batched ``generate`` (left padding) on torch
   CPU with the same float32 weights (transformers dequantizes the same GGUF; an optional anchor,
   skipped when torch / transformers / accelerate are missing), and how many prompts got the same
   greedy tokens.
2. A 512-token system prompt shared by 32 requests (+ 16-64 own tokens, 1 new token each), all
   admitted in one step (a token budget of 32768, so the 32 are resident together): cache blocks
   (peak) and prefill time with and without prefix caching.
3. Time to first token of a 100-token prompt after warm-up (median of 5, prefix caching off).

Run:  python benchmarks/serve_cpu.py [--skip-hf] [--no-save]
Appends to benchmarks/results/serve_cpu.md (machine, date, commit).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paged_numba as pn  # noqa: E402
from common import append_results, markdown_table  # noqa: E402
from paged_numba.models.cli import make_prompts  # noqa: E402
from paged_numba.models.llama import default_model_path  # noqa: E402


def hf_generate(path, prompts, max_new, pad_id):
    """(new token lists, seconds) from transformers' batched greedy generate, or None."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"HF anchor skipped: {e}", file=sys.stderr)
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    d, f = os.path.split(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    except Exception as e:   # an old transformers without GGUF support, no accelerate, ...
        print(f"HF anchor skipped: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    model.eval()
    T = max(map(len, prompts))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad_id, eos_token_id=pad_id)
    with torch.inference_mode():
        model.generate(input_ids=ids[:2, -8:], attention_mask=mask[:2, -8:], **dict(kw, max_new_tokens=2))  # warm-up
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, **kw)
        secs = time.perf_counter() - t
    res = []
    for row in out[:, T:].tolist():
        res.append(row[:row.index(pad_id)] if pad_id in row else row)
    return res, secs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--ttft-only", action="store_true", help="only target 3 (time to first token)")
    args = ap.parse_args()
    path = default_model_path()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = time.perf_counter()
    model = pn.models.load_gguf(path)
    print(f"loaded in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    tok = model.tokenizer
    Engine = pn.models.Engine
    # Warm-up: every kernel specialization the runs below use (decode batches, prefills).
    Engine(model, num_blocks=64, runtime="cpu").generate(make_prompts(tok, 4, 20, 40, seed=99), max_new_tokens=4)
    rows = []
    if args.ttft_only:
        rows.append(_ttft_row(Engine, model, tok))
        return _save(rows, args, load_start, "time to first token only")

    # 1. Throughput, 16 concurrent prompts.
    prompts = make_prompts(tok, 16, 20, 200, seed=0)
    blocks = sum(-(-(len(p) + 64) // 16) for p in prompts) + 8
    eng = Engine(model, num_blocks=blocks, runtime="cpu")
    t = time.perf_counter()
    res = eng.generate(prompts, max_new_tokens=64)
    secs = time.perf_counter() - t
    ours = [r.token_ids for r in res]
    n_new = sum(map(len, ours))
    tps = n_new / secs
    print(f"paged_numba: {n_new} new tokens in {secs:.2f} s = {tps:.1f} tokens/s", file=sys.stderr)
    # 2. Shared 512-token system prompt x 32 requests.
    shared = make_prompts(tok, 32, 16, 64, seed=1, shared_prefix=512)
    out = {}
    for pc in (True, False):
        blocks = sum(-(-(len(p) + 1) // 16) for p in shared) + 8
        e = Engine(model, num_blocks=blocks, runtime="cpu", prefix_caching=pc, max_tokens_per_step=32768)
        t = time.perf_counter()
        r = e.generate(shared, max_new_tokens=1)
        out[pc] = (time.perf_counter() - t, e.stats["peak_blocks"], e.stats["prefill_tokens"], [x.token_ids for x in r])
        print(f"shared prefix, caching {pc}: {out[pc][0]:.2f} s, peak blocks {out[pc][1]}, prefill tokens {out[pc][2]}",
              file=sys.stderr)
    b_ratio = out[True][1] / out[False][1]
    t_ratio = out[True][0] / out[False][0]
    rows.append(["512-token shared prompt x 32: cache blocks (peak)", f"{out[True][1]} with caching",
                 f"{out[False][1]} without", f"{b_ratio:.2f}x", f"<= 0.3x: {'met' if b_ratio <= 0.3 else 'missed'}"])
    rows.append(["512-token shared prompt x 32: prefill time", f"{out[True][0]:.2f} s ({out[True][2]} tokens computed)",
                 f"{out[False][0]:.2f} s ({out[False][2]} tokens)", f"{t_ratio:.2f}x",
                 f"<= 0.5x: {'met' if t_ratio <= 0.5 else 'missed'}; same tokens: {out[True][3] == out[False][3]}"])

    # 3. Time to first token, 100-token prompt, after warm-up.
    rows.append(_ttft_row(Engine, model, tok))

    # The anchor last, so torch's threads never run next to the timings above.
    hf = None if args.skip_hf else hf_generate(path, prompts, 64, tok.eos_token_id)
    if hf is None:
        rows.insert(0, ["16 prompts x 64 new tokens, throughput", f"{tps:.1f} tok/s ({secs:.1f} s)", "HF anchor not run",
                        "n/a", ">= 1.5x HF"])
    else:
        hf_ids, hf_secs = hf
        hf_tps = sum(map(len, hf_ids)) / hf_secs
        same = sum(a == b for a, b in zip(ours, hf_ids))
        first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                      for a, b in zip(ours, hf_ids) if a != b]
        agree = f"{same}/16 prompts identical" + (f" (others diverge at token {first_diff})" if first_diff else "")
        ratio = tps / hf_tps
        rows.insert(0, ["16 prompts x 64 new tokens, throughput", f"{tps:.1f} tok/s ({secs:.1f} s)",
                        f"{hf_tps:.1f} tok/s ({hf_secs:.1f} s); {agree}", f"{ratio:.2f}x",
                        f">= 1.5x HF: {'met' if ratio >= 1.5 else 'missed'}"])
        print(f"HF: {sum(map(len, hf_ids))} tokens in {hf_secs:.2f} s = {hf_tps:.1f} tokens/s; {agree}", file=sys.stderr)

    return _save(rows, args, load_start, "one run of each workload after a warm-up")


def _ttft_row(Engine, model, tok):
    e = Engine(model, num_blocks=16, runtime="cpu", prefix_caching=False)
    e.generate(make_prompts(tok, 1, 100, 100, seed=50), max_new_tokens=1)
    ttfts = [e.generate(make_prompts(tok, 1, 100, 100, seed=60 + i), max_new_tokens=1)[0].ttft for i in range(5)]
    ttft = float(np.median(ttfts))
    print(f"time to first token: {[round(x * 1e3) for x in ttfts]} ms", file=sys.stderr)
    return ["time to first token, 100-token prompt (median of 5)", f"{ttft * 1e3:.0f} ms",
            f"runs {', '.join(f'{x * 1e3:.0f}' for x in ttfts)} ms", "", f"<= 300 ms: {'met' if ttft <= 0.3 else 'missed'}"]


def _save(rows, args, load_start, what):
    table = markdown_table(["workload", "paged_numba", "anchor / other run", "ratio", "target"], rows)
    print(table)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = (f"SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), block size 16, greedy, chunked prefill "
             f"budget 512 tokens per step; {what}; HF = transformers batched "
             f"generate (left padding) on torch CPU, same float32 weights; the shared-prompt runs admit all 32 "
             f"requests in one step; the anchor runs last; load average {load_start:.1f} at the start, {load:.1f} at "
             "the end (the machine is shared).")
    if not args.no_save:
        print("appended to", append_results("serve_cpu", "Serving SmolLM2-135M on the CPU", table, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
