"""kNN graph construction in Hamming space, fixed shapes throughout, distributed with shard_map.

The stages follow the Binary Distributed Graph paper (Zhao et al., CIKM 2019, arXiv 2102.04656):
a single-pass divide-and-conquer (binary clustering, exact sub-graphs inside clusters, with each
point in several clusters for redundancy), then neighbourhood-propagation rounds that refine the
whole graph, then pruning and reverse edges for navigation. Where the paper is silent the choices
below are ours.

1. Partition. Hamming k-means on an evenly spaced sample (`kmeans_sample_per_cluster` points per
   cluster, at most 65536), centroids are the per-bit majority vote of their members (ties to 0;
   an empty cluster keeps its centroid). One pass then assigns every point to its `num_assign`
   nearest centroids. `n_clusters` defaults to N * num_assign / (cluster_capacity *
   cluster_fill), so an average cluster fills half a block.
2. Sub-graphs. The N * num_assign (cluster, point) assignments are laid out in (cluster, point id)
   order and cut into blocks of `cluster_capacity` consecutive slots; exact kNN runs inside each
   block. A cluster larger than a block spans several blocks, small neighbouring clusters share
   one: no assignment is ever dropped, and the layout depends only on the data, never on the
   sharding. A point's lists from its blocks are merged (deduplicated, top K).
3. Propagation (`rounds` rounds, breadth-first as in the paper): the candidates of p are the
   first `sample_width` neighbours of each of its first `sample_neighbors` neighbours. The
   paper's filter: a candidate farther than p's current K-th neighbour, or already a neighbour,
   is dropped before the merge, so only possible improvements are sorted. Each list stays sorted
   by (distance, index).
4. Pruning: relative-neighbourhood (HNSW-style heuristic) on the K-list in rank order: p -> q is
   kept unless an already kept neighbour r is strictly closer to q than p is. Kept edges come
   first, then the pruned ones (rank order), so the list still fills the degree.
5. Reverse edges: each node collects up to `degree` in-edges (sources ranked by the rank the edge
   has in the source's list, then source id). The output row is: the first degree // 2 forward
   edges, then reverse edges, then the remaining forward edges, duplicates removed, cut to
   `degree` (-1 pads rows of tiny graphs).

Distribution. Points are sharded by rows over the mesh axis `config.axis` (n = ceil(N / D) rows a
device, padded). Every exchange is a ring of D - 1 `ppermute` steps that passes one shard-sized
table around (codes [n, W], neighbour lists [n, S], or block results): each device keeps the rows
it asked for as the shard that owns them passes by. Per-device memory is therefore O(N / D) (two
shards of a table at a time, never an all-gathered copy), and a ring moves the same bytes per
device as an all_gather would. We chose the ring over an all_to_all of requests because requests
per destination vary with the data, and fixed-capacity all_to_all buckets would either drop
requests (sharding-dependent results) or need O(N) buffers. The cost: the masked local lookups
run once per ring step, and propagation rows are processed in chunks of `row_chunk` (each chunk
runs its own code ring) to bound the gathered candidate codes. Cluster histograms
([D, n_clusters]) and the k-means sample are the only replicated arrays.

Determinism. Every result is a function of the codes only: block layout by (cluster, point id),
kNN ties to the lower slot, merges sorted by (distance, index), reverse edges by (rank, source).
The 8-device build returns exactly the single-device graph.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from alijax.ann.hamming import hamming_pairs, hamming_topk, unpack_bits
from alijax.parallel import make_mesh

BIG = 1 << 30  # distance of an empty slot; exact in float32, so top_k on float keys is exact
_MAX_KMEANS_SAMPLE = 65536


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Static build parameters (see the module docstring for each stage)."""

    intermediate_degree: int | None = None  # K of the kNN graph; None: 2 * degree
    cluster_capacity: int = 1024  # slots per block (exact kNN is C x C)
    cluster_fill: float = 0.5  # mean cluster size as a fraction of capacity
    n_clusters: int | None = None  # None: from cluster_capacity and cluster_fill
    # Defaults measured on 20k SIFT-like points (benchmarks/ann.py --quick data), Hamming
    # 10-NN recall of the K=64 graph: capacity 512 / 2 assignments / 12x12 samples 0.82;
    # 1024 / 3 / 16x16 0.98 (3.6 s vs 2.3 s).
    num_assign: int = 3  # clusters per point (the paper's redundancy)
    kmeans_iterations: int = 4
    kmeans_sample_per_cluster: int = 32
    rounds: int = 3
    sample_neighbors: int = 16  # S1: neighbours whose lists are read per round
    sample_width: int = 16  # S2: entries read from each
    row_chunk: int = 65536  # rows per propagation / pruning chunk
    block_batch: int = 8  # blocks per step of the exact in-block kNN
    prune: bool = True
    reverse: bool = True
    axis: str = "data"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one build."""

    n_total: int  # N real points
    shards: int  # D
    rows: int  # n = rows per shard (N padded to D * n)
    words: int
    k: int
    degree: int
    n_clusters: int
    num_assign: int
    capacity: int
    blocks_per_shard: int
    sample_size: int
    cfg: GraphConfig


def _plan(n_total: int, words: int, degree: int, shards: int, cfg: GraphConfig) -> _Plan:
    k = cfg.intermediate_degree or 2 * degree
    k = max(degree, min(k, n_total - 1))
    a = max(1, cfg.num_assign)
    capacity = max(k + 1, min(cfg.cluster_capacity, n_total * a))
    nc = cfg.n_clusters or round(n_total * a / (capacity * cfg.cluster_fill))
    nc = max(a, min(nc, n_total))
    a = min(a, nc)
    blocks = -(-n_total * a // capacity)
    sample = min(n_total, max(nc, min(_MAX_KMEANS_SAMPLE, nc * cfg.kmeans_sample_per_cluster)))
    return _Plan(
        n_total=n_total,
        shards=shards,
        rows=-(-n_total // shards),
        words=words,
        k=k,
        degree=degree,
        n_clusters=nc,
        num_assign=a,
        capacity=capacity,
        blocks_per_shard=-(-blocks // shards),
        sample_size=sample,
        cfg=cfg,
    )


# ------------------------------------------------------------------------------- primitives


def _take_along(x, idx):
    return jnp.take_along_axis(x, idx, axis=-1)


def topk_unique(ids, dist, k: int, window: int | None = None):
    """Best k distinct ids per row, sorted by (distance, id).

    ids int32 [R, M] (-1 = empty), dist int32 [R, M] -> (ids [R, k], dist [R, k]); empty slots
    come last as (-1, BIG). Only the best `window` entries (by distance, ties to the lower
    position) are deduplicated, so heavy duplication can push a candidate out of one call; it
    is found again later and the lists stay distinct."""
    m = ids.shape[-1]
    window = m if window is None else max(k, min(window, m))
    dist = jnp.where(ids < 0, BIG, dist)
    if window < m:
        _, pos = lax.top_k(-dist.astype(jnp.float32), window)
        ids, dist = _take_along(ids, pos), _take_along(dist, pos)
    dist, ids = lax.sort((dist, ids), dimension=-1, num_keys=2)
    dup = jnp.concatenate(
        [jnp.zeros_like(ids[..., :1], bool), ids[..., 1:] == ids[..., :-1]], axis=-1
    )
    bad = dup | (ids < 0) | (dist >= BIG)
    dist = jnp.where(bad, BIG, dist)
    ids = jnp.where(bad, -1, ids)
    # Positions are (distance, id)-sorted, so top_k's lower-position tie rule is the id rule.
    _, pos = lax.top_k(-dist.astype(jnp.float32), k)
    return _take_along(ids, pos), _take_along(dist, pos)


def _segment_rank(keys):
    """Rank of each entry within its run of equal keys in a sorted int array [M]."""
    i = jnp.arange(keys.shape[0], dtype=jnp.int32)
    start = jnp.concatenate([jnp.ones((1,), bool), keys[1:] != keys[:-1]])
    return i - lax.cummax(jnp.where(start, i, 0))


# ------------------------------------------------------------------------------- ring exchange


def _ring_take(table, gidx, fill, plan: _Plan, axis: str):
    """Rows table[gidx] of a table sharded by rows over `axis` (each shard holds table.shape[0]
    rows, global row = shard * rows + local). gidx int32 [...] (< 0 or out of range: `fill`).
    Returns [..., *table.shape[1:]]. D - 1 ppermute steps; per-device memory O(table shard)."""
    rows = table.shape[0]
    owner = jnp.where(gidx >= 0, gidx // rows, -1)
    local = jnp.clip(gidx - owner * rows, 0, rows - 1)
    out_shape = gidx.shape + table.shape[1:]
    extra = (None,) * (table.ndim - 1)
    out = jnp.full(out_shape, fill, table.dtype)
    if plan.shards == 1:
        ok = (owner == 0)[(...,) + extra]
        return jnp.where(ok, jnp.take(table, local, axis=0), out)
    me = lax.axis_index(axis)
    perm = [(i, (i + 1) % plan.shards) for i in range(plan.shards)]

    def visit(t, buf, out):
        ok = (owner == (me - t) % plan.shards)[(...,) + extra]
        return jnp.where(ok, jnp.take(buf, local, axis=0), out)

    def body(t, carry):
        buf, out = carry
        out = visit(t, buf, out)
        return lax.ppermute(buf, axis, perm), out

    buf, out = lax.fori_loop(0, plan.shards - 1, body, (table, out))
    return visit(plan.shards - 1, buf, out)


def _ring_scan(tables, step_fn, init, plan: _Plan, axis: str):
    """Folds step_fn(acc, visiting_shard_index, *visiting_tables) over every shard's tables,
    passing them around the ring (the push counterpart of _ring_take)."""
    if plan.shards == 1:
        return step_fn(init, jnp.int32(0), *tables)
    me = lax.axis_index(axis)
    perm = [(i, (i + 1) % plan.shards) for i in range(plan.shards)]

    def body(t, carry):
        bufs, acc = carry
        acc = step_fn(acc, (me - t) % plan.shards, *bufs)
        return tuple(lax.ppermute(b, axis, perm) for b in bufs), acc

    bufs, acc = lax.fori_loop(0, plan.shards - 1, body, (tuple(tables), init))
    return step_fn(acc, (me - (plan.shards - 1)) % plan.shards, *bufs)


def _shard_index(plan: _Plan, axis: str):
    return jnp.int32(0) if plan.shards == 1 else lax.axis_index(axis)


def _chunked_rows(fn, arrays, plan: _Plan):
    """Applies fn to row chunks of arrays [n, ...] (a Python loop over static chunks: chunks may
    run ring collectives, which must not sit under a vmap)."""
    n = arrays[0].shape[0]
    size = min(n, plan.cfg.row_chunk)
    outs = [fn(*(a[s : s + size] for a in arrays)) for s in range(0, n, size)]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)


# ------------------------------------------------------------------------------- 1. partition


def majority_centroids(codes, assign, n_clusters: int, old):
    """Majority vote per bit: codes uint32 [S, W], assign int32 [S] -> uint32 [C, W]
    (ties to 0; clusters without members keep `old`)."""
    bits = unpack_bits(codes).astype(jnp.int32)
    ones = jax.ops.segment_sum(bits, assign, n_clusters)
    size = jax.ops.segment_sum(jnp.ones_like(assign), assign, n_clusters)
    new = _pack(2 * ones > size[:, None])
    return jnp.where((size > 0)[:, None], new, old)


def _pack(bits):
    b = bits.astype(jnp.uint32).reshape(*bits.shape[:-1], -1, 32)
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def hamming_kmeans(sample, n_clusters: int, iterations: int):
    """Centroids uint32 [C, W] from sample uint32 [S, W] (initialised with evenly spaced rows)."""
    init = jnp.linspace(0, sample.shape[0] - 1, n_clusters).astype(jnp.int32)
    cent = sample[init]
    for _ in range(iterations):
        _, assign = hamming_topk(sample, cent, 1)
        cent = majority_centroids(sample, assign[:, 0], n_clusters, cent)
    return cent


def _partition(codes, plan: _Plan, axis: str):
    """Global slot position of each (point, assignment) in the (cluster, point) layout.

    codes uint32 [n, W] (this shard) -> pos int32 [n, a] (-1 for padding rows)."""
    n, a, nc = plan.rows, plan.num_assign, plan.n_clusters
    me = _shard_index(plan, axis)
    gid = me * n + jnp.arange(n, dtype=jnp.int32)
    sample_idx = jnp.asarray(np.linspace(0, plan.n_total - 1, plan.sample_size).astype(np.int32))
    sample = _ring_take(codes, sample_idx, 0, plan, axis)
    cent = hamming_kmeans(sample, nc, plan.cfg.kmeans_iterations)
    _, cl = hamming_topk(codes, cent, a)  # [n, a]
    valid = (gid < plan.n_total)[:, None]
    cl = jnp.where(valid, cl, nc)  # padding goes to a dummy cluster past the end
    flat_cl = cl.reshape(-1)
    flat_pt = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, a)).reshape(-1)
    entry = jnp.arange(n * a, dtype=jnp.int32)
    s_cl, _, s_entry = lax.sort((flat_cl, flat_pt, entry), num_keys=2)
    rank = _segment_rank(s_cl)
    hist = jax.ops.segment_sum(jnp.ones_like(flat_cl), flat_cl, nc + 1)
    if plan.shards > 1:
        all_hist = lax.all_gather(hist, axis)  # [D, nc + 1]
        before = jnp.arange(plan.shards)[:, None] < me
        dev_off = jnp.sum(jnp.where(before, all_hist, 0), axis=0)
        total = jnp.sum(all_hist, axis=0)
    else:
        dev_off, total = jnp.zeros_like(hist), hist
    start = jnp.cumsum(total) - total
    s_pos = start[s_cl] + dev_off[s_cl] + rank
    s_pos = jnp.where(s_cl < nc, s_pos, -1)
    pos = jnp.zeros((n * a,), jnp.int32).at[s_entry].set(s_pos)
    return pos.reshape(n, a)


# ------------------------------------------------------------------------------- 2. sub-graphs


def _scatter_blocks(codes, pos, plan: _Plan, axis: str):
    """This shard's blocks: (ids int32 [B, C] global point ids or -1, codes uint32 [B, C, W])."""
    n, a, c, w = plan.rows, plan.num_assign, plan.capacity, plan.words
    slots = plan.blocks_per_shard * c
    base = _shard_index(plan, axis) * slots

    def step(acc, v, codes_v, pos_v):
        ids_acc, codes_acc = acc
        local = pos_v - base
        local = jnp.where((pos_v >= 0) & (local >= 0) & (local < slots), local, slots).reshape(-1)
        gid = v * n + jnp.arange(n, dtype=jnp.int32)
        gid = jnp.broadcast_to(gid[:, None], (n, a)).reshape(-1)
        src = jnp.broadcast_to(codes_v[:, None, :], (n, a, w)).reshape(-1, w)
        return (ids_acc.at[local].set(gid, mode="drop"), codes_acc.at[local].set(src, mode="drop"))

    init = (jnp.full((slots,), -1, jnp.int32), jnp.zeros((slots, w), jnp.uint32))
    ids, bcodes = _ring_scan((codes, pos), step, init, plan, axis)
    return ids.reshape(-1, c), bcodes.reshape(-1, c, w)


