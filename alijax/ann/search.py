"""Batched beam search over a fixed-degree graph in Hamming space, then exact float rerank.

Modelled on CAGRA's single-pass search (a fixed-size sorted candidate list, `width` parents
expanded per iteration, a visited set), vectorised over a batch of queries so every step is a
fixed-shape array op:

- State per query: the candidate list (ids, Hamming distances, expanded flags) [L], sorted by
  distance, and a visited bitmap of ceil(N / 32) words (exact, so no node's distance is merged
  twice; a bitmap rather than a lossy hash because a batch of Q queries costs only Q * N / 8
  bytes, and search() sizes its batches to bound it).
- Start: the L best of `entries` (a fixed sample of nodes, e.g. evenly spaced or cluster
  medoids), all marked visited.
- Iteration: the `width` best unexpanded entries are expanded; their graph rows give
  width * degree neighbours, unvisited ones get Hamming distances, and the list keeps the best L
  (ties to the lower list position, so results are deterministic). A neighbour farther than the
  current L-th entry cannot enter and is dropped. The loop stops after `max_iterations` or when
  no query has an unexpanded entry (a query that has converged is masked).
- Rerank: the L binary candidates are scored exactly in float ("l2": squared distance,
  ascending; "ip" and "cosine": similarity, descending; cosine expects unit-norm vectors), nodes
  marked deleted are excluded, and the best k are returned. That is the paper's "recall more
  binary candidates, rerank with float features".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alijax.ann.hamming import hamming_pairs

METRICS = ("l2", "ip", "cosine")
BIG = 1 << 30
_BITMAP_BUDGET_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Static search parameters: candidates L (the list size), parents expanded per iteration,
    and the iteration cap (None: L // width + 16, enough to expand every list entry once)."""

    candidates: int = 64
    width: int = 1
    max_iterations: int | None = None
    batch_size: int = 1024

    def iterations(self) -> int:
        return self.max_iterations or self.candidates // self.width + 16


def _set_bits(bitmap, ids, ok):
    """bitmap uint32 [Q, M]; ids int32 [Q, C] distinct per row where ok -> bitmap with bits set."""
    word = jnp.where(ok, ids >> 5, bitmap.shape[1])  # out of range: dropped
    bit = jnp.left_shift(jnp.uint32(1), (ids & 31).astype(jnp.uint32))
    rows = jnp.broadcast_to(jnp.arange(ids.shape[0])[:, None], ids.shape)
    # Distinct ids set distinct bits, so adding them is an exact bitwise or.
    return bitmap.at[rows, word].add(jnp.where(ok, bit, 0), mode="drop")


def _get_bits(bitmap, ids):
    word = jnp.take_along_axis(bitmap, jnp.clip(ids >> 5, 0, bitmap.shape[1] - 1), axis=1)
    return ((word >> (ids & 31).astype(jnp.uint32)) & 1).astype(bool)


