"""BinaryGraphIndex: binary codes + a Hamming kNN search graph + float rerank, with live updates
and checksummed persistence.

Scores returned by `search` are squared L2 distances (ascending) for metric "l2" and similarities
(descending) for "ip" and "cosine"; "cosine" normalises vectors and queries to unit length (a
zero vector stays zero). Missing results (fewer than k live nodes reached) have id -1 and score
+inf ("l2") or -inf, so -1 is not a valid id (ids are any other int64).

Rerank vectors are stored as `vector_dtype`, float16 by default: half the memory of float32
(the index's largest array, 244 of 488 MB at 1M x 128), scored in float32. Measured against
float32 on the same graphs (benchmarks/ann.py data, 2026-11-26): recall@10 at 100k 0.9766 ->
0.9764 (L=32), 0.9990 -> 0.9985 (L=64); at 1M 0.9562 -> 0.9557 (L=64), 0.9860 -> 0.9850
(L=128); recall@1 unchanged at 100k, 0.986 -> 0.983 at 1M (L=64): near-ties reordered by the
rounding. Values beyond float16's range (65504) are refused; use vector_dtype="float32" for
them or for exact float32 scores.

Updates:
- `add(vectors, ids)`: new points go in batches of up to 4096, one after another. A batch's
  neighbours are found by a beam search over the graph so far (earlier batches included) plus
  an exact Hamming kNN among the batch itself (so points added together find each other); the
  best 2 * degree are RNG-pruned into the new rows, and each new point proposes itself to its
  kept neighbours, whose rows keep the `degree` closest of old edges and proposals (the
  farthest edges are the ones replaced). Memory is bounded by the batch, whatever M. The
  search's entry points (and each batch's) are spread over all rows, the added ones included.
- `delete(ids)`: tombstones. Deleted nodes still route the search (removing them at once would
  cut paths) but are never returned, and their ids stay taken until `compact()`, which relinks
  each row around its deleted neighbours (their live neighbours become candidates, the `degree`
  closest are kept) and then removes the deleted rows, renumbering the graph.

Files (`save(dir)`): manifest.json (format version, parameters and their sha256, and for every
array its file, shape, dtype, byte size and sha256) and one .npy per array. Everything is
written into a fresh temporary folder beside `dir` that is renamed into place, so a crash never
leaves a half-written index; a folder that is not a saved index is never replaced. `load`
refuses a missing, truncated or corrupted file, or arrays that disagree with the parameters or
each other, with a FormatError naming the file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

from alijax.ann import bitonic, heap
from alijax.ann import codes as codes_lib
from alijax.ann import graph as graph_lib
from alijax.ann import search as search_lib
from alijax.ann.hamming import hamming_pairs
from alijax.data.files import FormatError, atomic_write

# 2: search_config.width may be null (automatic, search.SearchConfig.for_codes). Version 1
# files stored the then default width 1 and load with it (the same results as before); set
# index.search_config = dataclasses.replace(index.search_config, width=None) for the automatic one.
# search_config.refine (the rerank's float hop) came later within version 2: a file without it
# loads with None, automatic; so did search_config.walk (without it: "xla").
FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_ARRAYS = ("vectors", "codes", "graph", "ids", "deleted", "entries", "mean", "projection")
VECTOR_DTYPES = ("float32", "float16")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def default_num_entries(n: int) -> int:
    """Search entry points for n nodes: one per 12 nodes, at most 16384, at least 8192 (or all
    n nodes when there are fewer).

    A kNN graph over clustered data has few edges between clusters, so a search must start near
    the query's cluster. Measured on the benchmarks/ann.py data (1000 clusters, 2026-11-26):
    at 100k, recall@10 at L = 32 was 0.65 from 256 evenly spaced entries, 0.972 from 4166 and
    0.979 from 8192; at 1M and L = 64, 4096 entries left 39 of 1000 queries in the wrong
    cluster (recall@10 0.926, 22k QPS) and 16384 none (0.966, 20.6k QPS; 32768: 0.965, 17k).
    Seeding is one word-major Q x E Hamming pass, about 0.5 ns a pair on one core.

    The floor matters for small sets of small clusters, where one per 12 nodes leaves many
    clusters without an entry and the walk cannot reach them (the graph has few edges out of
    a cluster). At 20k of the same data (1000 clusters of 20 points), recall@10 at L = 32 /
    QPS: 1666 entries 0.825 / 111k, 5000 0.897 / 106k, 10000 0.936 / 80k, all 20000 0.971 /
    68k (hnswlib: 0.949 at 109k, 0.990 at 64k; 2 cores, 2026-11-26). All nodes as entries
    make the seed nearly an exact Hamming top-L, which hid the real gap: that graph's 64-NN
    lists held only 68% of each point's true 10 nearest (its 312 clusters cut through the
    data's 1000). With 6 sqrt(N) clusters (graph.auto_clusters) 8192 entries give 0.958 at
    L = 32 and 0.953 at L = 24, 103k QPS (hnswlib 0.951 at 106k; benchmarks/RESULTS.md)."""
    return min(n, max(8192, min(16384, n // 12)))


def _check_vectors(
    x, name: str, dim: int | None = None, max_abs: float = np.inf, min_rows: int = 1
) -> np.ndarray:
    """x as float32 [N >= min_rows, D] (no copy when it is already), refusing NaN/Inf and, for
    vectors stored as float16, values beyond max_abs. One pass over the data, a block of rows
    at a time (no [N, D] mask: 128 MB at 1M x 128), both checks from each row's largest
    magnitude."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < min_rows or x.shape[1] < 1:
        raise ValueError(f"{name}.shape={x.shape} must be [N >= {min_rows}, D >= 1]")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name}.dtype={x.dtype} must be a real float or integer dtype")
    finite_before = not (np.issubdtype(x.dtype, np.floating) and x.dtype.itemsize > 4)
    with np.errstate(over="ignore"):  # (a float64 past float32's range: refused below)
        x = np.asarray(x, np.float32)  # no copy when it is float32 already: see build
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}.shape[1]={x.shape[1]} must equal the index dimension {dim}")
    for start in range(0, x.shape[0], _CHECK_ROWS):
        row_max = np.abs(x[start : start + _CHECK_ROWS]).max(axis=1)  # NaN stays NaN
        bad = ~np.isfinite(row_max)
        if bad.any():
            first = start + int(np.argmax(bad))
            beyond = "" if finite_before else " (or values beyond float32's range)"
            raise ValueError(f"{name} holds NaN or Inf{beyond} (first bad row {first})")
        big = row_max > max_abs
        if big.any():
            first = start + int(np.argmax(big))
            raise ValueError(
                f"{name} holds values beyond float16's range {max_abs} (first bad row "
                f"{first}); use vector_dtype='float32'"
            )
    return x


_CHECK_ROWS = 65536
_RELEASE_PROGRAMS_FROM = 200_000  # build size from which its compiled programs are freed


@functools.partial(jax.jit, donate_argnums=0)
def _put_rows(buf, rows, start):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), start, axis=0)


def _device_vectors(x: np.ndarray, dtype: str, rows: int = _CHECK_ROWS):
    """x float32 [N, D] -> a device array of `dtype`, filled in place a block of rows at a
    time, so the only copy of the data made beside x is the index's own (a host array cast to
    float16 and then device_put held two copies at once: 0.5 GB at 1M x 128)."""
    n = x.shape[0]
    rows = min(rows, n)
    buf = jnp.zeros(x.shape, dtype)
    for start in range(0, n, rows):
        start = min(start, n - rows)  # the last block overlaps the one before: one shape
        # One block at a time: dispatch is asynchronous, and unwaited the transfers of
        # several blocks were queued at once (180 MB above the index at 1M, VmHWM).
        buf = jax.block_until_ready(_put_rows(buf, x[start : start + rows], start))
    return buf


# What search reads, in search_lib.search's order.
_SEARCH_ARRAYS = ("codes", "graph", "vectors", "entries", "deleted")
_PAD_FILL = {"graph": -1, "deleted": True}  # padding rows (see _on_device); others 0
# The per-node arrays among them, which add() updates in place on the device.
_ROW_ARRAYS = ("codes", "graph", "vectors", "deleted")


def _padded_to(host: np.ndarray, rows: int, name: str) -> np.ndarray:
    """The per-node array `name` padded to `rows` rows with its _PAD_FILL (a copy)."""
    pad = [(0, rows - len(host))] + [(0, 0)] * (host.ndim - 1)
    return np.pad(host, pad, constant_values=_PAD_FILL.get(name, 0))


def _shares_host_memory(device) -> bool:
    """Whether numpy can view the device array's memory (CPU devices), so that the index's
    host arrays need not be copies."""
    return all(d.platform == "cpu" for d in device.devices())