def _block_knn(ids, codes, k: int):
    """Exact kNN inside one block: ids [C], codes [C, W] -> (ids [C, k], dist [C, k])."""
    d = hamming_pairs(codes[:, None, :], codes[None, :, :])
    # Same point, not just the diagonal: both of a point's clusters can land in one block.
    bad = (ids < 0)[None, :] | (ids[:, None] == ids[None, :])
    d = jnp.where(bad, BIG, d)
    _, pos = lax.top_k(-d.astype(jnp.float32), k)
    nd = _take_along(d, pos)
    nid = jnp.where(nd >= BIG, -1, ids[pos])
    return nid, nd  # a duplicated point's two slots give the same list; the merge dedups


def _initial_knn(codes, plan: _Plan, axis: str):
    """Stages 1-2: (ids int32 [n, K], dist int32 [n, K]) for this shard's rows."""
    pos = _partition(codes, plan, axis)
    bids, bcodes = _scatter_blocks(codes, pos, plan, axis)
    knn = functools.partial(_block_knn, k=plan.k)
    nid, nd = lax.map(lambda x: knn(*x), (bids, bcodes), batch_size=plan.cfg.block_batch)
    nid = nid.reshape(-1, plan.k)
    nd = nd.reshape(-1, plan.k)
    got_id = _ring_take(nid, pos, -1, plan, axis)  # [n, a, K]
    got_d = _ring_take(nd, pos, BIG, plan, axis)
    n = plan.rows
    return topk_unique(got_id.reshape(n, -1), got_d.reshape(n, -1), plan.k)


