"""Batched beam search over a fixed-degree graph in Hamming space, then exact float rerank.

Modelled on CAGRA's single-pass search (a fixed-size sorted candidate list, `width` parents
expanded per iteration), vectorised over a batch of queries so every step is a fixed-shape array
op, and laid out for XLA:CPU, where it runs 4-5x faster than a [Q, L] layout with lax.top_k
(measured on 2 cores, 100k codes, 1000 queries; see benchmarks/RESULTS.md):

- State per query: the list of L entries as uint32 keys (distance | node id | expanded flag,
  see bitonic.KeyLayout), sorted, stored as [L, Q] so every compare-exchange works on rows of Q
  contiguous keys. Sorting keys orders entries by (distance, id): ties go to the lower id and
  every result is deterministic. Where one word cannot hold an entry (over 2^22 codes of 256
  bits) the list is bitonic.Pairs of two words in the same order: the same results, at about
  twice the walk's time (see _layout).
- Start: `entries` (a fixed sample of nodes) split into L strided groups; the nearest entry of
  each group seeds the list, which therefore always holds the nearest entry of all.
- Iteration: the `width` best unexpanded entries are expanded; their graph rows give
  width * degree neighbours; they get Hamming distances; those already in the list (the
  membership test: compares with every entry for short lists, a binary search of the sorted
  list from L=256, see _LOOKUP_FROM) and those farther than the current L-th entry are dropped,
  and a bitonic network sorts the survivors, drops a neighbour's repeats (two parents may
  share it), and merges them into the list (Batcher's merge keeping the L smallest).
  No visited set is needed: the L-th distance never grows, so a node that left the list (or
  never entered it) can never re-enter, and a node in the list is found by the membership test.
  The loop stops after `max_iterations` or when no query has an unexpanded entry.
- Rerank: the L binary candidates are scored exactly in float ("l2": squared distance,
  ascending; "ip" and "cosine": similarity, descending; cosine expects unit-norm vectors), nodes
  marked deleted are excluded, and the best k are returned. That is the paper's "recall more
  binary candidates, rerank with float features". With `refine` (automatic from L=256), the
  graph neighbours of the best few are scored in float too: one hop in float space that
  finds near points whose codes kept them out of the list (see _hop).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alijax.ann import bitonic, heap
from alijax.ann.bitonic import SENTINEL, KeyLayout, PairLayout
from alijax.ann.codes import Binarizer, codes_of
from alijax.ann.hamming import hamming_pairs, hamming_pairs_word_major
from pallas_kernels.graph_walk import graph_walk

METRICS = ("l2", "ip", "cosine")
WALKS = ("xla", "fused")
BIG = bitonic.BIG


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static search parameters: candidates L (the list size), parents expanded per iteration
    (None: auto_width of the index's size, or wider for a long list, see for_codes), and the
    iteration cap (None: L // (4 * width) + 4).

    A query could run until every list entry is expanded (about L // width + 1 iterations),
    but what the rerank needs is the near end of the list: the seed already holds the nearest
    entry of each of L groups of entry points, and expanding the best quarter of the list
    finds most of what the rest would. The list size sets the cost of an iteration, the cap
    how many run, so a larger list with fewer iterations is the better trade. Measured on
    the benchmarks/ann.py data (2 cores, 2026-11-26, CPU-time QPS, one graph each):
    100k, L=32: cap 36 (L + 4) recall@10 0.9764 at 35k QPS; cap 12 0.9716 at 52-56k; cap 8
    0.9637. 1M: L=64 cap 68 0.9557 at 10.5k; L=128 cap 36 0.9748 at 10.1k (cap 132: 0.9850
    at 4.5k); L=64 cap 20 0.9376. A batch also runs as long as its slowest query, so a cap
    near L // width wasted its last iterations on a few queries' worst entries.

    The list's sorting networks work on the next power of two: at 100k, 1000 queries, 36
    iterations, L=128 took 38 ms and L=160, 192 and 256 all 94-97 ms (2026-11-26). With the
    cap growing with L too, search time grows about as L^2 (L=256 is 4-5x L=128), so a
    power-of-two L is the one to choose within a bracket."""

    candidates: int = 64
    width: int | None = None  # None: automatic (for_codes: the index's size and L)
    max_iterations: int | None = None
    batch_size: int = 1024  # queries a batch holds at most (compiled rows: batch_rows of them)
    threads: int | None = None  # CPU batches run at once (None: the cores available)
    # Best reranked candidates whose graph neighbours are scored too (rerank's float hop);
    # None: automatic (for_codes: _AUTO_REFINE from a list of _REFINE_FROM, else none).
    refine: int | None = None
    # How the walk runs, one of WALKS: "xla", the batch's arrays op by op (see walk); "fused",
    # the Pallas kernel pallas_kernels.graph_walk (a GPU's; elsewhere interpreted, for tests),
    # for lists of one-word keys (over 2**22 codes of 256 bits the walk stays "xla"). Same
    # lists either way. Not yet the GPU default: it has not run on one (see graph_walk).
    walk: str = "xla"

    def __post_init__(self):
        # None is "automatic" where a field has it; 0 or less was taken silently (width 0 and
        # max_iterations 0 as automatic, max_iterations -1 as no walk at all).
        check_int_fields(
            self,
            {"candidates": 1, "batch_size": 1},
            optional={"width": 1, "max_iterations": 1, "threads": 1, "refine": 0},
        )
        if self.walk not in WALKS:
            raise ValueError(f"config.walk={self.walk!r} must be one of {WALKS}")

    def for_codes(self, n: int) -> SearchConfig:
        """This config for an index of n codes: an automatic width resolved to auto_width(n),
        or to one parent per _SLOTS_PER_PARENT slots of the list where that is more (L=256: 2,
        512: 4, 1024: 8), at most the list size.

        A long list needs many expansions: at width 1 its cap (L // 4 + 4) grows with L while
        each iteration's merge costs O(L), and a wider beam expands as many parents in fewer
        merges. With a parent per 128 slots the cap stays at L=128's 36 iterations however
        long the list. Measured (2 cores, 2026-12-05, 1M in one process, 100k a process a
        width; RESULTS.md, session 16), QPS by width 1 / 2 / 4 / 8:
        - 1M codes, 1000 queries: L=128 17.8k / 17.2k / 17.5k / 14.6k (recall@10 0.977 /
          0.978 / 0.982 / 0.985); L=256 7.7k / 7.5k / 8.2k / 7.6k (recall@100 0.948 / 0.949 /
          0.951 / 0.954); L=512 3.2k / 3.9k / 4.1k / 4.0k (0.987-0.989).
        - 100k: L=128 27.1k / 29.1k / 22.5k; L=256 10.6k / 10.3k / 10.2k; L=512 3.9k / 4.7k /
          5.1k / 5.0k; L=1024, widths 4 / 8 / 16: 1.76k / 1.92k / 1.77k.
        Wider won from L=512; at L=256 widths 1 and 2 were within 3% of each other.

        An automatic refine (the rerank's float hop) resolves to _AUTO_REFINE from a list of
        _REFINE_FROM, else to 0 (see there)."""
        config = self
        if config.refine is None:
            refine = _AUTO_REFINE if config.candidates >= _REFINE_FROM else 0
            config = dataclasses.replace(config, refine=refine)
        if config.width is not None:
            return config
        by_list = bitonic.next_pow2(config.candidates) // _SLOTS_PER_PARENT
        return dataclasses.replace(
            config, width=min(max(auto_width(n), by_list), config.candidates)
        )

    def iterations(self) -> int:
        if self.max_iterations:
            return self.max_iterations
        if self.width is None:
            raise ValueError("SearchConfig.width is None (automatic): resolve it with for_codes(n)")
        return self.candidates // (4 * self.width) + 4


