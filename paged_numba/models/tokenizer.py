"""The byte-level BPE tokenizer of a GGUF file (``tokenizer.ggml.model == "gpt2"``), built with the
``tokenizers`` package from the file's tokens and merges, and its ChatML chat template.

Pre-tokenization follows llama.cpp's pre-tokenizer name (``tokenizer.ggml.pre``): ``smollm`` (and
the GPT-2 family) split digits one by one, then the GPT-2 byte-level regex. Control tokens
(token type 3, e.g. ``<|im_start|>``) are special: matched whole in the text, dropped by
``decode(..., skip_special_tokens=True)``.
"""
from __future__ import annotations

import re

_DIGIT_SPLIT = {"smollm": True, "gpt2": False, "default": False}
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


class Tokenizer:
    """``encode(text) -> list[int]``, ``decode(ids) -> str``, ``apply_chat_template(messages)``;
    ``eos_token_id``, ``bos_token_id``, ``vocab_size``."""

    def __init__(self, tokens, merges, token_types, *, pre="default", eos_token_id=None, bos_token_id=None,
                 chat_template=None):
        try:
            from tokenizers import AddedToken, decoders, models, pre_tokenizers
            from tokenizers import Tokenizer as _HFTokenizer
        except ImportError as e:   # pragma: no cover - depends on the environment
            raise ImportError("the tokenizer needs the 'tokenizers' package: pip install 'paged-numba[models]' "
                              "(or pip install tokenizers)") from e
        if pre not in _DIGIT_SPLIT:
            raise ValueError(f"tokenizer.ggml.pre: expected one of {sorted(_DIGIT_SPLIT)}, got {pre!r}")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if _DIGIT_SPLIT[pre]:
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            tok.pre_tokenizer = byte_level
        tok.decoder = decoders.ByteLevel()
        special = [tokens[i] for i, t in enumerate(token_types) if int(t) == 3]
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
        self._tok = tok
        self.vocab_size = len(tokens)
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        self._chatml = chat_template is not None and "<|im_start|>" in chat_template
        m = _DEFAULT_SYSTEM.search(chat_template.replace("\\n", "\n")) if self._chatml else None
        self.default_system_prompt = m.group(1) if m else None

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._tok.token_to_id(token)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """The file's ChatML template: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message,
        the template's default system message first when the first message is not a system one,
        and ``<|im_start|>assistant\\n`` at the end when ``add_generation_prompt``."""
        if not self._chatml:
            raise ValueError("chat template: this model's file has no ChatML (<|im_start|>) template; "
                             "only ChatML templates are supported")
        if isinstance(messages, (str, bytes)) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise TypeError("messages: expected a list of {'role': str, 'content': str} dicts")
        parts = []
        if messages and messages[0]["role"] != "system" and self.default_system_prompt is not None:
            parts.append(f"<|im_start|>system\n{self.default_system_prompt}<|im_end|>\n")
        for m in messages:
            parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
        return "".join(parts)