# ------------------------------------------------------------------------------- 3. propagation


def _propagate_chunk(codes_c, ids_c, d_c, gid_c, nn_c, codes, plan: _Plan, axis: str):
    """One chunk of rows: candidates nn_c int32 [r, S1 * S2] -> merged (ids, dist) [r, K]."""
    cand_codes = _ring_take(codes, nn_c, 0, plan, axis)  # [r, S, W]
    cd = hamming_pairs(codes_c[:, None, :], cand_codes)
    kth = d_c[:, -1:]
    known = jnp.any(nn_c[:, :, None] == ids_c[:, None, :], axis=-1)
    # The paper's filter: only candidates that could enter the list reach the merge.
    drop = (nn_c < 0) | (nn_c == gid_c[:, None]) | known | (cd > kth)
    cd = jnp.where(drop, BIG, cd)
    cat_i = jnp.concatenate([ids_c, nn_c], axis=1)
    cat_d = jnp.concatenate([d_c, cd], axis=1)
    return topk_unique(cat_i, cat_d, plan.k, window=3 * plan.k)


def _propagate(codes, ids, dist, plan: _Plan, axis: str):
    s1 = min(plan.cfg.sample_neighbors, plan.k)
    s2 = min(plan.cfg.sample_width, plan.k)
    gid = _shard_index(plan, axis) * plan.rows + jnp.arange(plan.rows, dtype=jnp.int32)
    for _ in range(plan.cfg.rounds):
        nn = _ring_take(ids[:, :s2], ids[:, :s1], -1, plan, axis).reshape(plan.rows, s1 * s2)
        step = functools.partial(_propagate_chunk, codes=codes, plan=plan, axis=axis)
        ids, dist = _chunked_rows(step, (codes, ids, dist, gid, nn), plan)
    return ids, dist


