"""Device scratch kept across calls: pinned host staging and device buffers for the metadata of a
call (block table, lengths, work list, ALiBi slopes, finiteness flag) and the split-K partials, per
thread, the few most recent shapes."""
from __future__ import annotations

import collections
import threading

import numpy as np

SCRATCH_KEEP = 8    # scratch buffers kept per thread (metadata per (B, M), split-K partials per shape)

Meta = collections.namedtuple("Meta", "table lens work slopes flag")


def metadata_size(B: int, M: int, H: int) -> int:
    """int32 words of one call's metadata: table B * M, lens B, work 4 * B, slopes max(H, 1), flag 1."""
    return B * M + 5 * B + max(H, 1) + 1


def fill_metadata(host: np.ndarray, cfg) -> None:
    """Write ``cfg``'s metadata into the int32 host buffer ``host`` (layout of ``metadata_views``);
    the finiteness flag is zeroed."""
    B, M = cfg.block_table.shape
    H = cfg.H
    host[:B * M] = cfg.block_table.reshape(-1)
    host[B * M:B * M + B] = cfg.seq_lens
    w = host[B * M + B:B * M + 5 * B].reshape(4, B)
    w[0] = cfg.row_layout()[0]
    w[1] = cfg.q_lens
    w[2:] = 0
    w[2, :cfg.decode_seqs.size] = cfg.decode_seqs
    w[3, :cfg.tiled_seqs.size] = cfg.tiled_seqs
    sl = host[B * M + 5 * B:B * M + 5 * B + H].view(np.float32)
    sl[:] = 0.0 if cfg.alibi_slopes is None else cfg.alibi_slopes
    host[-1] = 0


def metadata_views(dev, B: int, M: int, H: int) -> Meta:
    """The kernels' views of the flat int32 device buffer ``dev``: table [B, M], lens [B],
    work [4, B] (first q row, q_len, decode list, tiled list), slopes float32 [H], flag [1]."""
    n = metadata_size(B, M, H)
    o = B * M
    return Meta(table=dev[:o].reshape(B, M), lens=dev[o:o + B], work=dev[o + B:o + 5 * B].reshape(4, B),
                slopes=dev[o + 5 * B:o + 5 * B + max(H, 1)].view(np.float32), flag=dev[n - 1:])


class Scratch:
    """Per-thread buffers of one client, kept across calls (the ``SCRATCH_KEEP`` most recent keys)."""

    def __init__(self, cuda):
        self._cuda = cuda
        self._local = threading.local()

    def cached(self, key, make):
        cache = getattr(self._local, "cache", None)
        if cache is None:
            cache = self._local.cache = collections.OrderedDict()
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        val = cache[key] = make()
        if len(cache) > SCRATCH_KEEP:
            cache.popitem(last=False)
        return val

    def new_metadata(self, B: int, M: int, H: int):
        """(pinned host int32 buffer, Meta views, flat device buffer) for a call of B sequences of
        M table entries and H query heads."""
        cuda = self._cuda
        n = metadata_size(B, M, H)
        host = cuda.pinned_array(n, np.int32)
        dev = cuda.device_array(n, np.int32)
        return host, metadata_views(dev, B, M, H), dev

    def metadata(self, cfg):
        """The call's metadata on the device, uploaded in one synchronous copy from pinned memory
        into buffers kept per (B, M, H): the copy is ordered after any earlier kernel that still reads
        them, and numba's array slicing and allocation cost more host time than the kernels of a
        decode step."""
        B, M = cfg.block_table.shape
        host, meta, dev = self.cached(("meta", B, M, cfg.H), lambda: self.new_metadata(B, M, cfg.H))
        fill_metadata(host, cfg)
        dev.copy_to_device(host)
        return meta


class PlanState:
    """A plan's device side: ``stream`` (numba stream) and its raw handle ``cu_stream``, ``meta``
    (Meta views of its metadata), split-K scratch (``cached``), prepared launches per kind of run,
    and ``check_finite``. ``own``: the buffers are the plan's (a public plan); else the per-thread
    scratch (a one-shot call)."""

    def __init__(self, stream, meta, *, host=None, own=False, scratch=None, check_finite=False):
        self.stream = stream
        h = getattr(stream, "handle", None)
        self.cu_stream = h if h is not None and int(h) != 0 else 0
        self.meta = meta
        self.own = own
        self.check_finite = check_finite
        self.prepared: dict = {}
        self._host = host            # the pinned upload source: alive while the copy may run
        self._scratch = scratch
        self._cache: dict = {}

    def cached(self, key, make):
        if self._scratch is not None:
            return self._scratch.cached(key, make)
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]