def _host_view(device) -> np.ndarray:
    """A numpy array of a device array's contents: on CPU a read-only view of its memory
    (np.from_dlpack: np.asarray would also cache a view on the jax array, and while any view
    of a buffer lives, _set_rows copies it instead of updating it in place); elsewhere a copy."""
    if _shares_host_memory(device):
        return np.from_dlpack(jax.block_until_ready(device))
    return np.asarray(device)


def _viewed_elsewhere(kept: tuple, own_view_refs: int) -> bool:
    """Whether anything but the index holds the mirror of `kept` = (the index's view of it,
    the mirror), or that view itself. Every numpy view keeps its base referenced, so other
    views raise the mirror's count; the view itself (index.graph as handed out, np.asarray of
    it, a memoryview) raises its own past the index's own_view_refs."""
    mirror_refs = 3  # the tuple, the view's base, getrefcount's argument
    return sys.getrefcount(kept[1]) > mirror_refs or sys.getrefcount(kept[0]) > own_view_refs


def _read_only(x: np.ndarray) -> np.ndarray:
    view = x.view()
    view.flags.writeable = False
    return view


@contextlib.contextmanager
def _interrupts_deferred():
    """Holds a Ctrl-C (SIGINT) back until the block has run, then raises it: the block hands
    the index's device arrays to a donating program and stores what it returns, and an
    interrupt between the two (inside jax's call, on CPU the whole run) lost the arrays and
    emptied the index. Only the main thread gets signals; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(*received[0])
            else:  # SIG_DFL or SIG_IGN set by the caller: what Python would do by default
                raise KeyboardInterrupt


class _RowArrays:
    """The per-node arrays (_ROW_ARRAYS) that an add() updates: device arrays of `cap` rows,
    written in place by donating programs (_set_rows, _small_add), and their contents on the
    host.

    On CPU the host side is a view of the device memory (_host_view), taken only while no
    write is due. On an accelerator `mirror` holds host arrays of `cap` rows that get the same
    writes, so reading the codes or the graph on the host costs the rows read: copying the
    device arrays back instead cost an add at 1M the whole graph (128 MB) per batch and all
    four arrays (~0.5 GB) at its end, whatever the number of points."""

    def __init__(self, device: dict, mirror: dict | None, cap: int):
        self.device, self.mirror, self.cap = device, mirror, cap

    def write(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        rows_and_values = _padded_rows(rows, values, self.cap)
        with _interrupts_deferred():  # (the array is donated)
            self.device[name] = _set_rows(self.device[name], *rows_and_values)
        self.write_mirror(name, rows, values)

    def write_mirror(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """The host side of a write that a program made on the device (none on CPU)."""
        if self.mirror is not None:
            # Read-only between writes, so that no view of it can be made writeable (as on
            # CPU, where the host arrays view read-only device memory).
            mirror = self.mirror[name]
            mirror.flags.writeable = True
            try:
                mirror[rows] = values
            finally:
                mirror.flags.writeable = False

    def copy_back(self) -> None:
        """Mirrors made again from the device arrays (after a failure between a program's
        writes and the mirror's: slow, but the two agree again)."""
        if self.mirror is not None:
            for name, device in self.device.items():
                self.mirror[name] = _read_only(np.array(device))

    def host(self, name: str) -> np.ndarray:
        """The array's contents, all `cap` rows (on CPU a view: drop it before the next write)."""
        return _host_view(self.device[name]) if self.mirror is None else self.mirror[name]

    def clear_unfinished(self, start: int, stop: int) -> None:
        """Rows start..stop (an add's unfinished batches) back to padding: no edges, deleted.
        No earlier row leads to them, so they are unreachable either way; this keeps the
        padding what _PAD_FILL says it is. Best effort: after a failed device the error raised
        already tells, and this one would hide it."""
        rows = np.arange(start, stop)
        try:
            for name, fill in (("graph", -1), ("deleted", True)):
                shape = (len(rows),) + self.device[name].shape[1:]
                self.write(name, rows, np.full(shape, fill, self.device[name].dtype))
        except Exception:  # noqa: BLE001 (see the docstring)
            pass


@functools.partial(jax.jit, donate_argnums=0)
def _set_rows(buf, rows, values):
    """buf with buf[rows] = values, updated in place (buf is donated); rows past its end, the
    padding of _padded_rows, are dropped."""
    return buf.at[rows].set(values.astype(buf.dtype), mode="drop")


def _padded_rows(rows: np.ndarray, values: np.ndarray, end: int) -> tuple:
    """(rows int32 [K], values [K, ...]) padded to the next power of two >= 256 with row `end`
    (past the buffer: dropped by _set_rows), so that _set_rows compiles for few shapes."""
    size = bitonic.next_pow2(max(len(rows), 256))
    rows = np.concatenate([rows, np.full(size - len(rows), end)]).astype(np.int32)
    pad = [(0, size - len(values))] + [(0, 0)] * (values.ndim - 1)
    return rows, np.pad(values, pad)


def _spans_processes(mesh) -> bool:
    """Whether a mesh holds devices of other processes (jax.distributed, several hosts)."""
    return mesh is not None and any(
        d.process_index != jax.process_index() for d in mesh.devices.flat
    )


def _from_process_zero(arrays: tuple) -> tuple:
    """Each array as process 0 holds it, as numpy, in every process (all must call this)."""
    return tuple(np.asarray(a) for a in multihost_utils.broadcast_one_to_all(arrays))


def _as_ids(ids, name: str = "ids") -> np.ndarray:
    """ids as int64 [K]: integers (a uint64 past int64's range is refused, not wrapped), and
    never -1, search's id for a missing result."""
    ids = np.atleast_1d(np.asarray(ids))
    if ids.ndim != 1:
        raise ValueError(f"{name}.shape={ids.shape} must be 1-D")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{name}.dtype={ids.dtype} must be integer")
    if ids.dtype == np.uint64 and (ids > np.iinfo(np.int64).max).any():
        raise ValueError(f"{name} holds values past int64's range, e.g. {ids.max()}")
    ids = ids.astype(np.int64)
    if (ids == -1).any():
        raise ValueError(f"{name} holds -1, which search returns for a missing result")
    return ids


def _check_ids(ids, n: int, name: str = "ids") -> np.ndarray:
    shape = np.shape(ids)
    if len(shape) != 1 or shape[0] != n:
        raise ValueError(f"{name}.shape={shape} must be [{n}] (one id per vector)")
    ids = _as_ids(ids, name)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{name} holds duplicates, e.g. {int(uniq[counts > 1][0])}")
    return ids


def _merge_sorted(order, sorted_ids, more_order, more_sorted) -> tuple:
    """Two (rows, ids) lists, each sorted by id, merged into one: two inserts at memory speed,
    no gather of the ids in their order (which was 1.6 of a 1-point add's ~6 ms at 1M, under
    cProfile)."""
    at = np.searchsorted(sorted_ids, more_sorted)
    return np.insert(order, at, more_order), np.insert(sorted_ids, at, more_sorted)


class _IdTable:
    """The index's user ids and their rows by value, for lookups by binary search, kept across
    adds: sorting 200k ids again on every add cost 20-40 ms of a 1000-point add.

    Added ids go into a buffer with room to spare (`ids` is a read-only view of its rows in
    use; rows past them are written, never rows a view shows) and into a small sorted `tail`
    that lookups search too, merged into the main order once it holds _ID_TAIL ids. So an add
    costs O(its ids), not O(all ids): concatenating and merging 1M ids were ~1.5 of a 1-point
    add's ~4.5 ms."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self._buffer = None  # made by the first append
        order = np.argsort(ids)
        self._main = (order, ids[order])
        self._tail = (np.empty(0, np.int64), np.empty(0, ids.dtype))

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) of ids int64 [K] (rows valid where found)."""
        rows, found = _find_sorted(*self._main, ids)
        if len(self._tail[0]):
            tail_rows, in_tail = _find_sorted(*self._tail, ids)
            rows, found = np.where(in_tail, tail_rows, rows), found | in_tail
        return rows, found

    def append(self, new_ids: np.ndarray) -> np.ndarray:
        """Adds ids int64 [M] as the next rows; returns the new `ids`."""
        n, m = len(self.ids), len(new_ids)
        if self._buffer is None or len(self._buffer) < n + m:
            self._buffer = np.empty(_capacity(n + m), np.int64)
            self._buffer[:n] = self.ids
        self._buffer[n : n + m] = new_ids
        self.ids = _read_only(self._buffer[: n + m])
        new_order = np.argsort(new_ids)
        self._tail = _merge_sorted(*self._tail, n + new_order, new_ids[new_order])
        if len(self._tail[0]) >= _ID_TAIL:
            self._main = _merge_sorted(*self._main, *self._tail)
            self._tail = (self._tail[0][:0], self._tail[1][:0])
        return self.ids


_ID_TAIL = 4096  # ids kept in _IdTable's tail before a merge into the main order: O(N) each


def _find_sorted(rows: np.ndarray, sorted_ids: np.ndarray, ids: np.ndarray) -> tuple:
    """(rows, found) of ids in one of _IdTable's lists."""
    if not len(rows):
        return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(rows) - 1)
    return rows[pos], sorted_ids[pos] == ids