# ------------------------------------------------------------------------------- 4-5. pruning


def rng_prune(d_pn, d_nn, valid):
    """Relative-neighbourhood pruning in rank order.

    d_pn int32 [r, K] (p to its neighbours, ascending), d_nn int32 [r, K, K] (between
    neighbours), valid bool [r, K] -> kept bool [r, K]: j is kept unless a kept i < j has
    d_nn[i, j] < d_pn[j]."""
    k = d_pn.shape[1]

    def body(j, kept):
        occluded = jnp.any(kept & (d_nn[:, :, j] < d_pn[:, j][:, None]), axis=1)
        return kept.at[:, j].set(valid[:, j] & ~occluded)

    return lax.fori_loop(0, k, body, jnp.zeros_like(valid))


def _prune_chunk(ids_c, d_c, codes, plan: _Plan, axis: str):
    nb = _ring_take(codes, ids_c, 0, plan, axis)  # [r, K, W]
    d_nn = hamming_pairs(nb[:, :, None, :], nb[:, None, :, :])
    valid = ids_c >= 0
    kept = rng_prune(d_c, d_nn, valid)
    k = ids_c.shape[1]
    rank = jnp.arange(k, dtype=jnp.int32)
    prio = jnp.where(kept, rank, jnp.where(valid, k + rank, BIG))
    _, pos = lax.top_k(-prio.astype(jnp.float32), k)
    return _take_along(ids_c, pos), _take_along(kept, pos)