def beam_search(
    query_codes, codes, graph, entries, *, candidates: int, width: int = 1, iterations: int = 32
):
    """Hamming beam search (traceable; jit it or call search_batch).

    query_codes uint32 [Q, W]; codes uint32 [N, W]; graph int32 [N, R] (-1 = no edge);
    entries int32 [E]. Returns (ids int32 [Q, L], dist int32 [Q, L]) sorted by distance,
    -1 / BIG where fewer than L nodes were reached."""
    q = query_codes.shape[0]
    n, r = graph.shape
    big_l = candidates
    ent_d = hamming_pairs(query_codes[:, None, :], codes[entries][None, :, :])
    ent_i = jnp.broadcast_to(entries, ent_d.shape)
    e = entries.shape[0]
    if e < big_l:
        ent_d = jnp.pad(ent_d, ((0, 0), (0, big_l - e)), constant_values=BIG)
        ent_i = jnp.pad(ent_i, ((0, 0), (0, big_l - e)), constant_values=-1)
    _, pos = lax.top_k(-ent_d.astype(jnp.float32), big_l)
    top_d = jnp.take_along_axis(ent_d, pos, axis=1)
    top_i = jnp.take_along_axis(ent_i, pos, axis=1)
    top_x = top_i < 0  # padding counts as expanded
    bitmap = jnp.zeros((q, -(-n // 32)), jnp.uint32)
    bitmap = _set_bits(bitmap, ent_i, ent_i >= 0)
    slots = jnp.arange(big_l, dtype=jnp.int32)

    def cond(state):
        it, _, _, top_x, _ = state
        return (it < iterations) & jnp.any(~top_x)

    def body(state):
        it, top_i, top_d, top_x, bitmap = state
        prio = jnp.where(top_x, BIG, slots)
        _, ppos = lax.top_k(-prio.astype(jnp.float32), width)  # best unexpanded first
        live = jnp.take_along_axis(~top_x, ppos, axis=1)
        parents = jnp.where(live, jnp.take_along_axis(top_i, ppos, axis=1), -1)
        top_x = top_x | jnp.any(
            (slots[None, :, None] == ppos[:, None, :]) & live[:, None, :], axis=2
        )
        nb = jnp.where(parents[:, :, None] >= 0, graph[jnp.maximum(parents, 0)], -1)
        nb = nb.reshape(q, width * r)
        ok = (nb >= 0) & ~_get_bits(bitmap, nb)
        if width > 1:  # two parents may share a neighbour: keep its first occurrence
            c = nb.shape[1]
            same = (nb[:, :, None] == nb[:, None, :]) & jnp.tril(jnp.ones((c, c), bool), -1)
            ok = ok & ~jnp.any(same, axis=2)
        bitmap = _set_bits(bitmap, nb, ok)
        nd = hamming_pairs(query_codes[:, None, :], codes[jnp.maximum(nb, 0)])
        nd = jnp.where(ok & (nd <= top_d[:, -1:]), nd, BIG)
        cat_d = jnp.concatenate([top_d, nd], axis=1)
        cat_i = jnp.concatenate([top_i, jnp.where(nd < BIG, nb, -1)], axis=1)
        cat_x = jnp.concatenate([top_x, nd >= BIG], axis=1)
        _, pos = lax.top_k(-cat_d.astype(jnp.float32), big_l)
        take = functools.partial(jnp.take_along_axis, indices=pos, axis=1)
        return it + 1, take(cat_i), take(cat_d), take(cat_x), bitmap

    state = (jnp.int32(0), top_i, top_d, top_x, bitmap)
    _, top_i, top_d, _, _ = lax.while_loop(cond, body, state)
    return top_i, top_d


beam_search_jit = jax.jit(beam_search, static_argnames=("candidates", "width", "iterations"))


def rerank(queries, vectors, cand, k: int, metric: str, deleted=None):
    """Exact scores of candidates cand int32 [Q, L] (-1 = none) -> (scores f32 [Q, k],
    idx int32 [Q, k]). l2: squared distances, ascending; ip / cosine: similarities, descending.
    Missing results: idx -1 and score +inf (l2) or -inf (ip, cosine)."""
    x = vectors[jnp.maximum(cand, 0)]  # [Q, L, D]
    if metric == "l2":
        s = jnp.sum((x - queries[:, None, :]) ** 2, axis=-1)
        key = -s
    else:
        s = jnp.einsum("qld,qd->ql", x, queries)
        key = s
    bad = cand < 0
    if deleted is not None:
        bad = bad | deleted[jnp.maximum(cand, 0)]
    key = jnp.where(bad, -jnp.inf, key)
    top, pos = lax.top_k(key, k)
    idx = jnp.where(jnp.isneginf(top), -1, jnp.take_along_axis(cand, pos, axis=1))
    scores = -top if metric == "l2" else top
    return scores, idx


@functools.partial(jax.jit, static_argnames=("k", "metric", "candidates", "width", "iterations"))
def search_batch(
    queries,
    query_codes,
    codes,
    graph,
    vectors,
    entries,
    deleted,
    *,
    k,
    metric,
    candidates,
    width,
    iterations,
):
    """One batch: queries f32 [Q, D], query_codes uint32 [Q, W] -> (scores [Q, k], idx [Q, k])."""
    cand, _ = beam_search(
        query_codes,
        codes,
        graph,
        entries,
        candidates=candidates,
        width=width,
        iterations=iterations,
    )
    return rerank(queries, vectors, cand, k, metric, deleted)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} must be one of {METRICS}")
    return metric


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
    [Q, k]) as numpy. Queries run in padded batches of a fixed size (one compilation); the batch
    shrinks so the visited bitmaps stay within 64 MB."""
    check_metric(metric)
    n = codes.shape[0]
    if not 1 <= k <= config.candidates:
        raise ValueError(f"k={k} must be in 1..candidates={config.candidates}")
    if config.width < 1 or config.width > config.candidates:
        raise ValueError(f"config.width={config.width} must be in 1..{config.candidates}")
    queries = np.asarray(queries, np.float32)
    query_codes = np.asarray(query_codes, np.uint32)
    nq = queries.shape[0]
    bs = min(config.batch_size, max(1, _BITMAP_BUDGET_BYTES // (4 * (-(-n // 32)))))
    bs = max(1, min(bs, nq))
    deleted = jnp.zeros((n,), bool) if deleted is None else jnp.asarray(deleted)
    args = [jnp.asarray(a) for a in (codes, graph, vectors, entries)]
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int32)
    for start in range(0, nq, bs):
        qv, qc = queries[start : start + bs], query_codes[start : start + bs]
        m = qv.shape[0]
        if m < bs:
            qv = np.concatenate([qv, np.repeat(qv[-1:], bs - m, axis=0)])
            qc = np.concatenate([qc, np.repeat(qc[-1:], bs - m, axis=0)])
        s, i = search_batch(
            jnp.asarray(qv),
            jnp.asarray(qc),
            *args,
            deleted,
            k=k,
            metric=metric,
            candidates=config.candidates,
            width=config.width,
            iterations=config.iterations(),
        )
        out_s[start : start + m] = np.asarray(s)[:m]
        out_i[start : start + m] = np.asarray(i)[:m]
    return out_s, out_i
