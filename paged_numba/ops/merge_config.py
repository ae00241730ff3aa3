"""MergeConfig: the checks of ``merge_state`` / ``merge_states`` (cascade attention's merge of
partial results by their LSEs)."""
from __future__ import annotations

from dataclasses import dataclass

from ..dtypes import DType
from .checks import _dtype_name, _float_dtype, _shape_dtype


@dataclass(frozen=True, eq=False)
class MergeConfig:
    """A validated ``merge_state`` (K = 2 states, v [R, D] after flattening the leading axes) or
    ``merge_states`` (v [T, K, H, D]) call; ``out_shape`` / ``lse_shape`` are the results'."""
    dtype: DType                 # v's dtype (F32 / F16 / BF16); the merged v has it too
    v_shape: tuple
    out_shape: tuple
    lse_shape: tuple


def _merge_v(x, name) -> DType:
    return _float_dtype(x, name, hint_fp8=False)


def _merge_s(x, name, want):
    shape, dt, npdt = _shape_dtype(x, name)
    if shape != tuple(want):
        raise ValueError(f"{name}: expected shape {tuple(want)} (v's shape without its last axis), got {shape}")
    if dt != DType.F32:
        raise TypeError(f"{name}: expected dtype f32 (natural-log LSEs, as the forward returns them), got "
                        f"{_dtype_name(dt, npdt)}")


def merge_state_config(v_a, s_a, v_b, s_b) -> MergeConfig:
    """Config of ``merge_state``: v_a, v_b [..., D] of one float dtype and shape, s_a, s_b float32
    [...] (v's shape without D)."""
    dt = _merge_v(v_a, "v_a")
    va, _, _ = _shape_dtype(v_a, "v_a")
    if len(va) < 1:
        raise ValueError("v_a: expected at least 1-D [..., D], got a 0-D array")
    vb, dtb, npb = _shape_dtype(v_b, "v_b")
    if vb != va:
        raise ValueError(f"v_b: expected v_a's shape {va}, got {vb}")
    if dtb != dt:
        raise TypeError(f"v_b: expected v_a's dtype {dt.value}, got {_dtype_name(dtb, npb)}")
    _merge_s(s_a, "s_a", va[:-1])
    _merge_s(s_b, "s_b", va[:-1])
    return MergeConfig(dtype=dt, v_shape=va, out_shape=va, lse_shape=va[:-1])


def merge_states_config(v, s) -> MergeConfig:
    """Config of ``merge_states``: v [T, K, H, D] of a float dtype, s float32 [T, K, H]."""
    dt = _merge_v(v, "v")
    vs, _, _ = _shape_dtype(v, "v")
    if len(vs) != 4:
        raise ValueError(f"v: expected 4-D [T, K, H, D] (K states per row), got {len(vs)}-D shape {vs}")
    _merge_s(s, "s", vs[:-1])
    T, _, H, D = vs
    return MergeConfig(dtype=dt, v_shape=vs, out_shape=(T, H, D), lse_shape=(T, H))


__all__ = ["MergeConfig", "merge_state_config", "merge_states_config"]
