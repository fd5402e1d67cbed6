"""Fused beam-search walk over a fixed-degree graph in Hamming space (Pallas, Triton).

The walk of alijax.ann.search (CAGRA's single-pass search: a sorted list of L candidates,
`width` parents expanded per iteration) as one kernel: each program walks `block_q` queries
from their start lists to the end, with the list, the query's code words and the pending
neighbours in registers. Only the graph rows and the neighbours' code words are read from
memory (width * R * bits / 8 bytes an iteration), and nothing but the final list is written.
Composed of XLA ops, an iteration is a dozen kernel launches over the whole batch, and a batch
runs as long as its slowest query; here a finished query's program stops.

Entries are uint32 keys ``dist << (id_bits + 1) | id << 1 | expanded`` (alijax's KeyLayout with
its flag), so sorting keys orders entries by (distance, id) and ties go to the lower id;
0xFFFFFFFF (SENTINEL) is an empty slot. One iteration, per query:

1. Merge: the pending neighbours (from the last expansion; -1 none) get Hamming distances; those
   in the list already, those not below the list's last key, and (width > 1) a neighbour's
   repeats are dropped; the survivors and the list are merged, keeping the L smallest keys.
   Triton has no sort, so the merge places each key by its rank in the union: a list key's
   own slot plus the new keys below it, a new key's count of list keys and new keys below it
   (the earlier slot first among equal keys). Every real key differs from the others (the
   membership test), so ranks are distinct; see MERGES for how keys reach their ranks.
2. Expand: the `width` smallest unexpanded keys are marked expanded, and their graph rows are
   the next pending neighbours.

The loop runs until `iterations` + 1 expansions or until no query of the program has an
unexpanded entry or a pending neighbour, as alijax.ann.search.walk's batch loop does (a
finished query's iterations there change nothing), so the lists are bit for bit the same.

Public API:
  graph_walk(query_codes, codes, graph, start, *, width, iterations, id_bits, config, interpret)
      -> uint32 [Q, L] keys, sorted
  graph_walk_reference (plain jnp, a sort of the union per iteration), GraphWalkConfig,
  default_config, MERGES, SENTINEL
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._shared import (
    TritonCompilerParams,
    caller_independent_locations,
    is_pow2,
    next_pow2,
)

SENTINEL = np.uint32(0xFFFFFFFF)

# How a merge puts the union's keys at their ranks: "select" picks the key of each rank with a
# min over [L, L + F] compares in registers (F = width * R, the neighbours scored); "scatter"
# stores each key at its rank in the program's output row (global memory) and loads the row
# back, between barriers: [L, F] compares instead, for two trips through the L1 cache.
MERGES = ("select", "scatter")
# How a neighbour's code is read: "words", a gather of F int32 per code word (W loads, each of
# F lanes); "rows", one gather of the [F, W] words (a row's words contiguous, so the loads can
# be wide; W must be a power of two, a Triton tensor's).
GATHERS = ("words", "rows")


@dataclasses.dataclass(frozen=True)
class GraphWalkConfig:
    """block_q: queries a program walks (a power of two; the program runs until its slowest
    query is done). num_warps: per program. merge: one of MERGES. gather: one of GATHERS."""

    block_q: int = 1
    num_warps: int = 4
    num_stages: int = 1
    merge: str = "select"
    gather: str = "words"

    def validate(self) -> None:
        for name in ("block_q", "num_warps"):
            v = getattr(self, name)
            if not is_pow2(v):
                raise ValueError(f"config.{name}={v} must be a power of two")
        if self.num_stages < 1:
            raise ValueError(f"config.num_stages={self.num_stages} must be >= 1")
        if self.merge not in MERGES:
            raise ValueError(f"config.merge={self.merge!r} must be one of {MERGES}")
        if self.gather not in GATHERS:
            raise ValueError(f"config.gather={self.gather!r} must be one of {GATHERS}")


def default_config(q: int, size: int, fresh: int, n_words: int = 8) -> GraphWalkConfig:
    """One query a program, the scatter merge, a neighbour's code words gathered as one row
    (where W is a power of two), and warps for ~64 elements a thread of the merge's [L, F]
    compares (2 to 16): the config that keeps the most queries on an SM without spilling.

    A query's iterations are a chain of dependent gathers (the parents' graph rows, then the
    neighbours' codes), so the walk hides memory latency with other queries' programs, and
    the registers a program takes bound how many an SM holds (65536 32-bit registers).
    Registers a thread by ptxas for sm_90a, Pallas-Triton's IR compiled by triton 3.9 (XLA's
    bundled Triton may differ; benchmarks/triton_registers.py, 2026-12-06), R = 32, 256-bit
    codes:
    - L = 64 / 128, width 1: scatter, 2 warps, rows 56 / 72 (~18 / 14 programs an SM);
      scatter, 4 warps, words 54 / 58 (9 / 8); scatter, 2 warps, words 71 / 127; scatter,
      1 warp 106 / 168; select, 4 warps 92 / 168 (5 / 3); 4 queries a program of 4 warps
      150 / 216. None spills.
    - scatter, rows: L = 128 width 2 (F = 64), 2 warps 254, 4 warps 128; width 4, 8 warps
      172; L = 256 width 2, 2 warps 255 and spills, 4 warps 233, 8 warps 128; L = 512 width
      4, 8 warps spills 136 bytes, 16 warps 128 and spills 84 bytes; L = 1024 width 8 spills
      13 KB at 16 warps (its [L, F] compares want 64 warps).
    Not yet timed on a GPU: benchmarks/ann_gpu.py times several configs."""
    del q
    threads = size * next_pow2(fresh) // 64  # 64 compares each
    warps = min(16, max(2, next_pow2(threads // 32)))
    return GraphWalkConfig(
        num_warps=warps, merge="scatter", gather="rows" if is_pow2(n_words) else "words"
    )


def _check(query_codes, codes, graph, start, width, iterations, id_bits):
    """Validates the operands; returns (q, size, degree)."""
    for name, x, dtype in (
        ("query_codes", query_codes, jnp.uint32),
        ("codes", codes, jnp.uint32),
        ("graph", graph, jnp.int32),
        ("start", start, jnp.uint32),
    ):
        if x.dtype != dtype or x.ndim != 2:
            raise ValueError(f"{name} must be {jnp.dtype(dtype).name} 2-D; got {x.dtype} {x.shape}")
    q, w = query_codes.shape
    n = codes.shape[0]
    if codes.shape[1] != w:
        raise ValueError(
            f"codes has {codes.shape[1]} words per code but query_codes has {w} "
            f"({codes.shape=}, {query_codes.shape=})"
        )
    if graph.shape[0] != n or graph.shape[1] < 1:
        raise ValueError(f"graph.shape={graph.shape} must have a row per code ({n}), of >= 1 edge")
    if start.shape[0] != q or not is_pow2(start.shape[1]):
        raise ValueError(
            f"start.shape={start.shape} must be [Q={q}, L] with L a power of two (sorted keys)"
        )
    if not isinstance(width, int) or not 1 <= width <= start.shape[1]:
        raise ValueError(f"width={width} must be an int in 1..{start.shape[1]}")
    if not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations={iterations} must be an int >= 0")
    if not isinstance(id_bits, int) or n > 1 << id_bits or 32 * w >= _dist_limit(id_bits):
        raise ValueError(
            f"id_bits={id_bits} must hold ids of {n} codes and leave room for distances up to "
            f"{32 * w} in a 32-bit key"
        )
    return q, start.shape[1], graph.shape[1]


def _dist_limit(id_bits: int) -> int:
    """Distances a key holds are below this (an all-ones distance field is SENTINEL's)."""
    return (1 << (31 - id_bits)) - 1


def _pack(dist, ids, id_bits):
    """(dist, id) -> unexpanded keys; SENTINEL where the id is < 0 (alijax's KeyLayout.pack)."""
    key = (dist.astype(jnp.uint32) << (id_bits + 1)) | (ids.astype(jnp.uint32) << 1)
    return jnp.where((ids >= 0) & (dist < _dist_limit(id_bits)), key, SENTINEL)


def _ids(keys, id_bits):
    node = ((keys >> 1) & np.uint32((1 << id_bits) - 1)).astype(jnp.int32)
    return jnp.where(keys == SENTINEL, -1, node)


# ----------------------------------------------------------------------------- reference


@functools.partial(jax.jit, static_argnames=("width", "iterations", "id_bits"))
def graph_walk_reference(query_codes, codes, graph, start, *, width, iterations, id_bits):
    """Plain jnp: the same walk, each merge a sort of the list and the new keys together.
    Returns uint32 [Q, L] keys, sorted."""
    _, size, degree = _check(query_codes, codes, graph, start, width, iterations, id_bits)
    fresh = width * degree

    def distances(ids):
        x = codes[jnp.maximum(ids, 0)] ^ query_codes[:, None, :]
        return lax.population_count(x).astype(jnp.int32).sum(-1)

    def merge(keys, pending):
        new = _pack(distances(pending), pending, id_bits)
        listed = jnp.any((new >> 1)[:, :, None] == (keys >> 1)[:, None, :], axis=-1)
        new = jnp.where((new < keys[:, -1:]) & ~listed, new, SENTINEL)
        if width > 1:  # a neighbour two parents share: keep its first copy
            earlier = jnp.tril(jnp.ones((fresh, fresh), bool), -1)
            repeat = jnp.any((new[:, :, None] == new[:, None, :]) & earlier, axis=-1)
            new = jnp.where(repeat, SENTINEL, new)
        return jnp.sort(jnp.concatenate([keys, new], axis=1), axis=1)[:, :size]

    def expand(keys):
        remaining = (keys & 1) == 0
        unexpanded = remaining
        parents = []
        for _ in range(width):
            best = jnp.min(jnp.where(remaining, keys, SENTINEL), axis=1)
            parents.append(_ids(best, id_bits))
            remaining = remaining & (keys != best[:, None])
        parents = jnp.stack(parents, axis=1)  # [Q, width]
        rows = jnp.where(parents[..., None] >= 0, graph[jnp.maximum(parents, 0)], -1)
        keys = keys | (unexpanded & ~remaining).astype(jnp.uint32)
        return keys, rows.reshape(keys.shape[0], fresh)

    def cond(state):
        it, keys, pending = state
        return (it <= iterations) & (jnp.any((keys & 1) == 0) | jnp.any(pending >= 0))

    def body(state):
        it, keys, pending = state
        return (it + 1, *expand(merge(keys, pending)))

    pending = jnp.full((start.shape[0], fresh), -1, jnp.int32)
    return lax.while_loop(cond, body, (jnp.int32(0), start, pending))[1]


# ----------------------------------------------------------------------------- kernel


def _as_i32(x):
    return lax.bitcast_convert_type(x, jnp.int32)


def _as_u32(x):
    return lax.bitcast_convert_type(x, jnp.uint32)


def _count(x, axis):
    return jnp.sum(x.astype(jnp.int32), axis=axis)


def _any(x):
    """bool [a, b] -> bool scalar (Pallas-Triton has no reduce_or: a max per axis)."""
    return jnp.max(jnp.max(x.astype(jnp.int32), axis=1)) > 0


def _union_ranks(keys, new, slot, list_slot, width):
    """Drops the new keys [q, F] that cannot enter the list keys [q, L] (in it already; not
    below its last key; with width > 1 a repeat of an earlier slot's) and ranks both in their
    union: (list ranks [q, L], new keys [q, F] with SENTINEL where dropped, their ranks)."""
    last = jnp.max(keys, axis=1)  # the list is sorted: its last key
    listed = jnp.max(((new >> 1)[:, :, None] == (keys >> 1)[:, None, :]).astype(jnp.int32), 2)
    new = jnp.where((new < last[:, None]) & (listed == 0), new, SENTINEL)
    same = new[:, None, :] == new[:, :, None]  # [q, j, i]: new keys i and j are equal
    earlier = slot[:, None, :] < slot[:, :, None]  # [q, j, i]: slot i comes before slot j
    if width > 1:  # a neighbour two parents share: keep its first copy
        new = jnp.where(jnp.max((same & earlier).astype(jnp.int32), 2) > 0, SENTINEL, new)
        below = new[:, None, :] < new[:, :, None]  # [q, j, i]: key i below key j
    else:  # a graph row that repeats an id keeps both copies, as a sort would
        below = (new[:, None, :] < new[:, :, None]) | (same & earlier)
    rank_list = list_slot + _count(new[:, None, :] < keys[:, :, None], 2)
    rank_new = _count(keys[:, None, :] < new[:, :, None], 2) + _count(below, 2)
    return rank_list, new, rank_new


def _select_merge(keys, rank_list, new, rank_new, list_slot):
    """The merged list: for each slot t, the key whose rank is t (a min over masked keys)."""
    target = list_slot[:, :, None]  # [q, t, 1]
    from_list = jnp.where(rank_list[:, None, :] == target, keys[:, None, :], SENTINEL)
    from_new = jnp.where(rank_new[:, None, :] == target, new[:, None, :], SENTINEL)
    return jnp.minimum(jnp.min(from_list, axis=2), jnp.min(from_new, axis=2))


def _barrier(barriers: bool):
    """A thread barrier of the program (none in interpret mode, which runs one thread)."""
    if barriers:
        plgpu.debug_barrier()


def _scatter_merge(out_ref, rows, row, keys, rank_list, new, rank_new, barriers):
    """The merged list: keys of rank < L stored at their ranks in the program's output rows,
    then loaded back. Every slot gets a key: ranks from the count of real keys up belong to
    the list's and the new keys' SENTINELs. The barriers order the threads' trips through
    memory: the last merge's loads before these stores, these stores before the loads."""
    size = keys.shape[1]
    _barrier(barriers)
    plgpu.store(out_ref.at[row, rank_list], _as_i32(keys), mask=rank_list < size)
    plgpu.store(out_ref.at[row, rank_new], _as_i32(new), mask=rank_new < size)
    _barrier(barriers)
    return _as_u32(out_ref[rows, :])


def graph_walk_kernel(
    q_ref, codes_ref, graph_ref, start_ref, out_ref, *, n_words, degree, width, fresh_p,
    iterations, id_bits, block_q, merge, gather, barriers,
):  # fmt: skip
    """Walks block_q queries. All refs are whole arrays (int32 views of the uint32 operands),
    indexed per word and gathered by node id: Pallas-Triton cannot lower a slice of a loaded
    block, and its popcount takes int32."""
    first = pl.program_id(0) * block_q
    rows = pl.ds(first, block_q)
    if gather == "rows":
        q_block = q_ref[rows, :][:, None, :]  # int32 [block_q, 1, W]
        word = lax.broadcasted_iota(jnp.int32, (1, 1, n_words), 2)
    else:
        q_words = [q_ref[rows, np.int32(w)] for w in range(n_words)]  # int32 [block_q] each
    keys0 = _as_u32(start_ref[rows, :])  # [block_q, L], sorted
    size = keys0.shape[1]
    row = first + lax.broadcasted_iota(jnp.int32, (block_q, 1), 0)
    list_slot = lax.broadcasted_iota(jnp.int32, (block_q, size), 1)
    slot = lax.broadcasted_iota(jnp.int32, (block_q, fresh_p), 1)  # a pending neighbour's
    in_rows = slot < width * degree  # fresh_p: width * degree up to a power of two
    parent_slot, column = slot // degree, slot % degree

    def distances(ids, ok):
        if gather == "rows":
            view = codes_ref.at[jnp.maximum(ids, 0)[:, :, None], word]
            cw = plgpu.load(view, mask=ok[:, :, None], other=0)  # [block_q, F, W]
            return jnp.sum(lax.population_count(lax.bitwise_xor(cw, q_block)), axis=2)
        d = None
        for w, qw in enumerate(q_words):
            cw = plgpu.load(codes_ref.at[jnp.maximum(ids, 0), np.int32(w)], mask=ok, other=0)
            pc = lax.population_count(lax.bitwise_xor(cw, qw[:, None]))
            d = pc if d is None else d + pc
        return d

    def merge_pending(keys, pending):
        new = _pack(distances(pending, pending >= 0), pending, id_bits)  # [block_q, F]
        rank_list, new, rank_new = _union_ranks(keys, new, slot, list_slot, width)
        if merge == "scatter":
            return _scatter_merge(out_ref, rows, row, keys, rank_list, new, rank_new, barriers)
        return _select_merge(keys, rank_list, new, rank_new, list_slot)

    def expand(keys):
        unexpanded = (keys & 1) == 0  # SENTINEL has the bit set
        remaining = unexpanded
        parent = jnp.full((block_q, fresh_p), -1, jnp.int32)
        for p in range(width):
            best = jnp.min(jnp.where(remaining, keys, SENTINEL), axis=1)
            parent = jnp.where(parent_slot == p, _ids(best, id_bits)[:, None], parent)
            remaining = remaining & (keys != best[:, None])
        live = (parent >= 0) & in_rows
        nb = plgpu.load(graph_ref.at[jnp.maximum(parent, 0), column], mask=live, other=-1)
        keys = keys | (unexpanded & ~remaining).astype(jnp.uint32)
        return keys, jnp.where(live, nb, -1)

    def cond(state):
        it, keys, pending = state
        return (it <= iterations) & (_any((keys & 1) == 0) | _any(pending >= 0))

    def body(state):
        it, keys, pending = state
        keys, pending = expand(merge_pending(keys, pending))
        return it + 1, keys, pending

    pending = jnp.full((block_q, fresh_p), -1, jnp.int32)
    _, keys, _ = lax.while_loop(cond, body, (jnp.int32(0), keys0, pending))
    if merge == "scatter":
        _barrier(barriers)  # every thread has loaded the row that the last merge stored
    out_ref[rows, :] = _as_i32(keys)


@functools.partial(
    jax.jit, static_argnames=("width", "iterations", "id_bits", "config", "interpret")
)
def graph_walk(
    query_codes,
    codes,
    graph,
    start,
    *,
    width: int,
    iterations: int,
    id_bits: int,
    config: GraphWalkConfig | None = None,
    interpret: bool = False,
):
    """The walk from the start lists, fused.

    Args:
      query_codes: uint32 [Q, W]; codes: uint32 [N, W]; graph: int32 [N, R] (-1: no edge).
      start: uint32 [Q, L] sorted keys ``dist << (id_bits + 1) | id << 1 | expanded``
        (SENTINEL: empty), L a power of two.
      width: parents expanded per iteration; iterations: the cap (iterations + 1 expansions,
        as alijax.ann.search.walk counts them); id_bits: the key's id field (N <= 2**id_bits).
    Returns:
      uint32 [Q, L]: the final lists, sorted, equal to graph_walk_reference's.
    """
    q, size, degree = _check(query_codes, codes, graph, start, width, iterations, id_bits)
    cfg = default_config(q, size, width * degree, codes.shape[1]) if config is None else config
    cfg.validate()
    if cfg.gather == "rows" and not is_pow2(codes.shape[1]):
        raise ValueError(
            f"config.gather='rows' needs a power-of-two number of code words; codes has "
            f"{codes.shape[1]} (use 'words')"
        )
    q_pad = -q % cfg.block_q  # whole blocks: padded queries start empty and never iterate
    query_codes = jnp.pad(query_codes, ((0, q_pad), (0, 0)))
    start = jnp.pad(start, ((0, q_pad), (0, 0)), constant_values=SENTINEL)
    kernel = functools.partial(
        graph_walk_kernel,
        n_words=codes.shape[1],
        degree=degree,
        width=width,
        fresh_p=next_pow2(width * degree),
        iterations=iterations,
        id_bits=id_bits,
        block_q=cfg.block_q,
        merge=cfg.merge,
        gather=cfg.gather,
        barriers=not interpret,
    )
    with caller_independent_locations():
        keys = pl.pallas_call(
            kernel,
            grid=((q + q_pad) // cfg.block_q,),
            out_shape=jax.ShapeDtypeStruct(start.shape, jnp.int32),
            compiler_params=TritonCompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            ),
            interpret=interpret,
            name="graph_walk",
        )(_as_i32(query_codes), _as_i32(codes), graph, _as_i32(start))
    return _as_u32(keys)[:q]