def _normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


class _ReadWriteLock:
    """Searches and saves read an index together; build, add, delete and compact change it
    alone, once those reading have finished (add writes the arrays that search reads in
    place, and donates them: a search beside it failed or read half-linked rows).

    Phase-fair: a waiting writer goes before readers that arrive after it, and the readers
    waiting when a writer finishes go before the next writer, so neither a stream of searches
    nor a loop of adds starves the other."""

    def __init__(self):
        self._changed = threading.Condition()
        self._readers = self._readers_waiting = self._writers_waiting = 0
        self._writing = self._readers_turn = False

    @contextlib.contextmanager
    def reading(self):
        with self._changed:
            self._readers_waiting += 1
            self._changed.wait_for(
                lambda: not self._writing and (self._readers_turn or not self._writers_waiting)
            )
            self._readers_waiting -= 1
            self._readers_turn = self._readers_turn and self._readers_waiting > 0
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def writing(self):
        with self._changed:
            self._writers_waiting += 1
            self._changed.wait_for(
                lambda: not (self._writing or self._readers or self._readers_turn)
            )
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._readers_turn = self._readers_waiting > 0
                self._changed.notify_all()


def _holding(mode: str):
    """A decorator: the method runs holding the index's _ReadWriteLock in `mode` ("reading":
    beside other readers, never beside a writer; "writing": alone)."""

    def decorate(method):
        @functools.wraps(method)
        def locked(self, *args, **kwargs):
            with getattr(self._lock, mode)():
                return method(self, *args, **kwargs)

        return locked

    return decorate


_reads, _writes = _holding("reading"), _holding("writing")