def _reverse_edges(fwd, plan: _Plan, axis: str, width: int):
    """In-edges: fwd int32 [n, E] (global targets or -1) -> sources int32 [n, width] ordered by
    (rank of the edge in its source's list, source id), -1 padded."""
    n, e = fwd.shape
    base = _shard_index(plan, axis) * n
    rank = jnp.broadcast_to(jnp.arange(e, dtype=jnp.int32), (n, e)).reshape(-1)

    def step(acc, v, fwd_v):
        acc_rank, acc_src = acc
        src = jnp.broadcast_to((v * n + jnp.arange(n, dtype=jnp.int32))[:, None], (n, e))
        local = fwd_v.reshape(-1) - base
        mine = (fwd_v.reshape(-1) >= 0) & (local >= 0) & (local < n)
        key = jnp.where(mine, local, n)
        key, r, s = lax.sort((key, rank, src.reshape(-1)), num_keys=3)
        slot = _segment_rank(key)
        ok = (key < n) & (slot < width)
        row = jnp.where(ok, key, n)
        new_rank = jnp.full((n, width), BIG, jnp.int32).at[row, slot].set(r, mode="drop")
        new_src = jnp.full((n, width), -1, jnp.int32).at[row, slot].set(s, mode="drop")
        cat_r = jnp.concatenate([acc_rank, new_rank], axis=1)
        cat_s = jnp.concatenate([acc_src, new_src], axis=1)
        cat_r, cat_s = lax.sort((cat_r, cat_s), dimension=-1, num_keys=2)
        return cat_r[:, :width], cat_s[:, :width]

    init = (jnp.full((n, width), BIG, jnp.int32), jnp.full((n, width), -1, jnp.int32))
    _, src = _ring_scan((fwd,), step, init, plan, axis)
    return src


