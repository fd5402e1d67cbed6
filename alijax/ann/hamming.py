"""Hamming k-nearest-neighbour search over packed binary codes: the library entry point.

Bit order (shared with pallas_kernels.hamming_topk): bit i of a code is bit (i % 32) of word
i // 32, i.e. words are little-endian bit fields. Hamming distance does not depend on the order
as long as queries and codes share it, but the order is fixed so codes can be stored and
exchanged (e.g. viewed as little-endian bytes for faiss IndexBinaryFlat).

On a GPU ``hamming_topk`` runs the fused Pallas kernel (the Q x N distance matrix is never
written); elsewhere a chunked jnp path keeps a running top-k over chunks of N, so peak memory is
O(Q * chunk + Q * k) beyond the inputs for any N.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import hamming_topk as _kernel

_INT32_MAX = 2**31 - 1
# Chunk sizes measured on 2 cores (N = 1M, 256-bit, k = 10, 2026-11-26): with the group
# pre-selection, 16384 codes a chunk was best for Q = 64 and 512 (0.93 and 0.91 G pairs/s, against
# 0.43 and 0.48 at 2048), and a single query wants the largest chunk. The Q x chunk int32 tile is
# capped at 32 MB, so peak memory stays O(Q * chunk) for any N.
_SMALL_Q_ELEMENTS = 1 << 20
_BEST_CHUNK = 1 << 14
_TILE_ELEMENTS = 1 << 23


def pack_bits(bits):
    """bool/int {0,1} [..., n_bits] -> uint32 [..., n_bits // 32]; bit i -> word i // 32, bit i % 32.

    n_bits must be a multiple of 32."""
    bits = jnp.asarray(bits)
    n_bits = bits.shape[-1]
    if n_bits % 32 != 0 or n_bits == 0:
        raise ValueError(f"bits.shape[-1]={n_bits} must be a positive multiple of 32")
    b = (bits != 0).astype(jnp.uint32).reshape(*bits.shape[:-1], n_bits // 32, 32)
    shifts = jnp.arange(32, dtype=jnp.uint32)
    # Distinct powers of two: the sum is the bitwise or.
    return jnp.sum(b << shifts, axis=-1, dtype=jnp.uint32)


def unpack_bits(words, n_bits=None):
    """uint32 [..., W] -> bool [..., n_bits] (default W * 32); the inverse of pack_bits."""
    words = jnp.asarray(words)
    if words.dtype != jnp.uint32:
        raise ValueError(f"words.dtype={words.dtype} must be uint32")
    total = words.shape[-1] * 32
    n_bits = total if n_bits is None else n_bits
    if not 0 < n_bits <= total:
        raise ValueError(f"n_bits={n_bits} must be in 1..{total} (32 * words.shape[-1])")
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = ((words[..., None] >> shifts) & 1).astype(bool)
    return bits.reshape(*words.shape[:-1], total)[..., :n_bits]


def default_chunk_size(q: int, n: int) -> int:
    """Codes per chunk (a power of two in [256, 2**18]); the Q x chunk tile stays <= 32 MB."""
    q = max(q, 1)
    chunk = max(256, min(1 << 18, _SMALL_Q_ELEMENTS // q), min(_BEST_CHUNK, _TILE_ELEMENTS // q))
    chunk = 1 << (chunk.bit_length() - 1)
    return min(chunk, n)


def hamming_pairs(a, b):
    """uint32 [..., W] x [..., W] (broadcasting) -> int32 [...] Hamming distances."""
    return lax.population_count(a ^ b).astype(jnp.int32).sum(-1, dtype=jnp.int32)


def hamming_pairs_word_major(a, b):
    """Hamming distances over word-major codes: uint32 [W, ...] x [W, ...] (broadcasting) ->
    int32 [...]. The sum over words is unrolled, so each term is an elementwise op on rows of
    contiguous entries (a reduce over a minor axis of 8 words ran ~5x slower on XLA:CPU)."""
    terms = [lax.population_count(a[w] ^ b[w]).astype(jnp.int32) for w in range(a.shape[0])]
    return functools.reduce(jnp.add, terms)


def _distances(queries, codes):
    """uint32 [Q, W], [C, W] -> int32 [Q, C]."""
    return hamming_pairs(queries[:, None, :], codes[None, :, :])


def _merge(best, chunk_dist, chunk_start, k):
    """Running (dist, idx) [Q, k] + a chunk's distances [Q, C] starting at index chunk_start
    (int32 Hamming or float32 distances: the running list keeps its dtype).

    Entries are concatenated in increasing index order (the running list holds only earlier,
    lower indices and is itself ordered by (dist, index)), and lax.top_k puts the lower position
    first among equal values, so ties go to the lower index. top_k runs on float32 (exact for
    distances < 2**24), which XLA:CPU serves with a fast partial sort."""
    best_d, best_i = best
    kb = best_i.shape[1]
    cat_d = jnp.concatenate([best_d, chunk_dist], axis=1)
    neg, pos = lax.top_k(-cat_d.astype(jnp.float32), k)
    # Indices from the positions, not from a concatenated [Q, k + C] index array: with a
    # constant chunk_start XLA folded that array into a literal (30 MB for the 1M build's
    # centroid graph, and 0.2 GB of compile-time memory, VmHWM).
    old = jnp.take_along_axis(best_i, jnp.minimum(pos, kb - 1), axis=1)
    return (-neg).astype(best_d.dtype), jnp.where(pos < kb, old, chunk_start + pos - kb)


def _group_candidates(chunk_dist, chunk_start, k, group):
    """The k*group entries of a chunk [Q, C] that hold its top k, in increasing index order.

    Exact: every element of the k best (by distance, then index) lies in one of the k groups of
    `group` consecutive codes with the smallest (group minimum, group index) -- a group ranked
    before it would hold an element that precedes it. Selecting groups costs a min over [Q, C]
    and a top_k over [Q, C / group], instead of a top_k over [Q, C], which dominates on CPU.
    Returns (dist int32 [Q, k*group], idx int32 [Q, k*group]).
    """
    q, c = chunk_dist.shape
    grouped = chunk_dist.reshape(q, c // group, group)
    _, chosen = lax.top_k(-jnp.min(grouped, axis=2).astype(jnp.float32), k)
    chosen = jnp.sort(chosen, axis=1)  # index order, so the later top_k breaks ties by index
    dist = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(q, k * group)
    first = chunk_start + chosen * group
    idx = (first[:, :, None] + jnp.arange(group, dtype=jnp.int32)).reshape(q, k * group)
    return dist, idx


def merge_chunk(best, chunk_dist, chunk_start, *, k, group):
    """The running top-k (dist [Q, k], idx int32 [Q, k]) merged with a chunk's distances
    [Q, C] of indices chunk_start.. (smaller is better, ties to the lower index; int32 or
    float32, exact for integers below 2**24). Through `_group_candidates` when the chunk holds
    more than k groups of `group` (0: never). A ragged last group is padded with the dtype's
    largest value, which never displaces an entry (the running list, ahead of it, holds k): a
    remainder chunk of 64 x 16379 merged in 2.2 ms so, 4.5 through the plain lax.top_k (3621
    columns: 0.85 and 1.27 ms; 2 cores, interleaved medians of 30)."""
    c = chunk_dist.shape[1]
    if not group or -(-c // group) <= k:
        return _merge(best, chunk_dist, chunk_start, k)
    if c % group:
        worst = jnp.inf if jnp.issubdtype(chunk_dist.dtype, jnp.floating) else _INT32_MAX
        chunk_dist = jnp.pad(chunk_dist, ((0, 0), (0, -c % group)), constant_values=worst)
    cand_d, cand_i = _group_candidates(chunk_dist, chunk_start, k, group)
    best_d, best_i = best
    cat_d = jnp.concatenate([best_d, cand_d], axis=1)
    cat_i = jnp.concatenate([best_i, cand_i], axis=1)
    neg, pos = lax.top_k(-cat_d.astype(jnp.float32), k)
    return (-neg).astype(best_d.dtype), jnp.take_along_axis(cat_i, pos, axis=1)


# Codes per group in the candidate pre-selection of `_group_candidates` (measured on 2 cores).
_GROUP = 32


@functools.partial(jax.jit, static_argnames=("k", "chunk_size", "group"))
def hamming_topk_chunked(queries, codes, k, *, chunk_size, group=_GROUP):
    """The jnp path: chunks of N with a running top-k. Same contract as hamming_topk.

    group: codes per group for the exact candidate pre-selection (0 turns it off)."""
    q, n = queries.shape[0], codes.shape[0]
    n_full = n // chunk_size
    init_d = jnp.full((q, k), _INT32_MAX, jnp.int32)
    best = (init_d, jnp.full((q, k), _INT32_MAX, jnp.int32))

    def body(i, best):
        start = i * chunk_size
        chunk = lax.dynamic_slice_in_dim(codes, start, chunk_size, axis=0)
        return merge(best, _distances(queries, chunk), start)

    merge = functools.partial(merge_chunk, k=k, group=group)
    best = lax.fori_loop(0, n_full, body, best)
    if n_full * chunk_size < n:  # static-size remainder, so codes are never padded or copied
        start = n_full * chunk_size
        best = merge(best, _distances(queries, codes[start:]), start)
    return best


def hamming_topk(queries, codes, k, *, chunk_size=None):
    """k nearest codes per query by Hamming distance.

    Args:
      queries: uint32 [Q, W]; codes: uint32 [N, W] (pack_bits layout); 1 <= k <= N.
      chunk_size: codes per chunk on the jnp path (default: default_chunk_size(Q, N)).
    Returns:
      (distances int32 [Q, k], indices int32 [Q, k]), ascending by distance, ties to the
      lower index; identical on every backend.
    """
    q, n, _ = _kernel._check(queries, codes, "nw")
    k = _kernel._check_k(k, n)
    if jax.default_backend() == "gpu":
        return _kernel.hamming_topk(queries, codes, k)
    chunk = default_chunk_size(q, n) if chunk_size is None else chunk_size
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive int")
    return hamming_topk_chunked(queries, codes, k, chunk_size=min(chunk, n))