class BinaryGraphIndex:
    """Binary Distributed Graph index (arXiv 2102.04656): build / add / delete / search / save."""

    def __init__(
        self,
        bits: int = 256,
        degree: int = 32,
        metric: str = "l2",
        binarizer: str = "itq",
        *,
        graph_config: graph_lib.GraphConfig | None = None,
        search_config: search_lib.SearchConfig | None = None,
        num_entries: int | None = None,
        itq_iterations: int = 50,
        seed: int = 0,
        vector_dtype: str = "float16",
    ):
        codes_lib.check_bits(bits)
        search_lib.check_metric(metric)
        if binarizer not in ("itq", "lsh"):
            raise ValueError(f"binarizer={binarizer!r} must be 'itq' or 'lsh'")
        if not isinstance(degree, int) or degree < 2:
            raise ValueError(f"degree={degree!r} must be an int >= 2")
        if num_entries is not None and (not isinstance(num_entries, int) or num_entries < 1):
            raise ValueError(f"num_entries={num_entries!r} must be a positive int or None")
        if vector_dtype not in VECTOR_DTYPES:
            raise ValueError(f"vector_dtype={vector_dtype!r} must be one of {VECTOR_DTYPES}")
        self.vector_dtype = vector_dtype
        self.bits, self.degree, self.metric, self.binarizer_kind = bits, degree, metric, binarizer
        self.graph_config = graph_config or graph_lib.GraphConfig()
        self.search_config = search_config or search_lib.SearchConfig()
        self.num_entries, self.itq_iterations, self.seed = num_entries, itq_iterations, seed
        self.binarizer: codes_lib.Binarizer | None = None
        self.vectors = self.codes = self.graph = self.ids = self.deleted = self.entries = None
        self._device_cache: dict = {}  # name -> (host array, its device copy)
        # name -> (host array, the host array of _capacity rows it is the start of): on an
        # accelerator, what add() writes besides the device arrays (see _RowArrays).
        self._mirrors: dict = {}
        self._grown = False  # added to: search arrays padded to _capacity (see _on_device)
        self._ids = None  # the lookup table of self.ids (_id_table)
        self._lock = _ReadWriteLock()  # searches beside each other; updates alone
        self._cache_lock = threading.Lock()  # _on_device's copies, once for concurrent searches

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int | None:
        return None if self.binarizer is None else self.binarizer.dim

    @_reads  # (add lets go of the arrays while it writes them)
    def __len__(self) -> int:
        return 0 if self.ids is None else int((~self.deleted).sum())

    def _require_built(self):
        if self.graph is None:
            raise ValueError("the index is empty: call build() (or load()) first")

    def _prepare(
        self, x, name: str, stored: bool = False, any_dim: bool = False, min_rows: int = 1
    ) -> np.ndarray:
        """x checked (and normalised for cosine); stored: the index keeps x in vector_dtype,
        so float16's range applies (cosine's unit vectors are always within it); any_dim: x
        need not have the index's dimension (a build fits the binarizer anew)."""
        fits_float16 = stored and self.vector_dtype == "float16" and self.metric != "cosine"
        dim = None if any_dim else self.dim
        x = _check_vectors(x, name, dim, _FLOAT16_MAX if fits_float16 else np.inf, min_rows)
        return _normalize(x) if self.metric == "cosine" else x

    def _entry_count(self, n: int) -> int:
        return min(n, default_num_entries(n) if self.num_entries is None else self.num_entries)

    def _entries(self, n: int, rows: int | None = None) -> np.ndarray:
        """Search entry points int32: evenly spaced over rows 0..n - 1; with `rows` (an add's
        capacity) padded with -1, which the seed skips, to the count for that many rows, so
        that every add within one capacity gives the compiled programs the same shape."""
        entries = np.linspace(0, n - 1, self._entry_count(n)).astype(np.int32)
        return entries if rows is None else self._padded_entries(entries, rows)

    def _padded_entries(self, entries: np.ndarray, rows: int) -> np.ndarray:
        """entries padded with -1 (no entry: the seed skips it) to the count for `rows` rows."""
        return np.pad(
            entries, (0, max(0, self._entry_count(rows) - len(entries))), constant_values=-1
        )

    # ------------------------------------------------------------------ build

    @_writes
    def build(self, vectors, ids=None, mesh=None) -> "BinaryGraphIndex":
        """Fits the binarizer and builds the graph over vectors float [N, D] (N >= 2); ids int
        [N] (default 0..N-1) are what search returns. mesh shards the graph build."""
        with heap.large_buffers_off_heap():  # see there: 67 MB less resident at 1M
            return self._build(vectors, ids, mesh)

    def _build(self, vectors, ids, mesh) -> "BinaryGraphIndex":
        x = self._prepare(vectors, "vectors", stored=True, any_dim=True)
        if x.shape[0] < 2:
            raise ValueError(f"vectors.shape[0]={x.shape[0]} must be >= 2")
        ids = np.arange(x.shape[0], dtype=np.int64) if ids is None else _check_ids(ids, len(x))
        rng = jax.random.key(self.seed)
        if self.binarizer_kind == "itq":
            self.binarizer = codes_lib.fit_itq(x, self.bits, self.itq_iterations, rng)
        else:
            self.binarizer = codes_lib.fit_lsh(x.shape[1], self.bits, rng, vectors=x)
        self.codes = codes_lib.encode(self.binarizer, x)
        if _spans_processes(mesh):
            # Every process fits and encodes alone, and float rounding can differ between
            # hosts (XLA:CPU's thread split alone moved an ITQ fit by up to 0.18, measured): a
            # graph built from each process's own rows would then not match any one process's
            # codes. All take process 0's binarizer and codes, which process 0 saves.
            mean, projection, self.codes = _from_process_zero(
                (self.binarizer.mean, self.binarizer.projection, self.codes)
            )
            self.binarizer = codes_lib.Binarizer(jnp.asarray(mean), jnp.asarray(projection))
        graph = graph_lib.build_graph_device(
            self.codes, self.degree, mesh=mesh, config=self.graph_config
        )
        self.graph = graph_lib.to_host(graph)  # on one CPU device a view, not a copy
        if len(graph.devices()) == 1:  # a sharded graph is put on one device by _on_device
            self._device_cache["graph"] = (self.graph, graph)
        # The index's own copy of the vectors is made only now, so the graph build's buffers
        # never sit on top of it (x may still be the caller's array: float32 is not copied).
        # It is made on the device, in vector_dtype; on CPU the host array views it.
        device = _device_vectors(x, self.vector_dtype)
        self.vectors = np.asarray(device)  # on CPU a view of the device array, not a copy
        self._device_cache["vectors"] = (self.vectors, device)
        self.ids = _read_only(ids)  # (_IdTable's lookups stand on it: not edited in place)
        self.deleted = np.zeros(len(x), bool)
        self.entries = self._entries(len(x))
        self._on_device()
        if len(x) >= _RELEASE_PROGRAMS_FROM:
            # A large build is rarely repeated at the same shapes, and what its programs hold
            # would sit under every search's peak; small builds are (tests, notebooks re-run),
            # and there recompiling would be most of the build time.
            graph_lib.release_build_programs()
            codes_lib.release_fit_programs()
        heap.release_free_heap()  # the build's freed buffers, before searches allocate
        return self

    # ------------------------------------------------------------------ search

    @_reads
    def search(
        self,
        queries,
        k: int,
        candidates: int | None = None,
        width: int | None = None,
        refine: int | None = None,
    ):
        """queries float [Q, D] -> (scores float32 [Q, k], ids int64 [Q, k]); candidates is L,
        the number of binary candidates reranked in float (default max(k, config)); width the
        parents expanded per iteration (default the config's; its None: automatic, by the index's
        size and L, see search.SearchConfig.for_codes); refine how many of the best reranked
        candidates have their graph neighbours scored in float too (0: none; default the
        config's; its None: automatic, 4 from L=256, see search._hop)."""
        self._require_built()
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k={k!r} must be a positive int")
        q = self._prepare(queries, "queries", min_rows=0)
        for name, value in (("candidates", candidates), ("width", width), ("refine", refine)):
            if value is not None and not isinstance(value, (int, np.integer)):  # (3.7 ran as 3)
                raise ValueError(f"{name}={value!r} must be an int or None")
        cfg = self.search_config
        cfg = dataclasses.replace(  # (which refuses 0 candidates or width: they meant default)
            cfg,
            candidates=max(k, cfg.candidates) if candidates is None else int(candidates),
            width=cfg.width if width is None else int(width),  # None: automatic (for_codes)
            refine=cfg.refine if refine is None else int(refine),
        )
        cfg = cfg.for_codes(len(self.ids))  # the index's size, not its padded arrays'
        with self._cache_lock:  # (concurrent searches: one copy of each array, not one each)
            codes, graph, vectors, entries, deleted = self._on_device()
        scores, idx = search_lib.search(
            q,
            self.binarizer,  # the queries are encoded in the search's program
            codes,
            graph,
            vectors,
            entries,
            int(k),
            metric=self.metric,
            config=cfg,
            deleted=deleted,
        )
        return scores, np.where(idx >= 0, self.ids[np.maximum(idx, 0)], -1)

    def _on_device(self) -> tuple:
        """The arrays search reads (_SEARCH_ARRAYS), as device arrays, each copied once per
        change of it (copying them on every call cost 51 ms per search at 100k x 128, measured;
        a delete() changes only the tombstones, so only they are copied again)."""
        # After an add, the per-node arrays go to the device padded to the add's capacity
        # (code 0, no edges, deleted), so the search programs compiled for that shape serve
        # every later add within it instead of compiling again (1-2 s) after each. Built or
        # loaded indexes keep their exact size (no extra copy at build time).
        rows = _capacity(len(self.ids)) if self._grown else None
        return tuple(self._device_array(name, rows) for name in _SEARCH_ARRAYS)

    def _device_array(self, name: str, rows: int | None = None):
        """The device copy of the array `name`, kept while the attribute is the same array
        (per-node arrays padded to `rows` when given)."""
        host = getattr(self, name)
        held = self._device_cache.get(name)
        if held is not None and held[0] is host:
            return held[1]
        self._mirrors.pop(name, None)  # (a stale one: host is a new array)
        n = len(host)
        padded = host
        if rows is not None and name == "entries":  # padded with -1 (no entry, see _entries)
            padded = self._padded_entries(host, rows)
        elif rows is not None and n < rows:
            padded = _padded_to(host, rows, name)
        # device_put, not jnp.asarray: that staged a second host copy (1M x 128 floats: 977
        # MB peak against 488 MB, VmHWM); device_put copies once.
        device = jax.device_put(padded)
        if _shares_host_memory(device):
            # On CPU a numpy view of a device array shares its memory, so the host array
            # becomes a read-only view and the data are held once, not twice (1M x 128 floats
            # are 512 MB). Updates replace arrays; only add() writes into the device arrays,
            # once it has let go of the views (_drop_views).
            host = _host_view(device)[:n]
            setattr(self, name, host)
        elif padded is not host:  # the next add writes on into this padded copy
            padded.flags.writeable = False  # see _RowArrays.write
            host = _read_only(padded[:n])
            setattr(self, name, host)
            self._mirrors[name] = (host, padded)
        self._device_cache[name] = (host, device)
        return device

    # ------------------------------------------------------------------ updates

    @_writes
    def add(self, vectors, ids) -> "BinaryGraphIndex":
        """Inserts vectors float [M, D] with new unique ids int [M], linked both ways. Safe
        beside searches on other threads: it waits for those in flight, and new ones wait for
        it (it updates the arrays that search reads, in place)."""
        self._require_built()
        x = self._prepare(vectors, "vectors", stored=True)
        ids = _check_ids(ids, len(x))
        rows, clash = self._lookup(ids)
        if clash.any():
            first = int(np.argmax(clash))
            if self.deleted[rows[first]]:  # its row stays (tombstoned) until compact()
                raise ValueError(
                    f"ids: {int(ids[first])} was deleted, and is still the id of its tombstoned "
                    "row: call compact() before adding it again"
                )
            raise ValueError(f"ids already in the index, e.g. {int(ids[first])}")
        n, m, deg = len(self.ids), len(x), self.degree
        # The search's arrays, at a capacity past the final size, are updated in place on the
        # device: the new points' codes and vectors first, then each batch's graph rows. Rows
        # past the inserted ones (code 0, no edges) are padding that no edge leads to, as no
        # edge leads to a new point until its batch is inserted. So one compiled walk per
        # batch size serves every batch, and every add until the index outgrows the capacity,
        # and an add costs what it touches, not copies of the whole index: 1000 points into
        # 1M were 339 ms, and the search after them 392 ms, when every add rebuilt the arrays
        # (2 cores, 2026-12-05).
        cap = _capacity(n + m)
        arrays = self._row_arrays(cap)
        done = n  # points in so far: those of finished batches
        try:
            self._drop_views()  # so that the writes below go in place (see _host_view)
            if _next_pow4(m) <= min(_SMALL_ADD, deg):
                entries = jax.device_put(self._entries(n, cap))  # see _add_batches
                program, args = self._small_add_program(arrays, x, n, entries)
                with _interrupts_deferred():
                    edits = program(*args)  # (the per-node arrays are donated to it)
                    arrays.device.update(zip(_ROW_ARRAYS, edits[0]))
                    done = n + m  # in: the device arrays hold the points, linked
                    self._mirror_small_add(arrays, x, n, edits[1])
            else:
                for done in self._add_batches(arrays, x, n):  # noqa: B007
                    pass  # (done: the rows in so far, for the cleanup below)
        finally:
            # The points of finished batches are in: an error (or an interrupt) leaves the
            # index as the last finished batch left it, never half-linked. (A small add is
            # one batch, in once its program has returned.)
            with _interrupts_deferred():  # (it waits for the device: an interrupt there
                self._keep_rows(arrays, ids, n, m, done)  # left the index without arrays)
        return self

    def _keep_rows(self, arrays: _RowArrays, ids: np.ndarray, n: int, m: int, done: int):
        """The end of add(): rows done.. n + m back to padding, and the index's arrays, ids
        and caches set to the rows in (done - n of the m new ones)."""
        if done < n + m:
            arrays.clear_unfinished(done, n + m)
        views = {name: _read_only(arrays.host(name)[:done]) for name in _ROW_ARRAYS}
        self.ids = self._id_table().append(ids[: done - n])
        self.entries = self._entries(done)  # the new rows among them (see _device_array)
        for name, device in arrays.device.items():
            setattr(self, name, views[name])
            self._device_cache[name] = (views[name], device)
            if arrays.mirror is not None:
                self._mirrors[name] = (views[name], arrays.mirror[name])
        self._grown = True

    def _add_batches(self, arrays: _RowArrays, x: np.ndarray, first: int):
        """Inserts the points x float32 [m, D] as rows first.. in batches of up to _ADD_BATCH,
        each linked in before the next; yields the rows in after each batch (an error stops
        it between two: see add).

        Each batch's walk starts from entries spread over all the rows in before it, the
        earlier batches' included: with the build's entries only, an index built from 2
        points and grown to 400 by adds had recall@10 0.075 at L=512 (its searches started
        from 2 entries, too), 1.0 with entries over all of its rows."""
        m, deg = len(x), self.degree
        new = np.arange(first, first + m)
        arrays.write("codes", new, codes_lib.encode(self.binarizer, x))
        arrays.write("vectors", new, x)
        codes = arrays.host("codes")  # not written again in this add
        batch = min(_ADD_BATCH, bitonic.next_pow2(max(m, _ADD_PART)))  # few compiled shapes
        for start in range(first, first + m, batch):
            nodes = np.arange(start, min(first + m, start + batch), dtype=np.int32)
            entries = jax.device_put(self._entries(start, arrays.cap))
            cand_i, cand_d = self._add_candidates(
                codes, arrays.device["codes"], arrays.device["graph"], entries, nodes, batch
            )
            rows = _prune_rows(codes, cand_i, cand_d, deg)
            arrays.write("graph", nodes, rows)
            arrays.write("deleted", nodes, np.zeros(len(nodes), bool))
            # (arrays.host("graph") is let go of on return: the next write goes in place.)
            targets, target_rows = _link_back(codes, arrays.host("graph"), nodes, rows, deg)
            # The batch's last write, the only one that makes earlier points lead to it:
            # up to here an error leaves the earlier rows as they were.
            arrays.write("graph", targets, target_rows)
            yield int(nodes[-1]) + 1

    def _small_add_program(self, arrays: _RowArrays, x: np.ndarray, first: int, entries):
        """(program, args): _small_add compiled (or from the cache) for inserting the m <=
        _SMALL_ADD points x float32 [m, D] as rows first.., and its arguments, the device
        arrays among them (donated: the caller stores what the program returns)."""
        m, deg, cap = len(x), self.degree, arrays.cap
        rows = _next_pow4(m)
        args = (
            np.pad(x, ((0, rows - m), (0, 0))),
            np.int32(m),
            np.int32(first),
            *(arrays.device[name] for name in _ROW_ARRAYS),
            entries,
            self.binarizer,
        )
        static = dict(
            walk=tuple(sorted(self._add_walk(cap).items())),
            degree=deg,
            layout=bitonic.layout_for(cap, self.binarizer.bits),
            k_batch=min(deg + 1, rows),
        )
        donated = tuple(range(3, 3 + len(_ROW_ARRAYS)))
        return _add_compiled(_small_add, args, static, donated), args

    def _mirror_small_add(self, arrays: _RowArrays, x: np.ndarray, first: int, edits) -> None:
        """The host mirrors (off CPU) get the writes that _small_add made on the device."""
        if arrays.mirror is None:
            return
        m = len(x)
        try:
            new_codes, new_rows, targets, target_rows = (np.asarray(a) for a in edits)
            new = np.arange(first, first + m)
            arrays.write_mirror("codes", new, new_codes[:m])
            arrays.write_mirror("vectors", new, x)
            arrays.write_mirror("graph", new, new_rows[:m])
            arrays.write_mirror("deleted", new, np.zeros(m, bool))
            linked = targets >= 0
            arrays.write_mirror("graph", targets[linked], target_rows[linked])
        except BaseException:
            arrays.copy_back()  # the device arrays hold the points: the mirrors follow them
            raise

    def _row_arrays(self, cap: int) -> _RowArrays:
        """The per-node arrays (_ROW_ARRAYS) at `cap` rows (padding: _PAD_FILL), for add() to
        update in place: on the device those already there at that size (the previous
        add's), else padded copies; on an accelerator also their host mirrors, likewise."""
        device, mirror = {}, {}
        for name in _ROW_ARRAYS:
            host = getattr(self, name)
            held, kept = self._device_cache.get(name), self._mirrors.get(name)
            if kept is not None and kept[0] is host and kept[1].shape[0] == cap:
                # What a user still holds of the host array (index.graph from before, or a
                # slice of it) must not change, as on CPU, where jax copies a donated buffer
                # that a numpy view pins: a mirror viewed from outside the index is copied.
                # (The view's references of the index's own: `kept`, the attribute, `host`,
                # _device_cache's tuple where it holds this view, getrefcount's argument.)
                own = 4 + (held is not None and held[0] is host)
                mirror[name] = kept[1].copy() if _viewed_elsewhere(kept, own) else kept[1]
            if held is not None and held[0] is host and held[1].shape[0] == cap:
                device[name] = held[1]
            else:
                if name not in mirror:
                    mirror[name] = _padded_to(host, cap, name)
                device[name] = jax.device_put(mirror[name])
        if _shares_host_memory(device["codes"]):  # the index's arrays live on one device
            return _RowArrays(device, None, cap)
        for name in _ROW_ARRAYS:  # a device array kept without its mirror: make one
            if name not in mirror:
                mirror[name] = _padded_to(getattr(self, name), cap, name)
        # The mirrors are written from here on: not while a copy from one may still be read.
        jax.block_until_ready(device)
        for array in mirror.values():
            array.flags.writeable = False  # between writes (see _RowArrays.write)
        return _RowArrays(device, mirror, cap)

    def _drop_views(self) -> None:
        """Lets go of the index's own views of its per-node device arrays (add() gives it new
        ones), so that nothing of the index pins them."""
        for name in _ROW_ARRAYS:
            self._device_cache.pop(name, None)
            self._mirrors.pop(name, None)
            setattr(self, name, None)

    def _add_candidates(self, codes, codes_on_device, graph, entries, nodes, batch: int):
        """The 2 * degree best distinct candidates (ids, distances [m, 2 * degree]) of the new
        points `nodes` (m <= batch, consecutive): a beam search over the graph so far (on the
        device, as codes_on_device; codes: the same on the host) and an exact Hamming kNN
        among themselves, on queries padded to `batch`.

        Both run in parts of _ADD_PART queries on one thread per core (as search.search
        splits its batches: XLA:CPU runs a while loop's small steps and a top_k on one core
        each), so the walk has one compiled shape per capacity whatever the batch, and the
        batch kNN one per batch size whatever the index."""
        m, deg = len(nodes), self.degree
        queries = codes[nodes[0] : nodes[0] + batch]  # rows past the batch's m: padding
        queries = jnp.asarray(np.pad(queries, ((0, batch - len(queries)), (0, 0))))
        walk = self._add_walk(codes_on_device.shape[0])
        knn = dict(k_batch=min(deg + 1, batch), out_k=2 * deg)
        first, count = np.int32(nodes[0]), np.int32(m)
        part = _part_rows(m, _cores())

        def one_part(start):
            rows = queries[start : start + part]
            found = _add_program(
                search_lib.beam_search, (rows, codes_on_device, graph, entries), walk
            )
            args = (*found, rows, queries, first, np.int32(start), count)
            return [np.asarray(a) for a in _add_program(_batch_candidates, args, knn)]

        # Parts past the batch's m points would be all padding.
        parts = _map_on_cores(one_part, range(0, m, part))
        cand_i, cand_d = (np.concatenate(a)[:m] for a in zip(*parts))
        return cand_i, cand_d

    def _add_walk(self, cap: int) -> dict:
        """The static parameters of the add's walk over `cap` rows."""
        big_l = max(2 * self.degree, self.search_config.candidates)
        return dict(
            candidates=big_l,
            # The search's width for this size: adding 20k points to 2M, width 1 / 2 (its
            # auto_width) / width 1 with 80 iterations gave search recall@10 after it 0.9410 /
            # 0.9423 / 0.9416 at 2262 / 2403 / 2203 points/s (2 cores, 2026-12-05).
            width=min(search_lib.auto_width(cap), big_l),
            # Adding 100k points to 100k (2 cores, 2026-12-05): L + 16 = 80 iterations 5.6k
            # points/s, 36 7.1k/s, 20 7.6k/s; search recall@10 after it at L=64 0.9905,
            # 0.9905, 0.9903 (a build of all 200k: 0.9937).
            iterations=big_l // 2 + 4,
        )

    def _id_table(self) -> _IdTable:
        """The ids' lookup table, made again when self.ids is another array than its own."""
        if self._ids is None or self._ids.ids is not self.ids:
            self._ids = _IdTable(self.ids)
        return self._ids

    def _lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(internal rows, found) of user ids int64 [K] (rows where found)."""
        return self._id_table().lookup(ids)

    @_writes
    def delete(self, ids) -> int:
        """Tombstones the given user ids int [K] (unknown ids are a ValueError); returns how
        many were not deleted before (an id given twice counts once)."""
        self._require_built()
        ids = _as_ids(ids)
        internal, found = self._lookup(ids)
        if not found.all():
            raise ValueError(f"ids not in the index, e.g. {int(ids[~found][0])}")
        internal = np.unique(internal)
        newly = int((~self.deleted[internal]).sum())
        self.deleted = self.deleted.copy()  # a new array, so the device copy is refreshed
        self.deleted[internal] = True
        return newly

    @_writes
    def compact(self) -> "BinaryGraphIndex":
        """Relinks rows around deleted nodes and drops them (internal indices change)."""
        self._require_built()
        if not self.deleted.any():
            return self
        live = ~self.deleted
        if live.sum() < 2:
            raise ValueError("compact() needs at least 2 live points")
        graph = _relink(self.codes, self.graph, self.deleted, self.degree)
        new_index = np.cumsum(live) - 1
        graph = graph[live]
        graph = np.where(graph >= 0, new_index[np.maximum(graph, 0)], -1).astype(np.int32)
        self.graph = graph
        self.codes, self.vectors = self.codes[live], self.vectors[live]
        self.ids = _read_only(self.ids[live])
        self.deleted = np.zeros(len(self.ids), bool)
        self.entries = self._entries(len(self.ids))
        return self

    # ------------------------------------------------------------------ persistence

    def _params(self) -> dict:
        return {
            "bits": self.bits,
            "degree": self.degree,
            "metric": self.metric,
            "binarizer": self.binarizer_kind,
            "num_entries": self.num_entries,
            "itq_iterations": self.itq_iterations,
            "seed": self.seed,
            "vector_dtype": self.vector_dtype,
            "graph_config": dataclasses.asdict(self.graph_config),
            "search_config": dataclasses.asdict(self.search_config),
        }

    @_reads
    def save(self, directory) -> None:
        """Writes the index to `directory`, replacing atomically a saved index there; any other
        folder that is not empty is refused (a ValueError), never deleted."""
        self._require_built()
        directory = check_save_directory(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = f"{directory}.tmp-{uuid.uuid4().hex[:8]}"
        os.makedirs(tmp)
        try:
            arrays = {
                "vectors": self.vectors,
                "codes": self.codes,
                "graph": self.graph,
                "ids": self.ids,
                "deleted": self.deleted,
                "entries": self.entries,
                "mean": np.asarray(self.binarizer.mean),
                "projection": np.asarray(self.binarizer.projection),
            }
            entries = {}
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
                data = buf.getvalue()
                with atomic_write(os.path.join(tmp, f"{name}.npy")) as f:
                    f.write(data)
                entries[name] = {
                    "file": f"{name}.npy",
                    "shape": list(arr.shape),
                    "dtype": str(arr.dtype),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            params = self._params()
            manifest = {
                "format": "alijax.BinaryGraphIndex",
                "format_version": FORMAT_VERSION,
                "params": params,
                "params_sha256": _params_digest(params),
                "arrays": entries,
            }
            with atomic_write(os.path.join(tmp, "manifest.json"), text=True) as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
            old = None
            if os.path.exists(directory):
                old = f"{directory}.old-{uuid.uuid4().hex[:8]}"
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory) -> "BinaryGraphIndex":
        """Reads an index written by save(); FormatError names any bad file."""
        directory = os.fspath(directory)
        manifest_path = os.path.join(directory, "manifest.json")
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
            version = manifest["format_version"]
            params, entries = manifest["params"], manifest["arrays"]
        except (FileNotFoundError, NotADirectoryError):
            raise FormatError(f"{manifest_path}: missing (not a saved index)") from None
        except (ValueError, KeyError, TypeError) as err:
            raise FormatError(f"{manifest_path}: unreadable manifest ({err})") from None
        if version not in _READABLE_VERSIONS:
            raise FormatError(
                f"{manifest_path}: format_version={version!r}, this code reads {_READABLE_VERSIONS}"
            )
        # Files before the params' checksum have none; a bit flipped in them (say the
        # degree) would load, and fail at the first add.
        digest = manifest.get("params_sha256")
        if digest is not None and digest != _params_digest(params):
            raise FormatError(f"{manifest_path}: params sha256 checksum mismatch (corrupted)")
        if not isinstance(entries, dict):
            raise FormatError(f"{manifest_path}: 'arrays' must map array names to entries")
        arrays = {name: _read_array(directory, name, entries) for name in _ARRAYS}
        try:
            index = cls(
                params["bits"],
                params["degree"],
                params["metric"],
                params["binarizer"],
                graph_config=graph_lib.GraphConfig(**params["graph_config"]),
                search_config=search_lib.SearchConfig(**params["search_config"]),
                num_entries=params["num_entries"],
                itq_iterations=params["itq_iterations"],
                seed=params["seed"],
                # Indexes saved before the option stored float32.
                vector_dtype=params.get("vector_dtype", "float32"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise FormatError(
                f"{manifest_path}: bad params ({type(err).__name__}: {err})"
            ) from None
        _check_loaded_shapes(index, arrays, directory)
        index.binarizer = codes_lib.Binarizer(
            jnp.asarray(arrays["mean"]), jnp.asarray(arrays["projection"])
        )
        arrays["ids"] = _read_only(arrays["ids"].astype(np.int64))  # (int32 in a made file)
        for name in ("vectors", "codes", "graph", "ids", "deleted", "entries"):
            setattr(index, name, arrays[name])
        return index


def check_save_directory(directory) -> str:
    """directory as an absolute path, if save() may write there: a new path, an empty folder
    or a saved index (which save replaces); else a ValueError naming it."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.isfile(os.path.join(directory, "manifest.json")):
            raise ValueError(
                f"directory={directory!r} holds files and is not a saved index (no "
                "manifest.json): not replaced"
            )
    elif os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory={directory!r} is a file, not a folder")
    return directory