def merge_forward_reverse(fwd, rev, degree: int):
    """Row = fwd[:degree//2], then rev, then the rest of fwd; duplicates and -1 removed, cut to
    degree. fwd int32 [n, K], rev int32 [n, R] -> int32 [n, degree]."""
    h = degree // 2
    cat = jnp.concatenate([fwd[:, :h], rev, fwd[:, h:]], axis=1)
    prio = jnp.broadcast_to(jnp.arange(cat.shape[1], dtype=jnp.int32), cat.shape)
    ids, prio = lax.sort((cat, prio), dimension=-1, num_keys=2)
    dup = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] == ids[:, :-1]], axis=1)
    prio = jnp.where(dup | (ids < 0), BIG, prio)
    _, pos = lax.top_k(-prio.astype(jnp.float32), degree)
    out = _take_along(ids, pos)
    return jnp.where(_take_along(prio, pos) >= BIG, -1, out)


def _finalize(codes, ids, dist, plan: _Plan, axis: str):
    if plan.cfg.prune:
        step = functools.partial(_prune_chunk, codes=codes, plan=plan, axis=axis)
        fwd, kept = _chunked_rows(step, (ids, dist), plan)
    else:
        fwd, kept = ids, ids >= 0
    if not plan.cfg.reverse:
        return jnp.pad(fwd, ((0, 0), (0, max(0, plan.degree - fwd.shape[1]))), constant_values=-1)[
            :, : plan.degree
        ]
    src_edges = jnp.where(kept, fwd, -1)[:, : plan.degree]
    rev = _reverse_edges(src_edges, plan, axis, plan.degree)
    return merge_forward_reverse(fwd, rev, plan.degree)


# ------------------------------------------------------------------------------- entry points


