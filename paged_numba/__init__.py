"""paged_numba: vLLM-style paged attention (block-table KV cache) for NumPy users, on the CPU
(parallel numba loops) and on NVIDIA GPUs (numba.cuda kernels)."""
from .cache import PagedKVCache
from .dtypes import DType
from .errors import OutOfBlocksError, RuntimeUnavailableError
from .ops import (AttentionPlan, merge_state, merge_states, paged_attention_bwd, paged_attention_fwd,
                  paged_attention_fwd_fp8, plan_attention, write_kv)
from .runtime import Runtime, available_runtimes, get_runtime, register_runtime
from .tensor import Tensor, tensor
from . import models  # noqa: E402  (pn.models: the GGUF runner and the engine; gguf / tokenizers load lazily)

__version__ = "0.1.0"

__all__ = ["DType", "Runtime", "RuntimeUnavailableError", "Tensor", "available_runtimes",
           "get_runtime", "paged_attention_bwd", "paged_attention_fwd", "paged_attention_fwd_fp8",
           "register_runtime", "tensor", "__version__"]
__all__ += ["AttentionPlan", "plan_attention", "OutOfBlocksError", "PagedKVCache", "merge_state", "merge_states", "write_kv"]