_SLOTS_PER_PARENT = 128  # SearchConfig.for_codes: list slots per parent of an automatic width
# The automatic float hop (SearchConfig.refine, see _hop): the neighbours of the best 4 from a
# list of 256, where most of them are candidates already. 1M, 1000 queries (2 cores,
# 2026-12-06): L=256 recall@100 0.949 -> 0.955 in 123 -> 139 ms (the benchmark's run: 8.31k ->
# 7.88k QPS); L=512 0.9875 -> 0.9876, 259 -> 274 ms. For shorter lists a longer list is the
# better trade: L=64 recall@10 0.933 -> 0.951 in 27.7 -> 41.2 ms, where L=96 without the hop
# gives 0.966 in 41.7 ms; L=128 0.977 -> 0.979 in 54.5 -> 72.8 ms.
_REFINE_FROM = 256
_AUTO_REFINE = 4


def check_int_fields(config, required: dict, optional: dict | None = None) -> None:
    """Each field of `config` named in required / optional ({name: least value}) is an int (not
    a bool) at least that value; an optional one may be None (automatic). Else a ValueError
    naming it."""
    optional = optional or {}
    for name, low in (*required.items(), *optional.items()):
        value = getattr(config, name)
        if value is None and name in optional:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            auto = " or None (automatic)" if name in optional else ""
            raise ValueError(f"config.{name}={value!r} must be an int >= {low}{auto}")


def auto_width(n: int) -> int:
    """Parents a query expands per iteration on an index of n codes: the power of two nearest
    n / 1M, from 1 to 4 (1 below ~1.4M codes, 2 to ~2.8M, 4 beyond).

    The larger the graph, the more expansions a query needs before its list settles, and
    expanding w parents at once costs less than w iterations (one merge of the list for w
    rows of neighbours), so the wider beam wins once many are needed. Measured with
    `benchmarks/ann.py --methods ours --widths 1,2,4 --caps 1,2` on its synthetic data (2 cores,
    2026-12-05, results/widths/), best QPS of the sweep at recall@10 >= 0.95, widths 1 / 2 / 4:
    1M 34.0k / 21.0k / 16.7k; 2M 15.3k / 17.1k / 14.7k (width 4 best from 0.97: 8.9k against
    6.1k and 3.3k); 5M 2.2k / 2.6k / 6.3k. (200k: every width at 0.99, width 1 fastest.) Data of
    another intrinsic dimension move the crossover: pass `width` to choose it."""
    return 1 << min(2, max(0, round(math.log2(max(n, 1) / 1e6))))


