"""Launch geometry of the CUDA kernels, in pure Python (imports neither numba nor numba.cuda).

Everything the client needs to pick a grid, a block and a kernel specialization lives here: decode
geometry, split-K partitions, tensor-core prefill tiles, merge threads, word widths. The compile
check (``scripts/cuda_compile_check.py``) and the sweep scripts enumerate the same functions, so
what they compile and time is what the client launches.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DECODE_NT = 128     # threads per decode block on a GPU
DECODE_R = 4        # most query rows per decode block
DECODE_EPL = 8      # most elements of a token row per lane (sets the lanes per row)
DECODE_TILE_BYTES = 8192  # bytes of K (and as many of V) per shared-memory tile of a decode block
DECODE_TPS = 4      # most tokens of a tile per token slot (R scores each, in registers)
DECODE_MAX_PT = 2048  # longest split-K partition (its slot list lives in shared memory)
DECODE_MAX_SQ = 4   # more queries per sequence: the tiled kernel (= ops.config.DECODE_MAX_Q, the work list's cut)
STATIC_SMEM = 48 * 1024  # dynamic shared memory above this needs the kernel's opt-in attribute


def word_dtype(row_bytes: int):
    """The widest unsigned word (8, 4, 2, 1 bytes) that divides a K/V row of ``row_bytes``."""
    for dt in (np.uint64, np.uint32, np.uint16, np.uint8):
        if row_bytes % np.dtype(dt).itemsize == 0:
            return np.dtype(dt)


def lanes_per_row(D: int, W: int, sim: bool, epl: int) -> int:
    """Lanes per token row: the fewest (a power of two dividing the warp, at most W) that leave each
    lane at most ``epl`` elements of a row (more would spill registers), or the most there are."""
    if sim:
        return 1
    E = D // W                      # elements per word
    cap = 1
    while cap * 2 <= min(32, W):
        cap *= 2
    t = 1
    while t < cap and -(-W // t) * E > epl:
        t *= 2
    return t


def pow2_at_most(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


def decode_rows(rows: int) -> int:
    """Query rows per decode block: the G * Sq rows of a (sequence, KV head) rounded up to a power of
    two, at most ``DECODE_R``."""
    return min(DECODE_R, pow2_at_most(2 * rows - 1))


def decode_geometry(D: int, kv_bytes: int, word_bytes: int, rows: int, PT: int, sim: bool) -> dict:
    """The decode kernel's geometry for head dim D, K/V elements of ``kv_bytes``, rows read as words
    of ``word_bytes``, ``rows`` = G * Sq query rows per (sequence, KV head) and partitions of PT
    tokens: TX lanes per token row, NT threads, R rows per block (the GQA group, up to
    ``DECODE_R``), TT tokens per tile (about ``DECODE_TILE_BYTES`` of K, at most PT and
    ``DECODE_TPS`` tokens per token slot, a multiple of the NT / TX slots). The figures are the
    fastest of the H200 sweeps in benchmarks/results/gpu_decode_sweep.md."""
    W = D * kv_bytes // word_bytes
    TX = lanes_per_row(D, W, sim, DECODE_EPL)
    NT = 32 if sim else DECODE_NT
    R = decode_rows(rows)
    NZ = NT // TX
    # Static shared memory (48 KiB at most): slot list 8 * PT, K and V tiles, the warps' partial
    # results 4 * (NT / 32) * R * (D + 2).
    room = 48 * 1024 - 8 * PT - 4 * max(1, NT // 32) * R * (D + 2)
    tile = min(DECODE_TILE_BYTES, room // 2)
    TT = max(NZ, min(PT, DECODE_TPS * NZ, pow2_at_most(tile // (D * kv_bytes))))
    return dict(TX=TX, NT=NT, R=R, TT=TT)


def fp8_hw_convert(cc: tuple) -> bool:
    """Whether a device of compute capability ``cc`` has the FP8 -> F16 pair converter
    (``cvt.rn.f16x2.e4m3x2``, sm_89 and later) that the decode and prefill kernels then use for E4M3
    K/V."""
    return tuple(cc) >= (8, 9)


def partition(max_len: int, row_blocks: int, sm_count: int, sim: bool) -> int:
    """Tokens per split-K partition: the longest (up to ``DECODE_MAX_PT``, down to 64) that still
    gives every SM a thread block -- long partitions amortize each block's set-up and the merge;
    the simulator uses 16."""
    if sim:
        return 16
    pt = DECODE_MAX_PT
    while pt > 64 and row_blocks * -(-max_len // pt) < sm_count:
        pt //= 2
    return pt


# The 3xTF32 prefill (F32, head dims up to 128): 8 warps of 16 rows over 32-key tiles, up to 255
# registers at D 128 and no spills on sm_90 (41.5 TFLOP/s in the H200 sweep of
# scripts/prefill_probe.py --sweep; 16-key tiles 32.1; 2 m-tiles per warp 42.3 but spilling on sm_80
# and with softcap / ALiBi). Below sm_90 ptxas spills 8-20 B at D 128 over 32-key tiles, so head
# dims above 64 take 16-key tiles there (184-199 registers, no spills).
TF32_TILES = (8, 1, 32)
TF32_TILES_PRE_SM90 = (8, 1, 16)


def mma_tiles(D: int, sim: bool, fp8: bool = False, window: bool = False, mods: bool = False,
              tf32: bool = False, cc: tuple = (9, 0)) -> tuple:
    """(NW warps, MT m-tiles of 16 query rows per warp, BK keys per tile) of the tensor-core prefill
    for head dim D (a multiple of 16); K/V tiles are double buffered in dynamic shared memory
    (``paged_prefill.smem_bytes``). Up to D 128: 4 warps of 32 rows (each K / V fragment read from
    shared memory feeds two mma) over 32-key tiles, 255 registers and no spills at D 128 -- the
    fastest of the H200 sweep in benchmarks/results/gpu_prefill_sweep.md; with FP8 K/V (whose
    decode pass needs registers of its own), a sliding window (per-row lower bounds) or the score
    modifiers (softcap / ALiBi: per-score work; 32-row warps spill) 8 warps of 16 rows over 64-key
    tiles, the fastest spill-free 16-row layout of the sweep; D 256: 16 rows per warp (the O
    accumulators take 128 registers), over 16-key tiles with the modifiers. F32 (``tf32``, 3xTF32 on
    32-bit tiles): ``TF32_TILES``, below compute capability ``cc`` 9.0 ``TF32_TILES_PRE_SM90`` for
    head dims above 64. The simulator runs 1 warp of 2 m-tiles over 16-key tiles
    (tests swap in others)."""
    if sim:
        return 1, 2, 16
    if tf32:
        return TF32_TILES_PRE_SM90 if D > 64 and tuple(cc) < (9, 0) else TF32_TILES
    if D > 128:
        return 4, 1, 16 if mods else 32
    return (8, 1, 64) if fp8 or window or mods else (4, 2, 32)


# The split-K decode on tensor cores (``paged_prefill`` with SPLIT): a block is one warp of 16 query
# rows -- a (sequence, KV head)'s G * Sq decode rows, padded -- walking one partition of keys in
# tiles of MMA_DECODE_BK; partitions shrink (down to MMA_DECODE_MIN_PT) until the grid has
# MMA_DECODE_BLOCKS_PER_SM blocks per SM, so every SM keeps several tiles' copies in flight.
# The H200 sweep (scripts/decode_sweep.py --mma, 2026-12-04): B32 H32/8 D128 L4096 BF16 177 us with
# 32-key tiles (64: 191-213 us; SIMT decode 277 us); B1 L65536 242 us against the SIMT decode's 149
# (one sequence's 8 row blocks need hundreds of partitions, and their merge is serial per row), so
# batches with fewer row blocks than MMA_DECODE_MIN_ROW_BLOCKS_PER_SM per SM keep the SIMT decode;
# FP8 K/V too (376-700 us against 230: the codes' decode after each tile's wait serializes one warp).
MMA_DECODE_BK = 32
MMA_DECODE_BLOCKS_PER_SM = 16
MMA_DECODE_MIN_PT = 256
MMA_DECODE_MIN_ROW_BLOCKS_PER_SM = 1


def mma_decode_wanted(row_blocks: int, sm_count: int, sim: bool) -> bool:
    """Whether a decode batch of ``row_blocks`` (sequence, KV head, 16-row) blocks per partition goes
    to the tensor-core decode: at least ``MMA_DECODE_MIN_ROW_BLOCKS_PER_SM`` per SM (always on the
    simulator, so CI runs it)."""
    return sim or row_blocks >= MMA_DECODE_MIN_ROW_BLOCKS_PER_SM * sm_count


def mma_decode_tiles(D: int, sim: bool) -> tuple:
    """(NW, MT, BK) of the split-K decode on tensor cores for head dim D: one warp of one m-tile (the
    decode rows of a (sequence, KV head) are few: more warps would idle) over ``MMA_DECODE_BK``-key
    tiles (head dims up to 128: the client keeps the SIMT decode above); the simulator runs 16-key
    tiles."""
    if sim:
        return 1, 1, 16
    return 1, 1, MMA_DECODE_BK


def mma_decode_row_tiles(rows: int, D: int, sim: bool) -> int:
    """Row tiles (grid y) of the tensor-core decode for ``rows`` = G * q_len rows per (sequence, KV
    head) at head dim D: blocks of ``mma_decode_tiles``' 16 * MT * NW rows."""
    NW, MT, _ = mma_decode_tiles(D, sim)
    return -(-rows // (16 * MT * NW))


def mma_decode_partition(span: int, row_blocks: int, sm_count: int, BK: int, sim: bool) -> int:
    """Keys per partition of the split-K decode on tensor cores: the longest power of two up to
    ``DECODE_MAX_PT`` (down to ``MMA_DECODE_MIN_PT``, at least BK) that gives the grid
    ``MMA_DECODE_BLOCKS_PER_SM`` blocks per SM; 16 on the simulator (several partitions, merged)."""
    if sim:
        return 16
    pt = DECODE_MAX_PT
    floor = max(BK, MMA_DECODE_MIN_PT)
    while pt > floor and row_blocks * -(-span // pt) < MMA_DECODE_BLOCKS_PER_SM * sm_count:
        pt //= 2
    return pt


# The 3xTF32 backward (F32; 32-bit tiles, 16-row steps): 8 warps over 128 keys where a block may opt
# in to 227 KB of shared memory (215,040 B at D 128), 4 warps on 163 KB parts (129,024 B), 2 on
# 99 KB parts (86,016 B). 8 x 16 was the fastest of the H200 sweep (benchmarks/gpu_backward.py
# --f32-bwd-tiles, 2026-12-04: 4 x 16 and 4 x 32 took 1.35x and 1.19x its time).
TF32_BWD_TILES = {227: (8, 16, 0), 163: (4, 16, 0), 99: (2, 16, 0)}


def smem_optin_kb(cc: tuple) -> int:
    """Shared memory (KB) a thread block may opt in to on compute capability ``cc``: 227 on sm_90 /
    sm_100, 163 on sm_80 / sm_87, else (sm_86, sm_89, sm_120, unknown) 99."""
    cc = tuple(cc)
    if cc[0] in (9, 10):
        return 227
    return 163 if cc in ((8, 0), (8, 7)) else 99


def mma_bwd_tiles(D: int, sim: bool, window: bool = False, vred: bool = True, tf32: bool = False,
                  cc: tuple = (9, 0)) -> tuple:
    """(NW warps, BQ query rows per step, MAXREG register cap or 0) of the tensor-core backward
    (``paged_backward_mma``) for head dim D (a multiple of 16, at most 128): a block owns 16 * NW
    keys (16 per warp; dK / dV of D floats per thread stay in registers), the step's q / dout rows
    are double buffered in dynamic shared memory (``paged_backward_mma.smem_bytes``). 8 warps over
    128 keys (as FlashAttention-2 at D 64 / 128): each step's dQ atomics (BQ x D per block) and q /
    dout copies serve 128 keys; BQ 64 up to D 64, 32 above. Uncapped, ptxas takes 255 registers
    and spills a few bytes in some of these (D 80, D 64 with a window, D 128 without VRED); the
    caps are ones the sm_90 (``vred``: vector reductions) / sm_80 check compiles without spills
    (scripts/cuda_compile_check.py) -- ptxas is erratic this close to 255 (at D 64 a cap of 224
    spills with VRED and 232 without, not the other way round).
    Not yet tuned on a GPU: benchmarks/gpu_backward.py --bwd-tiles compares layouts. The simulator
    runs 1 warp over 16-row steps (tests swap in others). F32 (``tf32``, 3xTF32 on 32-bit tiles):
    ``TF32_BWD_TILES`` by the shared memory of compute capability ``cc``. (issue 11 item 5)"""
    if sim:
        return 1, 16, 0
    if tf32:
        return TF32_BWD_TILES[smem_optin_kb(cc)]
    if D <= 64:
        return 8, 64, (232 if vred or window else 224)
    return 8, 32, (200 if D <= 80 else 240)


def merge_threads(D: int, sim: bool) -> int:
    """Threads per block of the split-K merge and of the merge_state kernels."""
    return 32 if sim else min(128, 32 * -(-D // 32))


def delta_lanes(sim: bool) -> int:
    """Lanes per query row of the backward's delta = rowsum(dout * out) kernel: a warp per row (its
    loads coalesced); 1 on the simulator (no warp shuffles)."""
    return 1 if sim else 32


def elementwise_threads(sim: bool) -> int:
    """Threads per block of the element-wise, grid-stride kernels (fills, encodes, write_kv)."""
    return 32 if sim else 256


def tile_shape(D: int, sim: bool) -> tuple:
    """(BQ, BK, NT) for head_dim D: the largest tiles whose shared memory stays under 46 KB and
    whose per-thread output tile stays at most 64 registers."""
    if sim:
        return 8, 8, 32
    DT = -(-D // 8)
    for BQ, BK in ((64, 32), (32, 32), (16, 16)):
        smem = 4 * ((BQ + BK) * (D + 1) + BQ * (BK + 1) + BQ * 8)
        if smem <= 46 * 1024 and (BQ // 16) * DT <= 64:
            return BQ, BK, 128
    return 16, 8, 128


BWD_SMEM_LIMIT = 46 * 1024


def bwd_tiles(D: int, sim: bool) -> tuple:
    """(BQ, BK, TY): query rows and keys per tile, thread rows (NT = 8 * TY threads) -- the largest
    square tiles whose shared memory (K, V, q, dout tiles, P and dS) fits 46 KB. BK is a multiple
    of 8 (the score columns) and of TY (the gradient rows), BQ a multiple of TY."""
    if sim:
        return 4, 8, 4
    for t in (32, 16, 8):
        smem = 4 * (4 * t * (D + 1) + 2 * t * (t + 1) + 2 * t)
        if smem <= BWD_SMEM_LIMIT or t == 8:
            return t, t, min(t, 16)


@dataclass(frozen=True)
class DecodeLaunch:
    """The split-K decode launch of a batch: ``row_blocks`` thread blocks of R query rows (one
    (sequence, KV head) each) x ``n_parts`` partitions of PT tokens, the kernel's geometry (TX lanes
    per token row, NT threads, R rows, TT tokens per tile; ``decode_geometry``), and the merge's
    threads when there is more than one partition."""
    D: int
    kv_bytes: int
    word_bytes: int
    rows: int
    PT: int
    row_blocks: int
    n_parts: int
    TX: int
    NT: int
    R: int
    TT: int
    merge_threads: int

    @property
    def grid(self) -> tuple:
        return (self.row_blocks, self.n_parts)

    @property
    def geometry(self) -> dict:
        """The decode kernel factory's geometry keywords."""
        return dict(TX=self.TX, NT=self.NT, R=self.R, TT=self.TT)


def decode_row_blocks(n_seqs: int, Hkv: int, rows: int) -> int:
    """Thread blocks per partition: one per (sequence, KV head) and group of ``decode_rows(rows)`` rows."""
    return n_seqs * Hkv * -(-rows // decode_rows(rows))


def decode_launch(D: int, kv_bytes: int, rows: int, span: int, row_blocks: int, PT: int, sim: bool) -> DecodeLaunch:
    """The ``DecodeLaunch`` for head dim D, K/V elements of ``kv_bytes``, ``rows`` = G * Sq query
    rows per (sequence, KV head), the longest key span ``span``, ``row_blocks`` blocks per
    partition and partitions of PT tokens (``partition``)."""
    wb = word_dtype(D * kv_bytes).itemsize
    geo = decode_geometry(D, kv_bytes, wb, rows, PT, sim)
    return DecodeLaunch(D=D, kv_bytes=kv_bytes, word_bytes=wb, rows=rows, PT=PT, row_blocks=row_blocks,
                        n_parts=max(1, -(-span // PT)), merge_threads=merge_threads(D, sim), **geo)