def _params_digest(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def _check_loaded_shapes(index: "BinaryGraphIndex", arrays: dict, directory: str) -> None:
    """The arrays agree with each other and with the params, else a FormatError names the
    file that does not (so an index that loads also searches and adds)."""
    n, bits, mean = len(arrays["ids"]), index.bits, arrays["mean"]
    if mean.ndim != 1 or mean.dtype != np.float32:
        raise FormatError(f"{os.path.join(directory, 'mean.npy')}: must be float32 [D]")
    dim = mean.shape[0]
    want = {
        "vectors": ((n, dim), (index.vector_dtype,)),
        "codes": ((n, bits // 32), ("uint32",)),
        "graph": ((n, index.degree), ("int32",)),
        "ids": ((n,), ("int64", "int32")),
        "deleted": ((n,), ("bool",)),
        "projection": ((dim, bits), ("float32",)),
    }
    for name, (shape, dtypes) in want.items():
        got = arrays[name]
        if got.shape != shape or str(got.dtype) not in dtypes:
            raise FormatError(
                f"{os.path.join(directory, name + '.npy')}: shape/dtype {got.shape}/{got.dtype}, "
                f"the index's params and ids.npy make it {shape}/{' or '.join(dtypes)}"
            )
    entries = arrays["entries"]
    if entries.ndim != 1 or entries.dtype != np.int32 or ((entries < 0) | (entries >= n)).any():
        raise FormatError(
            f"{os.path.join(directory, 'entries.npy')}: must be int32 rows in 0..{n - 1}"
        )


def _read_array(directory: str, name: str, entries: dict) -> np.ndarray:
    meta = entries.get(name)
    path = os.path.join(directory, f"{name}.npy")
    if not isinstance(meta, dict) or not {"bytes", "sha256", "shape", "dtype"} <= meta.keys():
        raise FormatError(f"{path}: not listed in manifest.json with bytes, sha256, shape, dtype")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise FormatError(f"{path}: missing") from None
    if len(data) != meta["bytes"]:
        raise FormatError(
            f"{path}: truncated or padded: {len(data)} bytes, manifest says {meta['bytes']}"
        )
    if hashlib.sha256(data).hexdigest() != meta["sha256"]:
        raise FormatError(f"{path}: sha256 checksum mismatch (corrupted file)")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        raise FormatError(f"{path}: not a valid .npy file ({err})") from None
    if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
        raise FormatError(f"{path}: shape/dtype {arr.shape}/{arr.dtype} differ from the manifest")
    return arr


# ---------------------------------------------------------------------- graph edits (host side)


# New points are inserted this many at a time: each batch finds its neighbours in the graph so
# far (earlier batches included) and exactly among its own points, so that exact part costs
# M * _ADD_BATCH distances, not M^2, and every step's arrays are bounded whatever M. (Adding
# 50k points to 100k in one batch peaked at +12.9 GB, the pruning's [M, K, K, W] pair codes,
# and ran at 1.3k points/s; measured on 2 cores, 2026-12-05.)
_ADD_BATCH = 4096
# The add's programs (walk and batch kNN), the most recently used _ADD_PROGRAMS kept: jax.jit
# would keep every capacity's (10-20 MB each, see search.compiled_search_batch) for as long as
# the process.
_ADD_PROGRAMS = 6
# Queries per call of the add's walk, its one compiled shape per capacity (before, a batch's
# walk ran on all its queries, one shape per batch size from 256 to 4096, and adding 19k points
# to 200k after 1000 compiled again: 3.0 s, now 2.1 s). Parts of 256, 512: that add 9.2k, 9.0k
# points/s; adds of 10 points 29, 38 ms each (27 ms with walks of 2 x 128). 2 cores, 2026-12-05.
_ADD_PART = 256


def _next_pow4(n: int) -> int:
    """The smallest power of four >= n (1 for n <= 1)."""
    rows = 1
    while rows < n:
        rows *= 4
    return rows


def _part_rows(m: int, threads: int = 1) -> int:
    """Queries per call of the add's walk for an add of m points on `threads` threads: the
    power of four up to _ADD_PART that walks them soonest, each call costing _PART_FIXED +
    its queries, the calls run `threads` at a time (ties to the larger part: fewer calls).
    Powers of four keep the compiled shapes per capacity few, and a small add walks few
    padding queries (10 points: 16 queries, not 256).

    On 2 cores at 200k, a call of 64 queries took about half one of 256 (fixed 128, then):
    adds of 100 points took 20.4 ms with one part of 256, 15.1 with two of 64; 200 points
    25.9 and 26.2; 50 points 11.5 with one of 64, 13.0 with four of 16 (2026-12-05)."""

    def rounds_cost(rows: int) -> int:
        calls = -(-m // rows)
        return -(-calls // threads) * (_PART_FIXED + rows)

    # Parts under 16 queries only for adds that small: the model is from 2 cores, and on many
    # it would split 17 points into 17 calls of one query (not measured there).
    smallest = min(16, _next_pow4(m))
    sizes = [4**i for i in range(5) if smallest <= 4**i <= _ADD_PART]
    return min(sizes, key=lambda rows: (rounds_cost(rows), -rows))


_PART_FIXED = 128  # a walk call's fixed cost in queries' worth (see _part_rows)


_add_programs: collections.OrderedDict = collections.OrderedDict()
_add_programs_lock = threading.Lock()


def _add_program(fn, args: tuple, static: dict):
    """fn(*args, **static), compiled by _add_compiled."""
    return _add_compiled(fn, args, static)(*args)


def _add_compiled(fn, args: tuple, static: dict, donated: tuple = ()):
    """fn(**static) compiled for args (arrays or pytrees of them; those at positions `donated`
    donated), once per argument shapes and static values, and kept in a small LRU (several
    indexes, or one after compact(), each reuse their own). One lock for compiling: the parts
    of a batch start together, and two compilations at once would hold two compilers' memory
    (+77 MiB adding 19k points to 200k, measured)."""
    leaves, structure = jax.tree.flatten(args)
    shapes = tuple((a.shape, a.dtype) for a in leaves)  # (numpy and jax arrays, np scalars)
    key = (fn.__name__, structure, shapes, tuple(sorted(static.items())), donated)
    # (The jit is made only to compile: made on every call, it cost 0.3 ms of a 2 ms add.)
    jitted = lambda: jax.jit(functools.partial(fn, **static), donate_argnums=donated)  # noqa: E731
    compile_fn = lambda: jitted().lower(*args).compile()  # noqa: E731
    lock, limit = _add_programs_lock, _ADD_PROGRAMS
    return search_lib.lru_program(_add_programs, lock, limit, key, compile_fn)


# Adds of at most this many points (rounded up to a power of four, and that at most `degree`)
# run as one program (_small_add):
# a stream of one-point adds at 200k took 3.0 ms each as the general path's dozen dispatches,
# host edits and row writes.
_SMALL_ADD = 16


def _small_add(x, count, first, codes, graph, vectors, deleted, entries, binarizer, **static):
    """The general add path for one batch of `count` points x float32 [R, D] (rows past count:
    padding), R <= degree, inserted as nodes first.., in one program: encode, store, walk,
    batch kNN, prune, link back, each as that path does it, so that the graphs are the same.

    codes, graph, vectors, deleted (the per-node arrays, _ROW_ARRAYS, at their capacity,
    donated) -> ((codes, graph, vectors, deleted) updated, (new codes [R, W], new rows [R, degree],
    targets [R * degree] (-1: none, repeats possible), their rows [R * degree, degree])): the
    edits, for host mirrors."""
    degree, layout = static["degree"], static["layout"]
    r, cap = x.shape[0], codes.shape[0]
    slot = jnp.arange(r, dtype=jnp.int32)
    nodes, inserted = first + slot, slot < count
    at = jnp.where(inserted, nodes, cap)  # padding rows go past the end: dropped
    new_codes = codes_lib.codes_of(binarizer, x)
    codes = codes.at[at].set(new_codes, mode="drop")
    vectors = vectors.at[at].set(x.astype(vectors.dtype), mode="drop")
    g_i, g_d = search_lib.beam_search(new_codes, codes, graph, entries, **dict(static["walk"]))
    cand_i, cand_d = _batch_candidates(
        g_i, g_d, new_codes, new_codes, first, 0, count, static["k_batch"], 2 * degree
    )
    new_rows = _prune_block(codes[jnp.maximum(cand_i, 0)], cand_i, cand_d, degree)
    new_rows = jnp.where(inserted[:, None], new_rows, -1)
    graph = graph.at[at].set(new_rows, mode="drop")
    deleted = deleted.at[at].set(False, mode="drop")
    # Linking back (_link_back): each target keeps its `degree` closest among its row (a new
    # point's row too, written above) and the new points that chose it. R <= degree, so all of
    # a target's proposals fit the slots _link_back keeps for them; a target chosen by several
    # points appears once per choice and gets the same row each time. (topk_unique's sort
    # in place of _closest_block's networks compiled this program in 0.9 s against 1.5 at
    # 200k, but ran a 10-point add in 4.2 ms against 2.4; 2 cores, 2026-12-05.)
    targets = new_rows.reshape(-1)
    chose = (new_rows[None, :, :] == targets[:, None, None]).any(axis=2) & (targets >= 0)[:, None]
    proposals = jnp.where(chose, nodes[None, :], -1)
    proposals = jnp.pad(proposals, ((0, 0), (0, degree - r)), constant_values=-1)
    cand = jnp.concatenate([graph[jnp.maximum(targets, 0)], proposals], axis=1)
    target_rows = _closest_block(
        codes[jnp.maximum(targets, 0)], codes[jnp.maximum(cand, 0)], cand, degree, layout
    )
    graph = graph.at[jnp.where(targets >= 0, targets, cap)].set(target_rows, mode="drop")
    return (codes, graph, vectors, deleted), (new_codes, new_rows, targets, target_rows)


def _capacity(n: int) -> int:
    """Rows an add's arrays hold for n points: n rounded up to a multiple of 2^(bits(n) - 3)
    (at least 1024), so at most max(1024, n / 4) more (n / 8 on average), and adds of a few
    points at a time reuse their compiled programs (the walk's, then the search's) until the
    index grows past it.

    Each new capacity compiles the add's walk (about 1.3 s at 200k) and then the search's:
    with steps of 2^(bits(n) - 4), 1000-point adds from 200k to 240k ran at 6.2k points/s, two
    of them compiling; with 2^(bits(n) - 3) at 8.0k/s, one compiling (2 cores, 2026-12-05).
    The padding rows cost memory in every per-node array (vectors included) once an index has
    been added to."""
    step = 1 << max(10, n.bit_length() - 3)
    return -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("k_batch", "out_k"))
def _batch_candidates(g_i, g_d, rows, queries, first, row_start, count, k_batch, out_k):
    """Candidates of the batch's rows `rows` uint32 [R, W] (= queries[row_start : row_start +
    R]): the walk's (g_i, g_d [R, L]) and each row's k_batch nearest among the batch's `count`
    points (queries uint32 [B, W], nodes first ..; rows past count are padding), merged into
    the out_k best distinct (ids, distances) [R, out_k] by (distance, id), no self loops. The
    batch kNN is exact, ties to the lower index (as hamming_topk)."""
    col = jnp.arange(queries.shape[0], dtype=jnp.int32)
    row = row_start + jnp.arange(rows.shape[0], dtype=jnp.int32)
    d = hamming_pairs(rows[:, None, :], queries[None, :, :])  # [R, B]
    d = jnp.where(col[None, :] < count, d, graph_lib.BIG)
    _, pos = lax.top_k(-d.astype(jnp.float32), k_batch)
    b_d = jnp.take_along_axis(d, pos, axis=1)
    b_i = jnp.where((b_d < graph_lib.BIG) & (pos != row[:, None]), pos + first, -1)
    cat_i = jnp.concatenate([g_i, b_i], axis=1)
    cat_d = jnp.concatenate([g_d, b_d], axis=1)
    # lax.sort, not bitonic keys as _closest_block: those ran a part in 4.6 ms against 6.0 but
    # compiled in 0.66 s against 0.21, once per batch size and process (256 of 4096 queries,
    # 2 cores, 2026-12-05), and an add of 19k points to 200k ran 14% slower for it.
    return graph_lib.topk_unique(cat_i, cat_d, out_k)


# Rows per jitted graph-edit step (pruning, linking back, relinking): one compiled shape for
# every call, and [1024, 64, 64] pair distances are 16 MB.
_EDIT_ROWS = 1024
_EDIT_ROWS_MIN = 64  # below it, blocks are powers of four (see _by_blocks)


def _by_blocks(n: int, width: int, one_block) -> np.ndarray:
    """int32 [n, width] (-1 where a block gives fewer columns): one_block(start, stop, rows)
    gives the rows of consecutive blocks of `rows` rows (padded ones past stop - start cut):
    _EDIT_ROWS, or for fewer rows the next power of two, or below _EDIT_ROWS_MIN the next power
    of four (few compiled shapes, and an add of 10 points prunes 16 rows, not 1024: one point
    at 200k took 10.2 ms with walks of 256 queries and blocks of 64 rows, 3.6 ms with
    _part_rows and blocks of _next_pow4, 2 cores, 2026-12-05).

    Blocks run on one thread per core: one block's small steps keep about one core busy
    (linking back a batch of 4096 at 200k: 190 -> 130 ms on 2 cores, 2026-12-05)."""
    out = np.full((n, width), -1, np.int32)
    rows = min(_EDIT_ROWS, bitonic.next_pow2(n)) if n > _EDIT_ROWS_MIN else _next_pow4(n)

    def fill(start):
        stop = min(n, start + rows)
        got = np.asarray(one_block(start, stop, rows))[: stop - start]
        out[start:stop, : got.shape[1]] = got

    _map_on_cores(fill, range(0, n, rows))
    return out


def _cores() -> int:
    """Threads for the add's steps: one per core on CPU (one XLA:CPU execution of the add's
    small steps keeps about one core busy); one elsewhere."""
    return search_lib.default_threads() if jax.default_backend() == "cpu" else 1


def _map_on_cores(fn, items) -> list:
    """[fn(item) for item in items], on _cores() threads; in order on one."""
    threads = min(_cores(), len(items))
    if threads <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def _rows_of(codes: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """codes[max(ids, 0)] (ids of any shape; -1 gives row 0): np.take, 4.5x faster than the
    same fancy index on [230k, 8] codes and [1024, 64] ids (0.44 against 2.0 ms, 2 cores,
    2026-12-05), a good part of linking back."""
    return np.take(codes, np.maximum(ids, 0), axis=0)


def _pad_rows(x: np.ndarray, fill, rows: int) -> np.ndarray:
    """x padded with `fill` rows to `rows` rows (a block's compiled shape)."""
    return np.pad(x, [(0, rows - len(x))] + [(0, 0)] * (x.ndim - 1), constant_values=fill)


@functools.partial(jax.jit, static_argnames="degree")
def _prune_block(nb_codes, cand_i, cand_d, degree: int):
    """RNG-prune a block of candidate lists: nb_codes uint32 [C, K, W] of ids int32 [C, K]
    (sorted by distance cand_d, -1: none) -> rows int32 [C, min(K, degree)], kept edges first,
    then the pruned ones, each in rank order."""
    valid = cand_i >= 0
    d_nn = hamming_pairs(nb_codes[:, :, None, :], nb_codes[:, None, :, :])
    kept = graph_lib.rng_prune(cand_d, d_nn, valid)
    k = cand_i.shape[1]
    rank = jnp.arange(k, dtype=jnp.int32)
    prio = jnp.where(kept, rank, jnp.where(valid, k + rank, 3 * k))
    order = jnp.argsort(prio, axis=1, stable=True)[:, :degree]
    return jnp.take_along_axis(cand_i, order, axis=1)


def _prune_rows(codes, cand_i, cand_d, degree: int) -> np.ndarray:
    """RNG-prune candidate lists (sorted, [M, K]) into rows int32 [M, degree], kept edges first."""
    cand_i, cand_d = np.asarray(cand_i), np.asarray(cand_d)

    def one_block(start, stop, rows):
        ids = _pad_rows(cand_i[start:stop], -1, rows)
        dist = _pad_rows(cand_d[start:stop], graph_lib.BIG, rows)
        return _prune_block(_rows_of(codes, ids), ids, dist, degree)

    return _by_blocks(len(cand_i), degree, one_block)


@functools.partial(jax.jit, static_argnames=("degree", "layout"))
def _closest_block(row_codes, cand_codes, cand, degree: int, layout):
    """row_codes uint32 [C, W], candidates cand int32 [C, M] (-1: none) with codes [C, M, W] ->
    each row's `degree` closest distinct candidates int32 [C, degree] (ties to the lower id),
    as (distance, id) keys through the sorting networks (graph.topk_unique's lax.sort made
    linking back 2x slower, measured)."""
    keys = layout.pack(hamming_pairs(row_codes[:, None, :], cand_codes), cand).T  # [M, C]
    return layout.ids(bitonic.unique_smallest(keys, degree)[:degree]).T


def _closest_rows(codes, rows: np.ndarray, cand: np.ndarray, degree: int) -> np.ndarray:
    """_closest_block over blocks of rows (node ids int [R]) and their candidates [R, M]."""
    layout = bitonic.layout_for(len(codes), codes.shape[1] * 32)

    def one_block(start, stop, size):
        block = _pad_rows(cand[start:stop].astype(np.int32), -1, size)
        row_codes = _pad_rows(_rows_of(codes, rows[start:stop]), 0, size)
        return _closest_block(row_codes, _rows_of(codes, block), block, degree, layout)

    return _by_blocks(len(rows), degree, one_block)


def _link_back(codes, graph, new_nodes, new_rows, degree: int) -> tuple:
    """Each new node p (new_nodes, ascending) proposes itself to the nodes of its row; a
    target keeps the `degree` closest of its edges (graph: on the host, the new rows in it)
    and proposals, ties to the lower index. Returns (targets int [T], their rows int32
    [T, degree]).

    Only a target's `degree` closest proposals can be kept, so it gets no more than those
    (ties to the lower source, topk_unique's order): one shape [T, 2 * degree] of candidates
    however many new points chose the same target."""
    src = np.repeat(new_nodes, new_rows.shape[1])
    tgt = new_rows.reshape(-1)
    ok = tgt >= 0
    src, tgt = src[ok], tgt[ok]
    if not len(tgt):
        return tgt, np.empty((0, degree), np.int32)
    dist = np.bitwise_count(_rows_of(codes, src) ^ _rows_of(codes, tgt)).sum(axis=1, dtype=np.int32)
    # By target, then distance, then source: src is ascending here (new_nodes is), and a
    # stable sort keeps that order (8.5 ms against lexsort's 12.9 at 131k proposals).
    order = np.argsort((tgt.astype(np.int64) << 32) | dist, kind="stable")
    src, tgt = src[order], tgt[order]
    rank = np.arange(len(tgt)) - np.searchsorted(tgt, tgt)  # among the target's proposals
    src, tgt, rank = src[rank < degree], tgt[rank < degree], rank[rank < degree]
    first = np.concatenate([[True], tgt[1:] != tgt[:-1]])  # tgt is sorted: np.unique's work
    targets, slot = tgt[first], np.cumsum(first) - 1
    props = np.full((len(targets), degree), -1, np.int32)
    props[slot, rank] = src
    cand = np.concatenate([np.take(graph, targets, axis=0), props], axis=1)
    return targets, _closest_rows(codes, targets, cand, degree)


def _relink(codes, graph, deleted, degree: int, chunk: int = 8192) -> np.ndarray:
    """Rows with deleted neighbours get the `degree` closest live nodes among their live
    neighbours and their deleted neighbours' live neighbours."""
    graph = graph.copy()
    is_del = lambda g: np.where(g >= 0, deleted[np.maximum(g, 0)], False)  # noqa: E731
    rows = np.nonzero(is_del(graph).any(axis=1) & ~deleted)[0]
    for s in range(0, len(rows), chunk):
        r = rows[s : s + chunk]
        g = graph[r]
        two_hop = graph[np.maximum(g, 0)]  # [R, deg, deg]
        two_hop = np.where(is_del(g)[:, :, None], two_hop, -1).reshape(len(r), -1)
        cand = np.concatenate([g, two_hop], axis=1)
        cand = np.where(is_del(cand) | (cand == r[:, None]), -1, cand).astype(np.int32)
        graph[r] = _closest_rows(codes, r, cand, degree)
    return graph