def _seed(query_codes, codes, entries, layout: KeyLayout | PairLayout, size: int):
    """The start list [size, Q], sorted: entries split into `size` strided groups, the nearest
    of each group (so the nearest entry of all is always in it) -- a diverse, near start that
    costs one pass of distances and a running min, not a top-k over all entries."""
    e, q = entries.shape[0], query_codes.shape[0]
    groups = -(-e // size)
    per_step = min(groups, _SEED_GROUPS_PER_STEP)
    steps = -(-groups // per_step)
    ids = jnp.pad(entries, (0, steps * per_step * size - e), constant_values=-1)
    ids = ids.reshape(steps, per_step, size)
    entry_codes = jnp.moveaxis(codes[jnp.maximum(ids, 0)], -1, 1)  # [steps, W, per_step, size]
    query_t = query_codes.T[:, None, :]  # [W, 1, Q]

    def fold(step, best):
        # Word-major, a few groups a step: each term is a row of Q contiguous XORs and the
        # keys stay in cache (an [E, Q, W] reduce over the minor axis of W words, then a min
        # over the whole [E, Q] keys, ran 3x slower on XLA:CPU, measured).
        for g in range(per_step):  # unrolled: elementwise mins, no reduce over a major axis
            d = hamming_pairs_word_major(entry_codes[step][:, g, :, None], query_t)  # [size, Q]
            node = ids[step][g][:, None]
            keys = layout.pack(d, jnp.broadcast_to(node, d.shape))
            best = bitonic.minimum(best, bitonic.where(node >= 0, keys, SENTINEL))
        return best

    return bitonic.sort(lax.fori_loop(0, steps, fold, layout.empty((size, q))))


# Seed groups scored per loop step (unrolled). One a step cost 3.2 ms of a 13 ms batch (500
# queries, 100k codes, 8333 entries, L=32, one core); 4: 1.2 ms, 8: 1.06 ms, 16: 1.04 ms.
_SEED_GROUPS_PER_STEP = 8


def beam_search(
    query_codes,
    codes,
    graph,
    entries,
    *,
    candidates: int,
    width: int = 1,
    iterations: int = 32,
    pairs: bool | None = None,
):
    """Hamming beam search (traceable; jit it, or see search for batches of queries).

    query_codes uint32 [Q, W]; codes uint32 [N, W]; graph int32 [N, R] (-1 = no edge);
    entries int32 [E]. Returns (ids int32 [Q, L], dist int32 [Q, L]) sorted by (distance, id),
    -1 / BIG where fewer than L nodes were reached. pairs: the list's entries as two words
    (None: only where one does not hold them; see _layout)."""
    top = seed_list(query_codes, codes, entries, candidates=candidates, pairs=pairs)
    return walk(
        query_codes, codes, graph, top, candidates=candidates, width=width, iterations=iterations
    )


def _layout(codes, pairs: bool | None = None) -> KeyLayout | PairLayout:
    """The list's entries: one uint32 key where (distance, id, flag) fits 32 bits (256-bit
    codes: up to 2**22 codes), else two words (PairLayout; pairs=True forces them), whose
    networks cost more per step but give the same order and so the same results."""
    n, n_bits = codes.shape[0], codes.shape[1] * 32
    if n >= 1 << 31:
        raise ValueError(f"an index of {n} codes has more than 2**31 - 1 ids")
    fits = KeyLayout.fits(n, n_bits, flag=True)
    if pairs is False and not fits:
        raise ValueError(f"pairs=False: {n} codes of {n_bits} bits do not fit one uint32 key")
    return KeyLayout.for_ids(n, flag=True) if fits and not pairs else PairLayout(flag_bits=1)


def seed_list(query_codes, codes, entries, *, candidates: int, pairs: bool | None = None):
    """beam_search's start: the list as keys uint32 [next_pow2(candidates), Q], or Pairs of
    them (see _layout and _seed)."""
    size = bitonic.next_pow2(candidates)
    return _seed(query_codes, codes, entries, _layout(codes, pairs), size)


def nearest_entries(query_codes, codes, entries, count: int, groups: int):
    """Of entries int32 [E] split into `groups` strided groups, the nearest of each group to
    each query, the `count` nearest of those: int32 [Q, count], by (distance, id), -1 past the
    entries. The first is the nearest of all, exactly (ties to the lower id); with E <= groups
    all are exact. The search's seed (see _seed), a running min over all entries."""
    layout = _layout(codes)
    return layout.ids(_seed(query_codes, codes, entries, layout, groups)[:count]).T


def walk(
    query_codes,
    codes,
    graph,
    top,
    *,
    candidates: int,
    width: int,
    iterations: int,
    fused: bool = False,
    kernel_config=None,
):
    """beam_search from the list `top` that seed_list made. fused: by the Pallas kernel
    (SearchConfig.walk), where the list is one-word keys; the same lists. kernel_config: its
    GraphWalkConfig (None: graph_walk's default)."""
    layout = _layout(codes, pairs=isinstance(top, bitonic.Pairs))
    if fused and isinstance(layout, KeyLayout):
        keys = graph_walk(
            query_codes,
            codes,
            graph,
            top.T,
            width=width,
            iterations=iterations,
            id_bits=layout.id_bits,
            config=kernel_config,
            interpret=jax.default_backend() != "gpu",
        )[:, :candidates]
        return layout.ids(keys), layout.dist(keys)
    q = query_codes.shape[0]
    r = graph.shape[1]
    size = top.shape[0]  # the list, padded to a power of two for the networks
    fresh = width * r
    lookup = size >= _LOOKUP_FROM

    def merge_pending(top, pending):
        """Scores the pending neighbours [width*R, Q] (-1: none) and merges those that can enter."""
        d = hamming_pairs(codes[jnp.maximum(pending, 0)], query_codes[None, :, :])
        new = layout.pack(d, pending)
        enters = bitonic.less(new, top[-1:])  # else farther than the list's last entry
        if lookup:  # the membership test, by a binary search of the sorted list
            enters = enters & ~bitonic.contains(top, new)
        new = bitonic.where(enters, new, SENTINEL)
        new = bitonic.sort(bitonic.pad_rows(new, bitonic.next_pow2(fresh)))
        if width > 1:
            # Two parents may share a neighbour, whose copies sort next to each other: dropping
            # repeats of the sorted rows beat comparing each row's ids with every earlier row's
            # (a [width R, width R, Q] broadcast). 1M codes, 1000 queries, ms of a search, width
            # 2 / 4 (2 cores, 2026-12-05): L=64 31 -> 26 / 50 -> 33, L=128 56 -> 50 / 77 -> 56,
            # L=256 139 -> 113 / 145 -> 122.
            new = bitonic.drop_repeats(new)
        new = bitonic.pad_rows(new, size) if new.shape[0] < size else new[:size]
        return bitonic.merge_smallest(top, new)

    def expand(top):
        """Marks the `width` best unexpanded entries expanded; returns their neighbours that are
        not in the list yet, [width*R, Q] (-1: none), to be merged in the next iteration."""
        # The list is sorted, so the best unexpanded entry is the smallest unexpanded key: a
        # min over the leading axis per parent (a cumsum to rank them ran 3x slower, measured).
        parents, remaining = [], layout.unexpanded(top)
        for _ in range(width):
            best = bitonic.min_rows(bitonic.where(remaining, top, SENTINEL))
            parents.append(layout.ids(best))
            remaining = remaining & ~bitonic.equal(top, best[None, :])
        parents = jnp.stack(parents)  # [width, Q]; -1 where a query has none left
        live = parents >= 0
        chosen = layout.unexpanded(top) & ~remaining
        # Gathered element-wise from the flat graph straight into [width, R, Q]: gathering rows
        # and transposing let XLA fold the transpose into a column-major layout, and the
        # consumers then ran as scalar code (3x slower, measured).
        if graph.shape[0] * r < 1 << 31:
            flat = parents[:, None, :] * r + jnp.arange(r, dtype=jnp.int32)[None, :, None]
            rows = graph.reshape(-1)[flat]
        else:  # the flat index would overflow int32
            rows = graph[parents[:, None, :], jnp.arange(r, dtype=jnp.int32)[None, :, None]]
        nb = jnp.where(live[:, None, :], rows, -1).reshape(fresh, q)
        if lookup:  # merge_pending drops those in the list
            ok = nb >= 0
        else:
            # One compare per list slot, unrolled over rows of Q contiguous ids, which XLA:CPU
            # vectorises (a reduce over a [L, R, Q] or [Q, R, L] broadcast ran 3-7x slower).
            known = layout.ids(top)
            ok = functools.reduce(jnp.logical_and, [nb != known[i] for i in range(size)], nb >= 0)
        return layout.mark(top, chosen), jnp.where(ok, nb, -1)

    def cond(state):
        it, top, pending = state
        return (it <= iterations) & (jnp.any(layout.unexpanded(top)) | jnp.any(pending >= 0))

    def body(state):
        # Pipelined: the neighbours found in one iteration are scored and merged in the next,
        # so the unrolled membership test is materialised once as loop state instead of being
        # fused into (and recomputed by) the first stage of the sorting network.
        it, top, pending = state
        top, pending = expand(merge_pending(top, pending))
        return it + 1, top, pending

    pending = jnp.full((fresh, q), -1, jnp.int32)
    _, top, _ = lax.while_loop(cond, body, (jnp.int32(0), top, pending))
    top = top[:candidates].T
    return layout.ids(top), layout.dist(top)


# The membership test (is a neighbour already in the list?) compares each of the width * R
# neighbours with every list entry, O(L) per neighbour and, with the iteration cap growing
# with L, O(L^2) per query: 60-80% of a walk at L=256-512. From this list size it is a binary
# search of the sorted list instead, log2(L) + 1 gathers per scored neighbour, which XLA:CPU
# runs slower per step than the vectorised compares but wins from L=256: 100k codes, 1000
# queries, whole search ms, compares / binary search (2 cores, 2026-12-05): L=64 17 / 23,
# L=128 35 / 43, L=256 161 / 103, L=512 862 / 250. Same lists either way.
_LOOKUP_FROM = 256

beam_search_jit = jax.jit(
    beam_search, static_argnames=("candidates", "width", "iterations", "pairs")
)


def rerank(queries, vectors, cand, k: int, metric: str, deleted=None, hop=None):
    """Exact scores of candidates cand int32 [Q, L] (-1 = none) against vectors float32 or
    float16 [N, D] (scored in float32) -> (scores f32 [Q, k], idx int32 [Q, k]). l2: squared
    distances, ascending; ip / cosine: similarities, descending. Missing results: idx -1 and
    score +inf (l2) or -inf (ip, cosine); a NaN score counts as missing (a found candidate's
    score can be infinite, for a query of huge norm).

    hop: a FloatHop, whose `refine` best candidates' graph neighbours are scored too; the
    best k of both, each node once (ties to the lower node id), are returned (see _hop).
    The search runs it as two programs (rank_batch, hop_batch); this is the same in one.

    Runs in chunks of queries whose gathered [q, L, D] float32 candidates are at most 16 MB
    (whole batches of 500 at L=256 were 65 MB each, the peak of a 1M index's searches)."""
    rows = _rerank_rows(cand.shape[1], vectors.shape[1])
    if hop is None:
        one = functools.partial(_rerank, vectors=vectors, k=k, metric=metric, deleted=deleted)
        return bitonic.slice_map(one, (queries, cand), rows, axis=0)

    def one(queries, query_codes, cand):
        first = _ranked(queries, cand, vectors, metric, deleted)
        dist = hamming_pairs(hop.codes[jnp.maximum(cand, 0)], query_codes[:, None, :])
        listed = bitonic.sort(
            bitonic.pad_rows(_layout(hop.codes).pack(dist.T, cand.T), first.shape[0])
        )
        return _hop(queries, query_codes, listed, first, vectors, deleted, k, metric, hop)

    return bitonic.slice_map(one, (queries, hop.query_codes, cand), rows, axis=0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FloatHop:
    """What rerank's float hop reads: the graph int32 [N, R] (-1: no edge), the codes uint32
    [N, W] and the queries' codes [Q, W] (to find which neighbours are candidates already), and
    `refine`, how many of the best candidates' neighbours are scored (static)."""

    graph: jax.Array
    codes: jax.Array
    query_codes: jax.Array
    refine: int = dataclasses.field(metadata=dict(static=True))


_RERANK_BYTES = 16 << 20
# Off CPU a chunk is a trip of the rerank's loop: a gather, the scores and a sorting network of
# ~30 steps, each a kernel launch. In chunks of 16 MB, run 3's batches of 10000 queries at
# L=128 (128-d) took 40 trips one after another; in 1 GB (as exact_search's tiles) one trip.
_RERANK_BYTES_ACCELERATOR = 1 << 30


def _rerank_rows(scored: int, dim: int) -> int:
    """Queries a rerank chunk holds: their [q, scored, dim] float32 rows in _RERANK_BYTES (on an
    accelerator _RERANK_BYTES_ACCELERATOR)."""
    cpu = jax.default_backend() == "cpu"
    return max(1, (_RERANK_BYTES if cpu else _RERANK_BYTES_ACCELERATOR) // (4 * scored * dim))


def _scores(queries, cand, vectors, metric: str, deleted):
    """(exact scores f32 [Q, L] of candidates cand [Q, L], bool [Q, L]: not a result)."""
    x = vectors[jnp.maximum(cand, 0)].astype(jnp.float32)  # [Q, L, D]; float16 stored
    if metric == "l2":
        s = jnp.sum((x - queries[:, None, :]) ** 2, axis=-1)
    else:
        # HIGHEST: a GPU's default TF32 would round the scores that the rerank exists to
        # make exact (a batched mat-vec: memory-bound, so full float32 costs nothing).
        s = jnp.einsum("qld,qd->ql", x, queries, precision=lax.Precision.HIGHEST)
    bad = (cand < 0) | jnp.isnan(s)  # a NaN (inf - inf) would sort by its sign bit
    if deleted is not None:
        bad = bad | deleted[jnp.maximum(cand, 0)]
    return s, bad


def _best_first(s, metric: str):
    """Scores -> uint32 keys, best first (ascending distance, descending similarity)."""
    return ordered_key(s if metric == "l2" else -s)


def _score_of(key, metric: str):
    """_best_first's inverse."""
    s = float_of_ordered_key(key)
    return s if metric == "l2" else -s


def _rerank(queries, cand, vectors, k: int, metric: str, deleted):
    s, bad = _scores(queries, cand, vectors, metric, deleted)
    # Best first: ascending distance, descending similarity, ties to the earlier list
    # position, as lax.top_k ordered them; but by a sorting network across the lists, where
    # XLA:CPU's top_k runs row by row (0.37 ms for k = 24 of 24 on 200 rows). The whole
    # rerank, same results, 2 cores: 200 queries, L=24, k=24, 0.54 -> 0.27 ms; 1000 queries
    # L=64 k=10 5.2 -> 3.0 ms; L=128 k=100 31 -> 23 ms (1M vectors, random candidates).
    pos = jnp.broadcast_to(jnp.arange(cand.shape[1], dtype=jnp.uint32), cand.shape)
    keys = _score_keys(s, bad, pos, metric)  # (score, list position) [L, Q]
    best = bitonic.sort(bitonic.pad_rows(keys, bitonic.next_pow2(cand.shape[1])))[:k].T
    found = best.hi != SENTINEL
    pos = jnp.where(found, best.lo, 0).astype(jnp.int32)
    idx = jnp.where(found, jnp.take_along_axis(cand, pos, axis=1), -1)
    missing = jnp.inf if metric == "l2" else -jnp.inf
    scores = jnp.where(found, jnp.take_along_axis(s, pos, axis=1), missing)
    return scores, idx


def _score_keys(s, bad, nodes, metric: str):
    """Scores s [Q, L] of nodes int32 [Q, L] (or of list positions) as (score, node) keys,
    Pairs [L, Q], best first once sorted (the node breaks ties); a bad entry's is SENTINEL."""
    return bitonic.Pairs(
        jnp.where(bad, SENTINEL, _best_first(s, metric)).T, nodes.astype(jnp.uint32).T
    )


def _ranked(queries, cand, vectors, metric: str, deleted):
    """The candidates cand [Q, L] by exact score, best first: sorted _score_keys, Pairs
    [next_pow2(L), Q]."""
    keys = _score_keys(*_scores(queries, cand, vectors, metric, deleted), cand, metric)
    return bitonic.sort(bitonic.pad_rows(keys, bitonic.next_pow2(cand.shape[1])))


def _hop(queries, query_codes, listed, first, vectors, deleted, k: int, metric: str, hop):
    """The rerank with one hop in float space (hop: FloatHop): the graph neighbours of the
    `hop.refine` best candidates by exact score (`first`, _ranked) that are not candidates
    already (`listed`: the candidates' Hamming keys, sorted) are scored too, and the best k of
    candidates and neighbours (ties to the lower node id) are returned as (scores, idx).

    The codes' errors are what a rerank of the list cannot undo: a near point whose code is
    far from the query's never becomes a candidate. Its code is still near the codes of the
    points near it, though, so the graph rows of the best candidates by exact score hold much
    of what the list missed. 1M synthetic (benchmarks/ann.py data), 1000 queries, the
    neighbours of the best 4: recall@100 at L=256 0.949 -> 0.955, recall@10 at L=64 0.933 ->
    0.951; the best 32 at L=128: recall@100 0.770 -> 0.954. (At 100k, where even the exact
    Hamming top 512 holds only 0.863 of the top 100, the best 32's neighbours added 0.002:
    there the missed points are not near the found ones in code either.)

    Most neighbours are candidates already (at L=256 83% of the best 4's 128, at L=64 48%,
    counting repeats), and gathering a float row is the rerank's cost, so only the rest are
    scored: the candidates are the walk's list, sorted by (Hamming distance, node), so a
    binary search for a neighbour's own key (bitonic.contains, the walk's membership test)
    finds it from its code. The others gather node 0's row instead of their own, which stays
    in cache, so the gathers cost what is new.

    1M, L=256, 500 queries, 2 cores: the hop takes 8.2 ms beside the ranking's 10.7 (the
    rerank without it 10.3). Scoring only the new ones, each once, at most 64 (sorting node
    ids to drop repeats and gaps, then the 64 scores: networks of 128 keys and 64 Pairs
    where this sorts 128 Pairs twice), took 6.0 ms, but its compilation peaked 40-60 MiB
    higher (VmHWM of the first search, +145-164 against +107 MiB), past what the 1M
    benchmark's peak memory allows (see _compile_search); comparing every pair of neighbours
    to drop repeats, 35 ms a search of 1000 queries."""
    q = first.shape[1]
    refine = hop.refine
    parent = jnp.where(first.hi[:refine] != SENTINEL, first.lo[:refine].astype(jnp.int32), -1)
    nb = jnp.where(parent[..., None] >= 0, hop.graph[jnp.maximum(parent, 0)], -1)  # [P, Q, R]
    nb = jnp.moveaxis(nb, 2, 1).reshape(-1, q)  # [P * R, Q]
    d = hamming_pairs(hop.codes[jnp.maximum(nb, 0)], query_codes[None, :, :])
    nb = jnp.where(bitonic.contains(listed, _layout(hop.codes).pack(d, nb)), -1, nb).T
    nb_keys = _score_keys(*_scores(queries, nb, vectors, metric, deleted), nb, metric)
    # A neighbour two parents share has one score (one row, scored by one computation), so
    # its copies sort next to each other and drop_repeats keeps one.
    nb_keys = bitonic.pad_rows(nb_keys, bitonic.next_pow2(nb.shape[1]))
    nb_keys = bitonic.drop_repeats(bitonic.sort(nb_keys))
    span = max(bitonic.next_pow2(k), nb_keys.shape[0])
    top = bitonic.pad_rows(first, span) if first.shape[0] < span else first[:span]
    best = bitonic.merge_smallest(top, bitonic.pad_rows(nb_keys, span))[:k].T
    found = best.hi != SENTINEL
    idx = jnp.where(found, best.lo.astype(jnp.int32), -1)
    missing = jnp.inf if metric == "l2" else -jnp.inf
    return jnp.where(found, _score_of(best.hi, metric), missing), idx


def ordered_key(x):
    """float32 -> uint32 in the same order (-0.0 as 0.0; x not NaN, below the SENTINEL key
    0xFFFFFFFF, which is a NaN's): the sign bit set for x >= 0, every bit flipped for x < 0."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))


def float_of_ordered_key(key):
    """ordered_key's inverse: uint32 -> float32 (-0.0 comes back as 0.0)."""
    bits = jnp.where(key >> 31 == 1, key & np.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


@functools.partial(jax.jit, static_argnames=("candidates",))
def seed_batch(queries, query_codes, codes, entries, *, candidates):
    """One batch's (start lists (seed_list), query codes), a program of its own: see
    compiled_search_batch. query_codes: uint32 [Q, W], or the Binarizer that makes them from
    the queries, here (a dispatch and a round trip through the host less than encoding apart)."""
    if isinstance(query_codes, Binarizer):
        query_codes = codes_of(query_codes, queries)
    return seed_list(query_codes, codes, entries, candidates=candidates), query_codes


@functools.partial(
    jax.jit, static_argnames=("candidates", "width", "iterations", "fused", "kernel_config")
)
def walk_batch(
    query_codes,
    codes,
    graph,
    top,
    *,
    candidates,
    width,
    iterations,
    fused=False,
    kernel_config=None,
):
    """One batch's walk from its start lists (seed_batch): query_codes uint32 [Q, W] -> the
    candidates int32 [Q, L] to rerank and their Hamming distances (the list, sorted by
    (distance, node)), a program of its own: see compiled_search_batch."""
    return walk(
        query_codes,
        codes,
        graph,
        top,
        candidates=candidates,
        width=width,
        iterations=iterations,
        fused=fused,
        kernel_config=kernel_config,
    )


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def rerank_batch(queries, vectors, cand, deleted, *, k, metric):
    """One batch's rerank (rerank), a program of its own: see compiled_search_batch."""
    return rerank(queries, vectors, cand, k, metric, deleted)


@functools.partial(jax.jit, static_argnames=("metric",))
def rank_batch(queries, vectors, cand, deleted, *, metric):
    """One batch's candidates ranked by exact score, Pairs [Q, next_pow2(L)] (_ranked): the
    first of the float hop's two programs (see compiled_search_batch)."""

    def one(queries, cand):
        return _ranked(queries, cand, vectors, metric, deleted).T

    rows = _rerank_rows(cand.shape[1], vectors.shape[1])
    return bitonic.slice_map(one, (queries, cand), rows, axis=0)


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def hop_batch(queries, vectors, cand, dist, ranked, deleted, hop, *, k, metric):
    """One batch's float hop (_hop) from its walk's list (cand, dist) and its ranked
    candidates (rank_batch) -> (scores, idx): the second of the hop's two programs."""
    layout = _layout(hop.codes)

    def one(queries, query_codes, cand, dist, ranked):
        listed = bitonic.pad_rows(layout.pack(dist.T, cand.T), ranked.shape[1])  # sorted
        return _hop(queries, query_codes, listed, ranked.T, vectors, deleted, k, metric, hop)

    rows = _rerank_rows(hop.refine * hop.graph.shape[1], vectors.shape[1])
    parts = (queries, hop.query_codes, cand, dist, ranked)
    return bitonic.slice_map(one, parts, rows, axis=0)


def compiled_search_batch(queries, query_codes, codes, graph, vectors, entries, deleted, **static):
    """One batch's search, (queries, query_codes, codes, graph, vectors, entries, deleted) ->
    (scores [Q, k], idx [Q, k]), compiled for these argument shapes (arrays or
    ShapeDtypeStructs) and static parameters, from a cache that keeps the `SEARCH_PROGRAMS`
    most recently used.

    jax.jit keeps every program it compiles, and a search program holds 10-20 MB once
    compiled (VmRSS after malloc_trim, 100k and 1M codes), so a sweep over seven list sizes
    kept about 100 MB that the next compilation's own ~100 MB peak then stood on (2 cores,
    2026-11-26). An evicted program is freed; using it again compiles it again (1-2 s).

    The seed, the walk and the rerank are three programs: XLA:CPU's compilation peaks far
    above what it keeps (its fusion emitters), and apart they peaked at ~41 and ~80 MB against
    ~110 as one (seed and walk, 100k codes, L=64). The rerank's sorting network in the walk's
    program took a 1M index's first search at L=128 from +65 to +118 MiB (VmHWM), and the
    1M benchmark's peak past hnswlib's; apart, +83 (L=256: +77, +126, +62), and a sweep of L
    from 16 to 256 after the build stays under the build's own peak (692 MiB), as before.
    With the float hop (config.refine) the rerank is two programs, the ranking and the hop
    (rank_batch, hop_batch), for the same reason (see _compile_search)."""
    args = (queries, query_codes, codes, graph, vectors, entries, deleted)
    leaves, structure = jax.tree.flatten(args)  # query_codes may be a Binarizer
    key = (
        structure,
        tuple((a.shape, jnp.dtype(a.dtype), getattr(a, "sharding", None)) for a in leaves),
        tuple(sorted(static.items())),
    )
    compile_search = functools.partial(_compile_search, *args, **static)
    return lru_program(
        _PROGRAMS, _PROGRAMS_LOCK, programs_kept(codes.shape[0]), key, compile_search
    )


def programs_kept(n: int) -> int:
    """How many compiled search programs the cache keeps while searching n codes.

    Each holds ~14 MB (VmRSS after malloc_trim, digits, 2 cores, 2026-12-05) and a compilation
    takes 1.3-1.8 s there. A large index's programs stand under every search's peak memory,
    which is a target (the 1M benchmark's sweep of L keeps SEARCH_PROGRAMS); a small index's
    searches are interactive, and a query count in a third batch bucket (batch_rows) should
    not compile again the first two's programs."""
    return SEARCH_PROGRAMS if n >= LARGE_INDEX else SMALL_INDEX_SEARCH_PROGRAMS


def batch_rows(rows: int) -> int:
    """The rows of a compiled query batch that holds `rows` queries: the next power of two up
    to 16, then one of four steps an octave, offset so that it is never a multiple of 64 (20,
    24, 28, 32, 36, 44, 52, 60, 68, 72, 88, ..., 208, ..., 544, ...). At most a quarter of a
    batch is padding, and queries of any count run on one of ~4 programs an octave: compiled
    for the exact count instead, each new count compiled again (1.5 s on digits, 2 cores,
    2026-12-05), and one query at a time with varying counts ran at that.

    Not a multiple of 64: the list is [L, Q] with Q minor, and rows of a multiple of 64
    queries (256 bytes) ran the walk's networks up to 2x slower on XLA:CPU (cache sets, we
    think): 100k codes, L=256, two batches, us a query: Q=496 148, 500 159, 504 158, 512 313,
    520 144, 528 144, 544 149, 576 283, 592 146, 448 296, 480 163, 384 335, 320 278, 352 146;
    at L=64, 512 19.0 against 14.7-15.9 (2 cores, 2026-12-05)."""
    if rows <= 16:
        return bitonic.next_pow2(max(rows, 1))
    step = bitonic.next_pow2(rows) // 8
    offset = 0 if step <= 4 else min(step // 2, 32)  # offset + k * step: never 0 mod 64
    return -(-(rows - offset) // step) * step + offset


def query_batches(num_queries: int, batch_size: int, threads: int) -> tuple[int, int]:
    """(queries a batch holds, the rows it is compiled for: batch_rows of that): at most batch_size
    queries a batch, at least `threads` batches where there are queries enough, and the
    queries spread evenly over the batches (1025 queries in batches of at most 1024 are two of
    513, not 1024 and a batch of 1023 padding rows)."""
    per = max(1, min(batch_size, -(-num_queries // threads)))
    batches = max(1, -(-num_queries // per))
    per = max(1, -(-num_queries // batches))
    return per, batch_rows(per)


def lru_program(cache: collections.OrderedDict, lock, limit: int, key, compile_fn):
    """The program under `key` in `cache` (made by compile_fn() if absent), now the most
    recently used; past `limit` programs the least recently used is dropped, and freed:
    before a compilation, so that its peak does not stand on a program about to go."""
    with lock:
        program = cache.pop(key, None)
        if program is None:
            while len(cache) >= limit:
                cache.popitem(last=False)
            program = compile_fn()
        cache[key] = program  # most recently used last
        while len(cache) > limit:
            cache.popitem(last=False)
    return program


def _compile_search(queries, query_codes, codes, graph, vectors, entries, deleted, **static):
    heap.release_free_heap()  # what earlier searches freed, before the compilations' peaks
    seed = (
        seed_batch.trace(queries, query_codes, codes, entries, candidates=static["candidates"])
        .lower()
        .compile()
    )
    top, query_codes = seed.out_info  # the start lists' and codes' shapes, as seed makes them
    walk_static = {name: static[name] for name in ("candidates", "width", "iterations")}
    walk_static["fused"] = static["walk"] == "fused"
    walk_program = walk_batch.trace(query_codes, codes, graph, top, **walk_static).lower().compile()
    heap.release_free_heap()  # between compilations too: each peaks on what the last freed
    cand, dist = walk_program.out_info
    refine = static["refine"]
    if refine:
        # The hop apart from the ranking: XLA:CPU's compilation peak follows a program's
        # sorting networks. In the rerank's program, the hop took a 1M index's first search
        # at L=256 from +85 to +229 MiB (VmHWM), past hnswlib's peak in the 1M benchmark;
        # apart, +107 against +109 without the hop (2 cores, 2026-12-06).
        rank = rank_batch.trace(queries, vectors, cand, deleted, metric=static["metric"])
        rank = rank.lower().compile()
        heap.release_free_heap()
        hop = FloatHop(graph, codes, query_codes, refine)
        hop_static = {name: static[name] for name in ("k", "metric")}
        hop_program = hop_batch.trace(
            queries, vectors, cand, dist, rank.out_info, deleted, hop, **hop_static
        )
        hop_program = hop_program.lower().compile()

        def rerank_program(queries, query_codes, codes, graph, vectors, cand, dist, deleted):
            ranked = rank(queries, vectors, cand, deleted)
            hop = FloatHop(graph, codes, query_codes, refine)
            return hop_program(queries, vectors, cand, dist, ranked, deleted, hop)
    else:
        rerank_static = {name: static[name] for name in ("k", "metric")}
        rerank = rerank_batch.trace(queries, vectors, cand, deleted, **rerank_static)
        rerank = rerank.lower().compile()

        def rerank_program(queries, query_codes, codes, graph, vectors, cand, dist, deleted):
            return rerank(queries, vectors, cand, deleted)

    # jax's own caches (the traces, their lowerings, the executables) would keep every
    # program alive too; only compiled_search_batch's cache holds them.
    seed_batch.clear_cache()
    walk_batch.clear_cache()
    rerank_batch.clear_cache()
    rank_batch.clear_cache()
    hop_batch.clear_cache()
    # A compilation's freed heap stays resident otherwise: 40-80 MB per new search shape at
    # 1M, which the next search's peak then stands on (VmRSS, measured).
    heap.release_free_heap()

    def run(queries, query_codes, codes, graph, vectors, entries, deleted):
        top, query_codes = seed(queries, query_codes, codes, entries)
        cand, dist = walk_program(query_codes, codes, graph, top)
        return rerank_program(queries, query_codes, codes, graph, vectors, cand, dist, deleted)

    return run


SEARCH_PROGRAMS = 2  # compiled search programs kept for a large index (see programs_kept)
SMALL_INDEX_SEARCH_PROGRAMS = 6  # and for one of fewer than LARGE_INDEX codes
LARGE_INDEX = 200_000
_IN_FLIGHT = 2  # batches one thread dispatches ahead of the one it waits for (see search)
_PROGRAMS: collections.OrderedDict = collections.OrderedDict()
_PROGRAMS_LOCK = threading.Lock()


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} must be one of {METRICS}")
    return metric


def default_threads() -> int:
    """Cores this process may use; the CPU path runs one batch per core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# A CPU call is split over threads only when each thread's batch holds at least this many list
# slots (queries x L). One execution already keeps ~1.6 cores of 2 busy (XLA:CPU's own thread
# pool), and each costs a fixed ~60 us per loop iteration, so small splits only add executions:
# 2 cores, 2026-11-27, median ms of a call, one thread vs two: digits (1597 codes) L=24, 200
# queries 1.6 vs 2.6, 1000 queries 5.1 vs 4.7; 100k codes L=32, 400 queries 4.9 vs 5.1; L=128,
# 50 queries 3.7 vs 5.0, 100 queries 5.6 vs 5.5, 1000 queries 38 vs 31.
_THREAD_MIN_SLOTS = 8192


def thread_count(num_queries: int, config: SearchConfig, *, cpu: bool) -> int:
    """How many batches a search of num_queries runs at once: config.threads (None: the cores)
    on CPU, fewer where a thread's batch would hold under _THREAD_MIN_SLOTS list slots; one on
    an accelerator, whose batches queue on one device anyway."""
    if not cpu:
        return 1
    worth = max(1, num_queries * config.candidates // _THREAD_MIN_SLOTS)
    return min(config.threads or default_threads(), worth)


def search(
    queries,
    query_codes,
    codes,
    graph,
    vectors,
    entries,
    k: int,
    *,
    metric: str = "l2",
    config: SearchConfig = SearchConfig(),
    deleted=None,
):
    """Batched search over all queries (numpy or jax inputs) -> (scores f32 [Q, k], idx int32
    [Q, k]) as numpy. query_codes: uint32 [Q, W], or the Binarizer that makes them (then
    encoded inside the search's first program). Queries run in padded batches of one size,
    batch_rows of the queries a batch holds (few compilations for any query count). On CPU the
    batches run on up to `config.threads` threads at once (thread_count): one XLA:CPU execution
    keeps ~1.6 of 2 cores busy, and batches in parallel use the rest (1.2x at L=128, 1000
    queries) when each is large enough to pay for another execution."""
    check_metric(metric)
    n = codes.shape[0]
    config = config.for_codes(n)
    if not 1 <= k <= config.candidates:
        raise ValueError(f"k={k} must be in 1..candidates={config.candidates}")
    # (SearchConfig itself refuses non-ints, negatives and an unknown walk.)
    if config.width > config.candidates:
        raise ValueError(f"config.width={config.width} must be in 1..{config.candidates}")
    if config.refine > config.candidates:
        raise ValueError(f"config.refine={config.refine} must be in 0..{config.candidates}")
    queries = np.asarray(queries, np.float32)
    encode_here = isinstance(query_codes, Binarizer)
    if encode_here and queries.shape[1:] != (query_codes.dim,):
        raise ValueError(f"queries.shape={queries.shape} must be [Q, {query_codes.dim}]")
    if not encode_here:
        query_codes = np.asarray(query_codes, np.uint32)
    nq = queries.shape[0]
    if nq == 0:  # (no program compiled for no queries)
        return np.empty((0, k), np.float32), np.empty((0, k), np.int32)
    threads = thread_count(nq, config, cpu=jax.default_backend() == "cpu")
    per, bs = query_batches(nq, config.batch_size, threads)
    deleted = jnp.zeros((n,), bool) if deleted is None else jnp.asarray(deleted)
    args = [jnp.asarray(a) for a in (codes, graph, vectors, entries)]
    static = dict(
        k=k,
        metric=metric,
        candidates=config.candidates,
        width=config.width,
        iterations=config.iterations(),
        refine=config.refine,
        walk=config.walk,
    )

    if encode_here:
        codes_spec = query_codes
    else:
        codes_spec = jax.ShapeDtypeStruct((bs, query_codes.shape[1]), jnp.uint32)
    queries_spec = jax.ShapeDtypeStruct((bs, queries.shape[1]), jnp.float32)
    program = compiled_search_batch(queries_spec, codes_spec, *args, deleted, **static)

    def batch_of(rows: np.ndarray) -> jax.Array:
        # Padded with copies of the last query: one compiled shape for every batch.
        if len(rows) < bs:
            rows = np.concatenate([rows, np.repeat(rows[-1:], bs - len(rows), axis=0)])
        return jnp.asarray(rows)

    def launch(start):
        qv = queries[start : start + per]
        qc = query_codes if encode_here else batch_of(query_codes[start : start + per])
        return len(qv), program(batch_of(qv), qc, *args, deleted)

    def collect(launched):
        m, (s, i) = launched
        return np.asarray(s)[:m], np.asarray(i)[:m]

    starts = range(0, nq, per)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            parts = list(pool.map(lambda start: collect(launch(start)), starts))
    else:
        # _IN_FLIGHT batches are dispatched before the first is waited for, so that the host
        # pads and copies the next batch while the device runs this one; not all of them, so
        # that a huge query set does not hold every batch's buffers at once.
        parts, in_flight = [], collections.deque()
        for start in starts:
            in_flight.append(launch(start))
            if len(in_flight) > _IN_FLIGHT:
                parts.append(collect(in_flight.popleft()))
        parts += [collect(launched) for launched in in_flight]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