def _build_local(codes, plan: _Plan, axis: str, stage: str):
    ids, dist = _initial_knn(codes, plan, axis)
    if stage == "initial":
        return ids, dist
    ids, dist = _propagate(codes, ids, dist, plan, axis)
    if stage == "knn":
        return ids, dist
    return _finalize(codes, ids, dist, plan, axis)


def _check_codes(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint32 or codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes (dtype={codes.dtype}, shape={codes.shape}) must be uint32 [N, W]")
    if codes.shape[0] < 2:
        raise ValueError(f"codes.shape[0]={codes.shape[0]} must be >= 2")
    return codes


@functools.lru_cache(maxsize=32)
def _compiled(plan: _Plan, mesh, axis: str, stage: str):
    """The jitted shard_map build for one plan (cached: a build of the same shapes reuses it)."""
    fn = functools.partial(_build_local, plan=plan, axis=axis, stage=stage)
    out_specs = P(axis) if stage == "final" else (P(axis), P(axis))
    # check_vma=False: hamming_topk's loops start from replicated constants (no pcast), which the
    # varying-axis checker rejects although every value here is per-device by construction.
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=out_specs, check_vma=False)
    return jax.jit(mapped)


def _run(codes, degree: int, mesh, config: GraphConfig, stage: str):
    codes = _check_codes(codes)
    if not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree={degree!r} must be a positive int")
    if mesh is None:
        mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    if config.axis not in mesh.shape:
        raise ValueError(f"config.axis={config.axis!r} is not an axis of the mesh {mesh.shape}")
    n_total, words = codes.shape
    plan = _plan(n_total, words, int(degree), mesh.shape[config.axis], config)
    padded = np.zeros((plan.rows * plan.shards, words), np.uint32)
    padded[:n_total] = codes
    sharding = jax.sharding.NamedSharding(mesh, P(config.axis))
    out = _compiled(plan, mesh, config.axis, stage)(jax.device_put(padded, sharding))
    return jax.tree.map(lambda x: np.asarray(x)[:n_total], out)


def build_graph(codes, degree: int, *, mesh=None, config: GraphConfig = GraphConfig()):
    """Search graph over codes uint32 [N, W] -> int32 [N, degree] (numpy; -1 pads tiny graphs).

    mesh: a Mesh whose axis config.axis shards the points (None: one device)."""
    return _run(codes, degree, mesh, config, "final")


def knn_graph(codes, k: int, *, mesh=None, config: GraphConfig = GraphConfig(), rounds=None):
    """The approximate Hamming kNN graph before pruning: (ids int32 [N, k], dist int32 [N, k]),
    rows sorted by (distance, index). rounds=0 gives the clustering-only graph."""
    cfg = dataclasses.replace(
        config, intermediate_degree=k, rounds=config.rounds if rounds is None else rounds
    )
    return _run(codes, k, mesh, cfg, "knn")


def graph_recall(approx_ids, true_ids) -> float:
    """Mean fraction of each row of true_ids [N, k] found in approx_ids [N, k'] (numpy)."""
    approx_ids, true_ids = np.asarray(approx_ids), np.asarray(true_ids)
    hits = (approx_ids[:, :, None] == true_ids[:, None, :]).any(axis=1)
    return float(hits.mean())


def exact_knn(codes, k: int):
    """Exact Hamming kNN excluding self: (ids int32 [N, k], dist int32 [N, k]) (numpy)."""
    d, i = hamming_topk(jnp.asarray(codes), jnp.asarray(codes), k + 1)
    d, i = np.asarray(d), np.asarray(i)
    self_hit = i == np.arange(len(i))[:, None]
    # Drop self (or, when duplicates tie with it, the last column) so each row keeps k entries.
    drop = np.where(self_hit.any(axis=1), self_hit.argmax(axis=1), k)
    keep = np.ones_like(self_hit)
    keep[np.arange(len(i)), drop] = False
    return i[keep].reshape(-1, k), d[keep].reshape(-1, k)
