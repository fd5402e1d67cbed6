"""kNN graph construction in Hamming space, fixed shapes throughout, distributed with shard_map.

The stages follow the Binary Distributed Graph paper (Zhao et al., CIKM 2019, arXiv 2102.04656):
a single-pass divide-and-conquer (binary clustering, exact sub-graphs inside clusters, with each
point in several clusters for redundancy), then neighbourhood-propagation rounds that refine the
whole graph, then pruning and reverse edges for navigation. Where the paper is silent the choices
below are ours.

1. Partition. Hamming k-means on an evenly spaced sample (`kmeans_sample_per_cluster` points per
   cluster, at most 65536), centroids are the per-bit majority vote of their members (ties to 0;
   an empty cluster keeps its centroid; skipped below 8 sample points a cluster). One pass then
   assigns every point to its `num_assign` nearest centroids: every centroid is scored in a
   running min per strided group of them, so the nearest is exact and the others are the
   nearest of other groups (`nearest_centroids`). `n_clusters` defaults to N * num_assign /
   (cluster_capacity * cluster_fill), so an average cluster fills half a block; the capacity
   defaults to about 6 sqrt(N) clusters, and below ~145k points, where the capacity stops at
   256, the clusters stay 6 sqrt(N) and several share a block. Where 4 or more share one on
   average the centroids are numbered in the order of their codes, so the clusters that share
   a block are near each other.
2. Sub-graphs. The N * num_assign (cluster, point) assignments are laid out in (cluster, point id)
   order and cut into blocks of `cluster_capacity` consecutive slots; exact kNN runs inside each
   block and keeps `block_degree` neighbours a slot. A cluster larger than a block spans several
   blocks, small neighbouring clusters share one: no assignment is ever dropped, and the layout
   depends only on the data, never on the sharding. A point's lists from its blocks are merged
   (deduplicated, top K).
3. Propagation (`rounds` rounds, breadth-first as in the paper): the candidates of p are the
   first `sample_width` neighbours of each of its first `sample_neighbors` neighbours. The
   paper's filter: a candidate farther than p's current K-th neighbour, or already a neighbour,
   is dropped before the merge, so only possible improvements are sorted. Each list stays sorted
   by (distance, index).

Lists as packed keys. Stages 2-4 keep every list as keys [K, n] (column p: p's list) and every
sort, top-k and dedup is a bitonic network on column tiles (bitonic.py), which XLA:CPU vectorises
across lists. A key is one uint32 (distance, id) where both fit (bitonic.KeyLayout: up to 2^23
ids at 256 bits), beyond that bitonic.Pairs of two words (distance; id), which sort to the same
order, so the graph is the same either way, at twice the lists' bytes. The in-block kNN selects
on narrower uint16 keys (distance above the point's nearest, rank of the id in the block),
which order the candidates the same way (`_block_knn_keys_narrow`).
4. Pruning: relative-neighbourhood (HNSW-style heuristic) on the K-list in rank order: p -> q is
   kept unless an already kept neighbour r is strictly closer to q than p is. Kept edges come
   first, then the pruned ones (rank order), so the list still fills the degree.
5. Reverse edges: each node collects up to `degree` in-edges from the first `reverse_sources`
   kept edges of every node (sources ranked by the rank the edge has in the source's list, then
   source id). The output row is: the first degree // 2 forward
   edges, then reverse edges, then the remaining forward edges, duplicates removed, cut to
   `degree` (-1 pads rows of tiny graphs).

Distribution. Points are sharded by rows over the mesh axis `config.axis` (n = ceil(N / D) rows a
device, padded). Rows are processed in chunks (`row_chunk` rows, and for propagation `row_chunk`
/ D rows a device, at least 1024) to bound the gathered candidates, and a chunk gets the rows of
other shards it needs in one of two ways:
- Requests and answers (`_exchange_take`) wherever a chunk asks for rows of a table
  (propagation's neighbour lists and its candidates' codes, the pruning's codes): all_to_all
  rounds of a fixed capacity per destination (twice the even share) until every request is
  answered; the round count is the same on every device, so no request is dropped and
  results never depend on the sharding. The table stays home; bytes moved are the requests'
  and answers', O(n) a device a round. Candidate codes (S = 128 a point) are asked 32768 at
  a time, so their answer buffers stay at 2 MiB.
- A ring (`_ring_take`, `_ring_scan`) of D - 1 `ppermute` steps that passes one shard-sized table
  around (codes [n, W], block results), where every shard visits every other (k-means, the
  blocks' slots, the mesh's block rows, the reverse edges): each device keeps the rows it
  asked for as the shard that owns them passes by (entries of other shards read row 0, so
  only the visiting shard's rows miss the cache). A table read by every chunk travels a full
  circle back home and is threaded on to the next chunk, so no third copy stays behind.
Per-device memory is O(N / D) either way (never an all-gathered copy). A ring run per chunk
costs bytes that grow with N whatever D: propagation's candidate codes on the ring moved
(n / chunk) * (D - 1) * 32 n bytes a device a round (1.7 GB at 1M on 8 devices), as requests
about 2 * 36 * S * n (1.1 GB, falling as 1 / D).
Stage 2 makes its blocks in groups (8 a shard on a mesh, 4 on one device), and each group's kNN
rows travel the ring into a buffer that becomes the lists (`_merge_blocks_by_group`). Stage 5
counts each shard's in-edges per node in a first ring, so the second places every source at its
slot in place.
Cluster histograms ([D, n_clusters]) and the centroids with their graph are the only replicated
arrays; the k-means sample is split over the devices and its vote counts summed with psum
(`build_memory` gives XLA's per-device buffer sizes for any mesh). A mesh may span processes
(`jax.distributed`, one per host): each passes the same codes and places only its own devices'
rows, the rings and requests cross hosts through JAX's collectives, and every process gets the
whole graph back (`to_host`). At 1M on 2 cores, 2 processes of 4 devices built the same graph as
one process of 8, in 1.29x its time (2026-12-05, benchmarks/ann_multiprocess.py, gloo over
loopback TCP).

Memory. The build is three compiled programs (stages 1-2, 3, 4-5) that pass only the lists
between them (donated, and every stage updates them in their own buffer: stage 2 makes them
from one group of blocks' kNN rows at a time, propagation and stages 4-5 rewrite them slice by
slice), and every large working set is cut into chunks of points (`row_chunk`), of
blocks (`block_batch`), of edge ranks (the reverse edges) or of centroids. At 1M 256-bit codes
on one device XLA's buffers peak at 0.45 GB (`build_memory`, stages 4-5: the lists 0.24 GB,
the in-edges 0.12 GB and, since 2026-12-06, 8 MB more for the reverse edges' chunk sorts),
against 0.79 GB with a block table beside the lists and out-of-place propagation, and 2.0 GB as
one program. On 8 devices each one's peak is 56 MiB, 0.13 of that (stages 4-5; the lists' share
is 31 MB, the in-edges 15 MB, the rest chunk buffers).
Lists of Pairs (beyond 2^23 points at 256 bits) hold twice the bytes; forced at 1M they peak
at 800 MiB on one device and 103 MiB a device on 8 (0.128; stages 4-5, `build_memory`), against
767 and 100 MiB of the lax.sort path they replaced (2026-12-05), whose (ids, dist) rows made
other graphs than the keys; at 200k, 2 cores, they build in 12.7 s on one device and 9.5 s on 8
simulated ones (the keys: 6.9 and 6.7 s; the lax.sort path: 14.4 and 9.7 s).

Determinism. Every result is a function of the codes only: block layout by (cluster, point id),
kNN ties to the lower slot, merges sorted by (distance, index), reverse edges by (rank, source).
The 8-device build returns exactly the single-device graph.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from alijax.ann import bitonic
from alijax.ann import search as search_lib
from alijax.ann.bitonic import KeyLayout, PairLayout
from alijax.ann.hamming import hamming_pairs, hamming_pairs_word_major, hamming_topk, unpack_bits
from alijax.ann.heap import release_free_heap
from alijax.parallel import make_mesh

BIG = bitonic.BIG  # distance of an empty slot; exact in float32, so top_k on float keys is exact
_MAX_KMEANS_SAMPLE = 65536


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Static build parameters (see the module docstring for each stage)."""

    intermediate_degree: int | None = None  # K of the kNN graph; None: 2 * degree
    cluster_capacity: int | None = None  # slots per block (exact kNN is C x C); None: auto
    cluster_fill: float = 0.5  # mean cluster size as a fraction of capacity
    # None: from cluster_capacity and cluster_fill (with both automatic, at least 6 sqrt(N))
    n_clusters: int | None = None
    # Defaults measured on SIFT-like points (benchmarks/ann.py data: 1000 natural clusters,
    # 256-bit ITQ, K=64, 2 cores, 2026-11-26), knn-stage time / Hamming 10-NN recall:
    # 100k: capacity 1024 with 3 rounds of 16x16 samples 7.2 s / 0.994; capacity 256 with 2
    # rounds of 8x16 3.5 s / 0.994 (512: 3.4 s / 0.987; 1024: 5.0 s / 0.977).
    # 1M, 2 rounds of 8x16: capacity 256 38 s / 0.88 (4 rounds: 56 s / 0.91); 512 41 s / 0.92;
    # 1024 62 s / 0.97. The best cluster count grows like sqrt(N) (the IVF rule of thumb), so
    # the automatic capacity is N * num_assign / (6 sqrt(N) * cluster_fill), rounded to a power
    # of two in [256, 2048]: 256 at 100k, 512 at 1M (num_assign 2).
    # What the search needs is less than a near-exact kNN graph. Whole builds at 1M, then
    # search recall@10 at L=64 (16384 entries): num_assign 3 with 2 rounds 71.9 s / 0.966;
    # num_assign 2 with 2 rounds 51.1 s / 0.957, with 1 round 45.4 s / 0.956, and with reverse
    # edges from the first 16 kept edges only 38.0 s / 0.956 (num_assign 1: 0.47, the clusters
    # fall apart). At 100k: 9.2 s / 0.978 at L=32 against 7.0 s / 0.977.
    num_assign: int = 2  # clusters per point (the paper's redundancy)
    kmeans_iterations: int = 4
    kmeans_sample_per_cluster: int = 32
    rounds: int = 1
    sample_neighbors: int = 8  # S1: neighbours whose lists are read per round
    sample_width: int = 16  # S2: entries read from each
    # R: NN-descent's reverse neighbours (of the first R edges) also sampled, and their lists.
    # Off: measured (2 rounds, 2 cores) 100k 3.8 s / 0.994 -> 5.0 s / 0.997 with R=8, and 1M
    # 62 s / 0.974 -> 82 s / 0.978; a 32M-element sort per round for the reverse lists costs
    # more than the rounds it saves on this data.
    reverse_samples: int = 0
    # Rows per propagation / pruning / merge chunk (bounds their memory); a mesh of D devices
    # propagates row_chunk // D (at least 1024) at a time, so those buffers shrink with it.
    row_chunk: int = 16384
    block_batch: int = 8  # blocks per step of the exact in-block kNN
    # The in-block kNN's selection on uint16 keys (see _block_knn_keys_narrow): the same
    # graph, the selection ~1.6-2x faster; False for uint32 keys throughout.
    narrow_block_keys: bool = True
    # Entries kept per (point, block) by the in-block kNN; None: K // 2 (at least K /
    # num_assign) in build_graph, K in knn_graph. The block rows are N * num_assign of these
    # lists (0.5 GB at 1M with K entries; they are made and taken into the lists a group of
    # blocks at a time); K // 2 halves them and the merge work, and changed
    # no search recall (1M:
    # recall@10 0.9562 at L=64 either way; 100k: 0.9766 at L=32), though some of the K-lists
    # then stay short of K until the pruning cuts them to `degree`, which is why knn_graph,
    # whose lists are its result, keeps K.
    block_degree: int | None = None
    # Each node's first kept edges that give reverse edges (None: all `degree`). The reverse
    # pass sorts N * reverse_sources edges by target (on one device 2.4 s at 1M, 2 cores);
    # edges past the 16th kept one added no search recall at 100k or 1M (measured), and 8
    # lost a little (1M, recall@10 at L=64 / 128: 0.9317 / 0.9764 against 0.9326 / 0.9768;
    # 2026-12-06).
    reverse_sources: int | None = 16
    prune: bool = True
    reverse: bool = True
    axis: str = "data"

    def __post_init__(self):
        # (0 samples, chunks or fill failed inside the build as an IndexError or a division)
        positive = ("num_assign", "sample_neighbors", "sample_width", "row_chunk", "block_batch")
        required = dict.fromkeys(positive, 1) | dict.fromkeys(
            ("kmeans_iterations", "rounds", "reverse_samples"), 0
        )
        optional = ("intermediate_degree", "cluster_capacity", "n_clusters", "block_degree")
        search_lib.check_int_fields(self, required, optional=dict.fromkeys(optional, 1))
        if not 0.0 < self.cluster_fill <= 1.0:
            raise ValueError(f"config.cluster_fill={self.cluster_fill!r} must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static sizes of one build."""

    n_total: int  # N real points
    shards: int  # D
    rows: int  # n = rows per shard (N padded to D * n)
    words: int
    k: int
    block_k: int  # entries per slot of the block table
    degree: int
    n_clusters: int
    num_assign: int
    capacity: int
    blocks_per_shard: int
    groups: int  # blocks are made in this many groups a shard (see _TABLE_GROUPS)
    sample_size: int
    layout: KeyLayout | PairLayout  # one uint32 key per entry where it fits, else Pairs
    code_order: bool  # centroids numbered in code order (_in_code_order)
    chunk: int  # rows per propagation / merge chunk on a device (see _plan)
    prune_chunk: int  # rows per pruning chunk on a device
    cfg: GraphConfig


_PRUNE_CHUNK = 4096  # rows per pruning step: [64, 64, 4096] pair distances are 64 MB
_MIN_CHUNK = 1024  # a mesh's propagation chunks are no smaller (each runs its exchanges)
# Stage 2 makes a shard's blocks in this many groups, and only one group's kNN rows exist at a
# time (_merge_blocks_by_group): the whole shard's were 31 MB a device at 1M on 8 devices. Each
# group costs a pass over all the shard's points (their slots and rows), so one device, whose
# peak is the pruning stage's, takes fewer. 1M on one device, stages 1-2 (second run, 2 cores,
# 2026-12-06): 4 groups 12.3 s, XLA peak 413 MB (stages 4-5: 452 MB); 8 groups 14.8 s, 372
# MB; each batch of blocks merged straight into the loop-carried [K, N] lists (sessions 5-22)
# 20.2 s, 360 MB, the same lists: a point's column there is K cache lines, gathered and
# scattered per batch (4.9 ms of a batch's ~28 ms, against 0.17 ms for [N, K] rows).
_TABLE_GROUPS = 8
_TABLE_GROUPS_ONE_DEVICE = 4


def _scoped(fn):
    """fn under a jax.named_scope of its name: the build's HLO ops carry it in their op_name, so
    a profile (benchmarks/profile_build.py) sums time by step, not only by source line, whose
    call chain the compiled HLO does not keep. Metadata only: the programs are the same."""

    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        with jax.named_scope(fn.__name__.strip("_")):
            return fn(*args, **kwargs)

    return scoped


def auto_capacity(n: int, num_assign: int, fill: float) -> int:
    """Block size for N points: about 6 sqrt(N) clusters (see GraphConfig)."""
    ideal = n * num_assign / (auto_clusters(n) * fill)
    return int(min(2048, max(256, 2 ** round(math.log2(max(ideal, 1))))))


def auto_clusters(n: int) -> int:
    """About 6 sqrt(N) clusters: the count the capacity is sized for, and the fewest a build
    makes when the capacity is not given (see GraphConfig)."""
    return max(1, round(6 * math.sqrt(n)))


def _plan(n_total: int, words: int, degree: int, shards: int, cfg: GraphConfig) -> _Plan:
    k = cfg.intermediate_degree or 2 * degree
    k = max(degree, min(k, n_total - 1))
    a = max(1, cfg.num_assign)
    capacity = cfg.cluster_capacity or auto_capacity(n_total, a, cfg.cluster_fill)
    capacity = max(k + 1, min(capacity, n_total * a))
    nc = cfg.n_clusters or round(n_total * a / (capacity * cfg.cluster_fill))
    if cfg.n_clusters is None and cfg.cluster_capacity is None:
        # Below ~145k points the capacity stops at 256 and N * a / (256 * fill) clusters would
        # be fewer than the rule's: then several clusters share a block. Clusters larger than
        # the data's own cut through them: at 20k points of 1000 natural clusters, 312
        # clusters kept 64% of the true 10-NN in a shared cluster, 849 kept 87% (measured).
        nc = max(nc, auto_clusters(n_total))
    nc = max(a, min(nc, n_total))
    a = min(a, nc)
    blocks = -(-n_total * a // capacity)
    per_shard = -(-blocks // shards)
    # A whole number of block batches a shard (empty blocks change nothing): a ragged last
    # batch makes lax.map concatenate, a copy of the whole block table (0.7 GB at 1M).
    batch = max(1, min(cfg.block_batch, per_shard))
    n_ids = -(-n_total // shards) * shards
    if n_ids >= 1 << 31:
        raise ValueError(f"{n_total} codes (padded to {n_ids}) exceed 2**31 - 1 ids")
    layout = KeyLayout.for_ids(n_ids) if KeyLayout.fits(n_ids, words * 32) else PairLayout()
    groups = min(_TABLE_GROUPS if shards > 1 else _TABLE_GROUPS_ONE_DEVICE, -(-per_shard // batch))
    per_shard = -(-per_shard // (batch * groups)) * batch * groups
    slots = per_shard * shards * capacity
    if slots >= 1 << 31:
        # Slot positions (_partition, _group_slots, _scatter_blocks) are global int32s.
        raise ValueError(
            f"{n_total} codes with num_assign={a} need {slots} block slots, past the int32 "
            "slot positions (2**31 - 1); build with fewer codes"
            + (" or num_assign=1" if a > 1 else "")
        )
    sample = min(n_total, max(nc, min(_MAX_KMEANS_SAMPLE, nc * cfg.kmeans_sample_per_cluster)))
    # Propagation's chunk buffers shrink with the mesh like every other per-device array
    # (row_chunk is one device's budget): at 1M on 8 devices its candidate codes [128, chunk,
    # 8] words were 61 MB a device with the single-device chunk (chunks ask for the rows
    # they need, so their count does not change the bytes moved). The pruning's pair
    # distances [K, K, chunk] shrink alike, to 1024 rows at most (16 MB; 4096 rows on 8
    # devices were most of a 131k build's per-device peak). The
    # block rows' ring (stage 2) keeps one device's chunks: smaller ones would multiply its
    # rings, and its buffers are a group's table, 4 MB a device at 1M on 8 devices.
    prune = min(cfg.row_chunk, _PRUNE_CHUNK)
    return _Plan(
        chunk=min(cfg.row_chunk, max(_MIN_CHUNK, cfg.row_chunk // shards)),
        prune_chunk=min(prune, max(_MIN_CHUNK, prune // shards)),
        n_total=n_total,
        shards=shards,
        rows=-(-n_total // shards),
        words=words,
        k=k,
        # At least `degree` (k // 2 is, unless N - 1 caps k): at N = 5, degree 4, slots of 2
        # left rows of 2.2 edges on average.
        block_k=min(k, max(cfg.block_degree or k // 2, -(-k // a), degree)),
        degree=degree,
        n_clusters=nc,
        num_assign=a,
        capacity=capacity,
        blocks_per_shard=per_shard,
        groups=groups,
        sample_size=sample,
        layout=layout,
        code_order=n_total * a <= nc * capacity // 4,  # 4 or more clusters a block
        cfg=cfg,
    )


# ------------------------------------------------------------------------------- primitives


def _take_along(x, idx):
    return jnp.take_along_axis(x, idx, axis=-1)


def topk_unique(ids, dist, k: int):
    """Best k distinct ids per row, sorted by (distance, id) (BinaryGraphIndex's add and
    compact).

    ids int32 [R, M] (-1 = empty), dist int32 [R, M] -> (ids [R, k], dist [R, k]); empty slots
    come last as (-1, BIG). (Keys through bitonic.unique_smallest are 5-10x faster on XLA:CPU
    than this sort and top_k, measured on 2 cores: the build's lists.)"""
    dist = jnp.where(ids < 0, BIG, dist)
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


# _stable_ranks packs a key and an entry's place in its chunk into one uint32 so that a chunk
# sorts as a single array: XLA:CPU sorts 1M uint32s in 70 ms, 1M (key, index) pairs in 325 ms
# and 2M (key, key, index) triples in 1.1 s (2 cores). Keys of 2^24 or more leave fewer than 8
# bits for the place: chunks of 128 entries or fewer, whose loop (one step a chunk) we expect,
# not measured, to cost more than the pair sort; those take the pair sort.
_MIN_INDEX_BITS = 8


@_scoped
def _stable_ranks(keys, n_keys: int, before=None, chunk: int | None = None):
    """Each entry's rank among the entries of its key, in entry order, after before[key]
    (default 0) that come earlier: keys int32 [M] in 0..n_keys - 1, or negative or n_keys or
    more for none (rank unspecified) -> (ranks int32 [M], before + each key's count).

    What a stable sort by key and a segment rank give, computed a chunk of entries at a time
    (`chunk` a power of two; None: the most a uint32 holds beside the key): each chunk sorts
    key << b | place (its entries in place order within a key), ranks them within the chunk,
    and adds the counts of earlier chunks. Falls back to one stable pair sort when the keys
    leave fewer than _MIN_INDEX_BITS bits of a uint32 for the place."""
    if chunk is not None:
        bitonic.check_pow2("chunk", chunk)
    m = keys.shape[0]
    before = jnp.zeros((n_keys,), jnp.int32) if before is None else before
    keys = jnp.where((keys >= 0) & (keys < n_keys), keys, n_keys)  # n_keys: none
    bits = 32 - n_keys.bit_length()  # n_keys << bits | place fits a uint32
    if bits < _MIN_INDEX_BITS:
        order = jnp.arange(m, dtype=jnp.int32)
        s_keys, s_order = lax.sort((keys, order), num_keys=1, is_stable=True)
        s_ranks = _segment_rank(s_keys) + before[jnp.minimum(s_keys, n_keys - 1)]
        ranks = jnp.zeros((m,), jnp.int32).at[s_order].set(s_ranks)
        counts = jax.ops.segment_sum(jnp.ones_like(keys), keys, n_keys + 1)[:n_keys]
        return ranks, before + counts
    size = min(chunk or 1 << bits, 1 << bits, bitonic.next_pow2(m))
    bits = size.bit_length() - 1
    chunks = -(-m // size)
    place = jnp.arange(chunks * size, dtype=jnp.uint32) & jnp.uint32(size - 1)
    padded = jnp.pad(keys, (0, chunks * size - m), constant_values=n_keys)
    # None is key n_keys (after every key, and still below 2^32): each entry keeps its place.
    packed = (padded.astype(jnp.uint32) << bits) | place
    packed = lax.sort(packed.reshape(chunks, size), dimension=1)
    s_keys = (packed >> bits).astype(jnp.int32)
    s_place = (packed & jnp.uint32(size - 1)).astype(jnp.int32)
    s_ranks = jax.vmap(_segment_rank)(s_keys)  # within the chunk

    def one_chunk(c, state):
        ranks, counts = state
        k = s_keys[c]
        r = s_ranks[c] + counts[jnp.minimum(k, n_keys - 1)]
        return ranks.at[c * size + s_place[c]].set(r), counts.at[k].add(1, mode="drop")

    init = (jnp.zeros((chunks * size,), jnp.int32), before)
    ranks, counts = lax.fori_loop(0, chunks, one_chunk, init)
    return ranks[:m], counts


# ------------------------------------------------------------------------------- ring exchange


@_scoped
def _ring_take(
    table, gidx, fill, plan: _Plan, axis: str, table_axis: int = 0, home=False, reduce=None
):
    """Entries of a table sharded along `table_axis` over the mesh axis `axis` (each shard holds
    table.shape[table_axis] entries, global index = shard * size + local). gidx int32 [...]
    (< 0 or out of range: `fill`). Returns table.shape[:table_axis] + gidx.shape +
    table.shape[table_axis + 1:]. D - 1 ppermute steps; per-device memory O(table shard).

    home=True: one more step brings each shard's table back, returned as (result, table). A
    caller that threads the table from one ring to the next (bitonic.slice_update's carry)
    then keeps no copy of it beside the one on the ring (a table read by later rings is
    copied into the loop: three copies live instead of two).

    reduce: applied to the entries as each ring step takes them, so only its result is kept
    (it keeps the leading table_axis and gidx dimensions): e.g. the distances of candidate
    codes [S, r, W] -> [S, r], a W-th of the bytes held through the ring."""
    rows = jax.tree.leaves(table)[0].shape[table_axis]
    owner = jnp.where(gidx >= 0, gidx // rows, -1)
    local = jnp.clip(gidx - owner * rows, 0, rows - 1)
    reduce = reduce or (lambda x: x)  # noqa: E731
    lead = (None,) * table_axis

    def take(buf, at):  # table may be a pytree (Pairs of keys): each leaf alike
        return jax.tree.map(lambda b: jnp.take(b, at, axis=table_axis), buf)

    taken = jax.eval_shape(lambda b: reduce(take(b, local)), table)
    if jax.tree.structure(fill) != jax.tree.structure(taken):  # one fill for every leaf
        fill = jax.tree.map(lambda _: fill, taken)
    out = jax.tree.map(lambda t, f: jnp.full(t.shape, f, t.dtype), taken, fill)

    def visit(shard, buf, out):
        mine = owner == shard
        # On a mesh, entries of other shards read row 0 instead of their own row: the take
        # costs the same instructions, but only this shard's rows miss the cache (propagation
        # at 1M on 8 simulated devices: 14.3 -> 11.1 s, 2 cores).
        rows_read = local if plan.shards == 1 else jnp.where(mine, local, 0)

        def keep(new, old):
            trail = (None,) * (new.ndim - gidx.ndim - table_axis)
            return jnp.where(mine[lead + (...,) + trail], new, old)

        return jax.tree.map(keep, reduce(take(buf, rows_read)), out)

    if plan.shards == 1:
        out = visit(0, table, out)
        return (out, table) if home else out
    me = lax.axis_index(axis)
    perm = [(i, (i + 1) % plan.shards) for i in range(plan.shards)]

    def body(t, carry):
        buf, out = carry
        out = visit((me - t) % plan.shards, buf, out)
        return lax.ppermute(buf, axis, perm), out

    buf, out = lax.fori_loop(0, plan.shards - 1, body, (table, out))
    out = visit((me - (plan.shards - 1)) % plan.shards, buf, out)
    return (out, lax.ppermute(buf, axis, perm)) if home else out


@_scoped
def _exchange_take(table, gidx, fill, plan: _Plan, axis: str, table_axis: int = 0):
    """_ring_take's result (without reduce) by sending requests and answers instead of
    tables: each device sends every owner the local indices it asks of it, the owner answers
    with those entries, in all_to_all rounds of a fixed capacity until every request is
    answered (the round count is the same on every device, so results never depend on how
    requests fall). The table stays home. Bytes moved are the requests' and answers', not D
    tables': for propagation's neighbour lists [16, n] at 1M on 8 devices, ~2 MB a chunk
    against the ring's 64 MB."""
    if plan.shards == 1:
        return _ring_take(table, gidx, fill, plan, axis, table_axis)
    d, rows = plan.shards, table.shape[table_axis]
    flat = gidx.reshape(-1)
    m = flat.shape[0]
    valid = (flat >= 0) & (flat < d * rows)
    owner = jnp.where(valid, flat // rows, 0)
    local = flat - owner * rows
    rank = _rank_by_owner(owner, valid, d)  # among this device's requests of the same owner
    count = jax.ops.segment_sum(valid.astype(jnp.int32), owner, d)
    cap = max(8, -(-2 * m // d))  # twice the even share: uniform requests need one round
    rounds = lax.pmax(jnp.max(-(-count // cap)), axis)
    lead, trail = table.shape[:table_axis], table.shape[table_axis + 1 :]
    at = len(lead)  # where the request axes sit in taken entries

    def one_round(k, out):
        slot = rank - k * cap
        here = valid & (slot >= 0) & (slot < cap)
        slot = jnp.where(here, slot, cap)  # cap: not sent this round (dropped)
        ask = jnp.full((d, cap), -1, jnp.int32).at[owner, slot].set(local, mode="drop")
        asked = lax.all_to_all(ask, axis, 0, 0)  # row s: what device s asks of this one
        answer = jnp.take(table, jnp.maximum(asked, 0), axis=table_axis)  # [..., d, cap, ...]
        back = lax.all_to_all(answer, axis, at, at)  # block o: device o's answers to us
        got = back[(slice(None),) * at + (owner, jnp.minimum(slot, cap - 1))]
        return jnp.where(here[(None,) * at + (...,) + (None,) * len(trail)], got, out)

    out = jnp.full(lead + (m,) + trail, fill, table.dtype)
    out = lax.fori_loop(0, rounds, one_round, out)
    return out.reshape(lead + gidx.shape + trail)


# _rank_by_owner counts with a one-hot [M, D] cumsum up to this many shards (no sort; 2 MB for
# the pruning's 65k requests on 8 devices) and by _stable_ranks beyond, where [M, D] would
# outgrow the per-device arrays it serves.
_ONE_HOT_RANK_SHARDS = 16


def _rank_by_owner(owner, valid, shards: int):
    """Each valid request's rank among the valid requests of its owner, in request order."""
    if shards <= _ONE_HOT_RANK_SHARDS:
        hits = (owner[:, None] == jnp.arange(shards)[None, :]) & valid[:, None]
        before = jnp.cumsum(hits.astype(jnp.int32), axis=0) - 1
        return jnp.take_along_axis(before, owner[:, None], axis=1)[:, 0]
    return _stable_ranks(jnp.where(valid, owner, shards), shards)[0]


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


def _chunked(fn, arrays, max_size: int, axis: int = 0):
    """Applies fn to chunks of at most max_size along `axis` of arrays (every array has the
    same size n there), in sequence, so fn is compiled once (chunks may run ring collectives:
    a loop, never a vmap); outputs are joined along the same axis. fn must be per position
    (bitonic.slice_map: the last chunk overlaps the one before)."""
    return bitonic.slice_map(fn, arrays, max_size, axis=axis)


# ------------------------------------------------------------------------------- 1. partition


@_scoped
def majority_centroids(codes, assign, n_clusters: int, old, total=None):
    """Majority vote per bit: codes uint32 [S, W], assign int32 [S] -> uint32 [C, W]
    (ties to 0; clusters without members keep `old`; an assignment outside 0..C-1 counts for
    none). `total` sums the member and bit counts over a sharded sample (a psum); integer
    counts, so the vote is the same however the sample is split."""
    total = total or (lambda x: x)
    size = total(jax.ops.segment_sum(jnp.ones_like(assign), assign, n_clusters))

    # One word at a time, in a loop: the unpacked int32 bits of a whole 65536-point sample
    # are 64 MB, a fifth of a device's peak in an 8-device 1M build, and a Python loop over
    # the words let XLA schedule all their unpacked bits at once (XLA buffer assignment).
    def vote(word):  # [S] -> [C]
        bits = unpack_bits(word[:, None]).astype(jnp.int32)
        ones = total(jax.ops.segment_sum(bits, assign, n_clusters))
        return _pack(2 * ones > size[:, None])[:, 0]

    words = lax.map(vote, codes.T).T
    return jnp.where((size > 0)[:, None], words, old)


def _pack(bits):
    b = bits.astype(jnp.uint32).reshape(*bits.shape[:-1], -1, 32)
    return jnp.sum(b << jnp.arange(32, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


_ASSIGN_CHUNK = 4096  # points assigned at a time (nearest_centroids' lists are [groups, P])
_ASSIGN_GROUPS_PER_RANK = 16  # nearest_centroids' strided groups: this many per centroid asked


@_scoped
def nearest_centroids(points, cent, a: int):
    """The a nearest centroids of each point: points uint32 [P, W], cent uint32 [C, W] ->
    int32 [P, a], by (distance, centroid), distinct. The first is the exact nearest; the others
    are the nearest of the other strided groups of centroids (16a groups), so the next nearest
    unless it shares the first one's group (1M SIFT-like codes, 7812 centroids: the 2nd exact
    for 96.9% of points). With C <= 16a centroids every rank is exact.

    Every centroid is scored against every point, word-major in a running min a group
    (search.nearest_entries, the search's seed). Until 2026-12-07 the points walked a 16-NN
    graph of the centroids instead, from 2048 evenly spaced ones: on 1M SIFT-like codes (7812
    centroids) that missed the nearest for 2.9% of points, and mostly by far, since the
    centroids' graph falls apart like the data's ~1000 natural clusters and a point whose
    cluster held no near entry was assigned across the space. Both its clusters then held no
    near point, the propagation could not repair a list of far points, and 1.5% of the graph's
    nodes kept lists 15+ bits farther than their true nearest neighbour, with few in-edges:
    search recall@10 stopped at 0.991 at L=512 (0.999 now; L=64 / 128: 0.935 / 0.978 -> 0.944
    / 0.989). Without the centroids' graph and walk, stages 1-2 also compile in 5.0-5.4 s
    against 6.5-6.8, and a first 1M build took 30.5-36.2 s against 34.5-37.0 (the second one
    as long as before; 2 cores, 2026-12-07, alternating runs).

    Other ways, measured on 262k of those points: the walk seeded from every centroid (the
    2nd exact for 99.96%) 0.94 s against 0.51 s, and its graph searched no better; an exact
    top-2 by hamming_topk 7.5 s (its [P, C] distance tiles go to a top-k); a running top-2 a
    point (an insertion per centroid) 0.48-0.52 s per 100k points."""
    groups = 1 if a == 1 else bitonic.next_pow2(_ASSIGN_GROUPS_PER_RANK * a)
    entries = jnp.arange(cent.shape[0], dtype=jnp.int32)
    nearest = lambda p: search_lib.nearest_entries(p, cent, entries, a, groups)  # noqa: E731
    return _chunked(nearest, (points,), _ASSIGN_CHUNK)


@_scoped
def hamming_kmeans(
    sample,
    n_clusters: int,
    iterations: int,
    *,
    init=None,
    valid=None,
    sample_total: int | None = None,
    total=None,
):
    """Centroids uint32 [C, W] from sample uint32 [S, W], initialised with `init` [C, W]
    (default: evenly spaced sample rows). A sharded sample passes its shard (rows where
    `valid` is False are padding and vote for no cluster), the whole sample's size and a
    `total` that sums the counts over the shards. With fewer than 8 sample points a cluster no
    iteration runs: majority votes over 1-3 points would only copy them, so the centroids stay
    the init."""
    if init is None:
        init = sample[jnp.linspace(0, sample.shape[0] - 1, n_clusters).astype(jnp.int32)]
    if (sample_total or sample.shape[0]) < 8 * n_clusters:
        return init

    def iteration(_, cent):
        # The final assignment's exact nearest. (When the final one was a walk seeded from
        # 2048 centroids, exact assignments here alone made centroids that walk then assigned
        # worse: search recall@10 at L=64 0.935 -> 0.914, 1M, 2026-12-06.)
        assign = nearest_centroids(sample, cent, 1)[:, 0]
        if valid is not None:
            assign = jnp.where(valid, assign, n_clusters)  # out of range: counted nowhere
        return majority_centroids(sample, assign, n_clusters, cent, total)

    # A loop, not unrolled: the assignment is compiled once instead of once an iteration
    # (measured when it was a walk over the centroids' graph). The 1M build's first stage, 4
    # iterations: XLA:CPU compiled it in 5.7-6.5 s unrolled (2 cores, 2026-12-06).
    return lax.fori_loop(0, iterations, iteration, init)


@_scoped
def _kmeans(codes, plan: _Plan, axis: str):
    """Centroids from an evenly spaced sample of all N points, sharded over the devices: each
    assigns its share of the sample and the vote counts are summed with psum, so no device holds
    or scans the whole sample and every mesh gets the single-device centroids."""
    size, d = plan.sample_size, plan.shards
    sample_idx = jnp.asarray(np.linspace(0, plan.n_total - 1, size).astype(np.int32))
    init_idx = sample_idx[jnp.linspace(0, size - 1, plan.n_clusters).astype(jnp.int32)]
    init = _ring_take(codes, init_idx, 0, plan, axis)
    share = -(-size // d)
    mine = jnp.pad(sample_idx, (0, share * d - size), constant_values=-1)
    mine = lax.dynamic_slice_in_dim(mine, _shard_index(plan, axis) * share, share)
    sample = _ring_take(codes, mine, 0, plan, axis)
    total = None if d == 1 else functools.partial(lax.psum, axis_name=axis)
    return hamming_kmeans(
        sample,
        plan.n_clusters,
        plan.cfg.kmeans_iterations,
        init=init,
        valid=mine >= 0,
        sample_total=size,
        total=total,
    )


def _in_code_order(cent):
    """Centroids uint32 [C, W] sorted by their codes as one number (word 0's top bit first).

    Blocks are cut from the (cluster, point) layout, so small clusters share a block with the
    clusters next to them in number. In code order those are near ones: the order is the leaf
    order of a tree of random hyperplane splits (the bits), and leaves next to each other share
    their leading splits. A natural cluster cut into several k-means clusters then mostly lands
    in one block again: 2000 points of 20 clusters in 268 k-means clusters, true 10-NN in a
    shared block 0.82 -> 0.91 (kNN-graph recall 0.963 -> 0.984). Only where a block holds 4
    clusters or more on average (_Plan.code_order): with about 2 a block (1M points, 512
    slots) a point's two clusters, next to each other in code order, then often share a block
    and the second assignment adds nothing (search recall@10 at L=128 0.977 -> 0.971)."""
    words = [cent[:, w] for w in range(cent.shape[1])]
    *_, order = lax.sort((*words, jnp.arange(cent.shape[0], dtype=jnp.int32)), num_keys=len(words))
    return cent[order]


@_scoped
def _partition(codes, plan: _Plan, axis: str):
    """Global slot position of each (point, assignment) in the (cluster, point) layout.

    codes uint32 [n, W] (this shard) -> pos int32 [n, a] (-1 for padding rows)."""
    n, a, nc = plan.rows, plan.num_assign, plan.n_clusters
    me = _shard_index(plan, axis)
    gid = me * n + jnp.arange(n, dtype=jnp.int32)
    cent = _kmeans(codes, plan, axis)
    cent = _in_code_order(cent) if plan.code_order else cent
    cl = nearest_centroids(codes, cent, a)  # [n, a]
    valid = (gid < plan.n_total)[:, None]
    cl = jnp.where(valid, cl, nc)  # padding goes to a dummy cluster past the end
    flat_cl = cl.reshape(-1)
    # Each (point, assignment) ranked within its cluster in point order: the (cluster, point
    # id) layout. (A sort of the [n * a] (cluster, point, entry) triples took 1.1 s at 1M.)
    rank, hist = _stable_ranks(flat_cl, nc)
    if plan.shards > 1:
        all_hist = lax.all_gather(hist, axis)  # [D, nc]
        before = jnp.arange(plan.shards)[:, None] < me
        dev_off = jnp.sum(jnp.where(before, all_hist, 0), axis=0)
        total = jnp.sum(all_hist, axis=0)
    else:
        dev_off, total = jnp.zeros_like(hist), hist
    start = jnp.cumsum(total) - total
    c = jnp.minimum(flat_cl, nc - 1)
    pos = jnp.where(flat_cl < nc, start[c] + dev_off[c] + rank, -1)
    return pos.reshape(n, a)


# ------------------------------------------------------------------------------- 2. sub-graphs


@_scoped
def _scatter_blocks(codes, pos, plan: _Plan, axis: str, with_codes: bool = True, part=None):
    """This shard's blocks: (ids int32 [B, C] global point ids or -1, codes uint32 [B, C, W]);
    with_codes=False: the ids only. part=(first, count): blocks first .. first + count - 1 of
    the shard only (first may be traced), B = count."""
    n, a, c, w = plan.rows, plan.num_assign, plan.capacity, plan.words
    first, count = part or (0, plan.blocks_per_shard)
    slots = count * c
    base = _shard_index(plan, axis) * plan.blocks_per_shard * c + first * c

    def step(acc, v, codes_v, pos_v):
        ids_acc, codes_acc = acc
        local = pos_v - base
        local = jnp.where((pos_v >= 0) & (local >= 0) & (local < slots), local, slots)
        gid = v * n + jnp.arange(n, dtype=jnp.int32)
        for j in range(a):  # one assignment at a time: no [n * a, W] copy of the codes
            ids_acc = ids_acc.at[local[:, j]].set(gid, mode="drop")
            if with_codes:
                codes_acc = codes_acc.at[local[:, j]].set(codes_v, mode="drop")
        return ids_acc, codes_acc

    init = (
        jnp.full((slots,), -1, jnp.int32),
        jnp.zeros((slots if with_codes else 0, w), jnp.uint32),
    )
    ids, bcodes = _ring_scan((codes, pos), step, init, plan, axis)
    if not with_codes:
        return ids.reshape(-1, c)
    return ids.reshape(-1, c), bcodes.reshape(-1, c, w)


def _block_tiles(ids, codes_t):
    """A block's slots as column tiles of bitonic.TILE: ids [count, tile] (-1 pads), word-major
    codes [count, W, tile] (codes_t: the block's [W, C])."""
    c = ids.shape[0]
    tile = min(bitonic.TILE, c)
    count = -(-c // tile)
    pad = count * tile - c
    col_ids = jnp.pad(ids, (0, pad), constant_values=-1).reshape(count, tile)
    col_codes = jnp.pad(codes_t, ((0, 0), (0, pad))).reshape(-1, count, tile)
    return col_ids, jnp.moveaxis(col_codes, 1, 0)


def _tile_distances(ids, codes_t, tile_ids, tile_codes_t, candidate):
    """Distances int32 [C, tile] from every slot of a block (rows; codes_t [W, C]) to a tile's
    slots (columns; [W, tile]), and bool [C, tile]: not a neighbour (a row that is not a
    `candidate` (_candidate_slots), or the column's own point). Word-major, so each word's popcounts are one elementwise [C, tile]
    op (see hamming_pairs_word_major): at 1M (2 cores, 2026-12-06) the in-block kNN took 2.98
    s of ops against 3.67 with the words minor (one profile each), stages 1-2 9.2-9.6 s
    against 10.0-12.3 (4 alternating fresh processes), the same graph. (The propagation's
    candidate distances, word-major the same way, looked slower: the stage 9.6-14.3 s against
    7.2-8.1 in a noisy pair of runs; not kept.)"""
    d = hamming_pairs_word_major(codes_t[:, :, None], tile_codes_t[:, None, :])
    # Same point, not just the diagonal: both of a point's clusters can land in one block.
    return d, ~candidate[:, None] | (ids[:, None] == tile_ids[None, :])


def _candidate_slots(ids, rank):
    """bool [C]: the slots of a block that are candidates, each point's first one (rank: its
    id's position among the block's sorted ids, shared by a point's slots). When both of a
    point's clusters land in one block it fills two slots, and as two candidates it took two
    of every list's block_k places: at 2000 points (degree 16), 36% of the graph's rows were
    short of `degree` and kNN recall@10 0.937 against 0.994; at 31 random codes, degree 2,
    half the rows held one edge."""
    slot = jnp.arange(ids.shape[0], dtype=jnp.int32)
    first = jnp.full(ids.shape, ids.shape[0], jnp.int32).at[rank].min(slot)
    return (ids >= 0) & (first[rank] == slot)


def _block_rows(tiles, c: int, k: int):
    """The tiles' lists [count, tile, k] (or Pairs) -> one row per slot, [C, k]."""
    return jax.tree.map(lambda w: w.reshape(-1, k)[:c], tiles)


@_scoped
def _block_knn_keys(ids, codes, k: int, layout: KeyLayout | PairLayout):
    """Exact kNN inside one block: ids int32 [C] (-1: empty slot), codes [C, W] -> keys [C, k]
    (or Pairs of them), row i slot i's list, sorted. Computed per tile of
    bitonic.TILE points with the networks along axis 0 of [C, tile] (so the distance tile and
    the network stay in cache; whole [C, C] blocks cost a transpose pass into tiles, 0.7 s of
    100k, measured); each tile's [k, tile] result is transposed in cache, so the block table is
    one row per slot and the per-point gather reads whole rows."""
    width = bitonic.next_pow2(k)
    codes_t = codes.T
    candidate = _candidate_slots(ids, jnp.searchsorted(jnp.sort(ids), ids, side="left"))

    def one_tile(cols):
        d, bad = _tile_distances(ids, codes_t, *cols, candidate)
        keys = layout.pack(jnp.where(bad, -1, d), jnp.broadcast_to(ids[:, None], d.shape))
        return bitonic.smallest(keys, width)[:k].T

    return _block_rows(lax.map(one_tile, _block_tiles(ids, codes_t)), ids.shape[0], k)


_NARROW_KEY = np.uint16(0xFFFF)  # the empty uint16 key
_NARROW_MIN_LEVEL_BITS = 6  # bands of 63 distances at least; narrower ones would loop too often


def narrow_rank_bits(capacity: int) -> int | None:
    """The bits of an in-block rank in _block_knn_keys_narrow's uint16 keys (the other bits
    hold the distance level), or None where a block is too large to leave enough levels."""
    bits = max(1, (capacity - 1).bit_length())
    return bits if 16 - bits >= _NARROW_MIN_LEVEL_BITS else None


@_scoped
def _block_knn_keys_narrow(ids, codes, k: int, layout: KeyLayout | PairLayout, rank_bits: int):
    """_block_knn_keys with the selection on uint16 keys: the same keys [C, k].

    The selection (the k smallest of C keys a point, ~11 compare-exchanges a candidate at
    C = 512, k = 32) is most of the in-block kNN, and the networks move twice the keys a vector
    at 16 bits: 26.6 and 21.3 ms against 43.0 and 42.6 ms for 64 tiles of [512, 256] (2 cores,
    2026-12-06). A uint16 key is (level, rank): the level is the distance above the point's
    band base, the rank the candidate's position among the block's sorted ids (equal ids, one
    point in two slots, share it). So the keys order the candidates as (distance, id) does, and
    each decodes to that uint32 key through the base and the sorted ids.

    A band holds 2**(16 - rank_bits) - 1 distances; the first starts at the point's nearest.
    A point whose k-th neighbour lies beyond its first band (never, in the 1M benchmark's data)
    selects again in the next band, the same network in a loop, and the bands' lists are
    merged: their distances do not overlap. (A uint32 network for those points instead was
    1.4 s more compilation at 1M for a path that did not run.)

    The same graph; at 1M on one device (2 cores, 2026-12-06, ITQ codes) stages 1-2 ran in
    9.71 s against 11.75 (medians of 3, alternating in one process), and whole first builds
    (compilation included) in 39.2 and 37.8 s against 41.4 and 40.6 (fresh processes)."""
    span = (1 << (16 - rank_bits)) - 1  # levels a band keys; the all-ones key is empty
    sorted_ids = jnp.sort(ids)
    rank = jnp.searchsorted(sorted_ids, ids, side="left")
    candidate = _candidate_slots(ids, rank)
    rank = rank.astype(jnp.uint16)
    rank_mask = rank.dtype.type((1 << rank_bits) - 1)
    width = bitonic.next_pow2(k)
    codes_t = codes.T

    def one_tile(cols):
        d, bad = _tile_distances(ids, codes_t, *cols, candidate)
        d = jnp.where(bad, bitonic.BIG, d)
        nearest = jnp.min(d, axis=0)  # [tile]
        farthest = jnp.max(jnp.where(bad, -1, d), axis=0)

        def band(state):  # the next band's sorted list, merged after the lists so far
            start, lists = state  # [tile], [width, tile]
            level = d - start
            inside = (level >= 0) & (level < span)  # bad: d = BIG, never inside
            key = (level.astype(jnp.uint16) << rank_bits) | rank[:, None]
            best = bitonic.smallest(jnp.where(inside, key, _NARROW_KEY), width)
            empty = best == _NARROW_KEY
            node = sorted_ids[(best & rank_mask).astype(jnp.int32)]
            dist = start[None, :] + (best >> rank_bits).astype(jnp.int32)
            found = layout.pack(jnp.where(empty, -1, dist), jnp.where(empty, -1, node))
            return start + span, bitonic.merge_smallest(lists, found)

        def short(state):  # a point with fewer than k neighbours and more beyond its bands
            start, lists = state
            return jnp.any(bitonic.is_empty(lists[k - 1]) & (farthest >= start))

        lists = layout.empty((width, d.shape[1]))
        _, lists = lax.while_loop(short, band, (nearest, lists))
        return jax.tree.map(lambda w: w[:k].T, lists)

    return _block_rows(lax.map(one_tile, _block_tiles(ids, codes_t)), ids.shape[0], k)


def _blocks_knn_keys(blocks, plan: _Plan):
    """The in-block kNN of every block of `blocks` (ids [B, C], codes [B, C, W]) -> keys
    [B, C, block_k], `block_batch` blocks a step: on uint16 keys where the block size leaves
    them levels enough (narrow_rank_bits), else uint32."""
    batch = min(plan.cfg.block_batch, blocks[0].shape[0])
    rank_bits = narrow_rank_bits(plan.capacity) if plan.cfg.narrow_block_keys else None
    if rank_bits is None:
        knn = functools.partial(_block_knn_keys, k=plan.block_k, layout=plan.layout)
    else:
        knn = functools.partial(
            _block_knn_keys_narrow, k=plan.block_k, layout=plan.layout, rank_bits=rank_bits
        )
    return lax.map(lambda x: knn(*x), blocks, batch_size=batch)


def _after(x, value):
    """The scalar `value` (typed: its dtype is the result's) computed from x, so that an array
    filled with it is allocated only once x exists: with a constant fill XLA schedules the
    broadcast first, and stage 2's rows buffer [64, n] (32 MB a device at 1M on 8 devices)
    sat beside the k-means and codes rings at the stage's peak (XLA live ranges). x is never
    -2 or less (ids, slots and groups are >= -1), but XLA cannot know it."""
    value = jnp.asarray(value)
    return jnp.where(x.reshape(-1)[0] >= -1, value, value - 1)


def _group_slots(pos, plan: _Plan):
    """For each (point, assignment) of pos int32 [n, a] (global slots, -1: none): the group
    of blocks holding its slot (-1: none) and the slot's index in the ring of that group's
    tables (shard-major, as _ring_take indexes), both [n, a]."""
    per_group = plan.blocks_per_shard // plan.groups * plan.capacity  # slots a group a shard
    slots = plan.blocks_per_shard * plan.capacity
    valid = pos >= 0
    owner = jnp.where(valid, pos // slots, 0)
    local = pos - owner * slots
    return jnp.where(valid, local // per_group, -1), owner * per_group + local % per_group


def _initial_knn_keys(codes, plan: _Plan, axis: str):
    """Stages 1-2: this shard's lists as keys uint32 [K, n] (or Pairs), sorted per column."""
    return _merge_blocks_by_group(codes, _partition(codes, plan, axis), plan, axis)


@_scoped
def _merge_blocks_by_group(codes, pos, plan: _Plan, axis: str):
    """Stage 2: the blocks' kNN rows, gathered over the ring into each point's columns,
    then merged in place into its list.

    A block's slots hold points of any shard. Every shard's blocks are cut into `plan.groups`
    groups; each group's rows (a table of 1/groups of the shard's slots) are made, passed
    around the ring, and each point takes its own rows from it into a buffer rows
    [num_assign * block_k, n]: assignment j's row in rows j * block_k onwards. So the whole
    block table never exists (31 MB a device at 1M on 8 devices, as large as the lists), only
    one group's. Once every group is in, each column is merged into its K smallest distinct
    keys where it lies, and the buffer's first K rows are the lists (num_assign * block_k = K
    by default, so the buffer is the lists' own). Every access to the buffer is a slice of
    whole columns (see _TABLE_GROUPS for what gathering single columns cost)."""
    a, bk = plan.num_assign, plan.block_k
    group_blocks = plan.blocks_per_shard // plan.groups
    per_group = group_blocks * plan.capacity  # slots of one group on one shard
    group, index = (x.T for x in _group_slots(pos, plan))  # [a, n]

    def take(rows_c, group_c, index_c, table, g):  # [a * bk, r], [a, r], [a, r]
        asked = jnp.where(group_c == g, index_c, -1)
        got, table = _ring_take(table, asked, 0, plan, axis, home=True)  # [a, r, bk]
        # The barrier keeps XLA:CPU from fusing the row gather into the transpose (that
        # fusion ran as one scalar loop, 2.4 s of a 100k build, measured).
        got = lax.optimization_barrier(got)
        got = jax.tree.map(lambda w: jnp.swapaxes(w, 1, 2).reshape(rows_c.shape), got)
        # A row is filled by exactly one group: the rows this group has are selected in by
        # their requests. (A minimum of Pairs reads both words of both to write each, so XLA
        # copied the rows' two words at every step: 8 MB a device at 131k on 8 devices.)
        mine = jnp.broadcast_to((asked >= 0)[:, None, :], (a, bk, asked.shape[1]))
        return bitonic.where(mine.reshape(rows_c.shape), got, rows_c), table

    def one_group(g, rows):
        # The group's blocks with their codes (gathered over the ring per group: the codes of
        # all the shard's slots were 8 MB a device at 1M on 8 devices).
        blocks = _scatter_blocks(codes, pos, plan, axis, part=(g * group_blocks, group_blocks))
        table = _blocks_knn_keys(blocks, plan)
        table = jax.tree.map(lambda w: w.reshape(per_group, bk), table)
        # The table goes round the ring and home again in every chunk, threaded from chunk
        # to chunk, so no copy of it stays behind.
        step = functools.partial(take, g=g)
        return bitonic.slice_update(step, rows, (group, index), plan.cfg.row_chunk, carry=table)[0]

    fills = _after(group, bitonic.SENTINEL), _after(index, jnp.uint32(0))  # see _after
    rows = plan.layout.empty((a * bk, plan.rows), *fills)
    rows = lax.fori_loop(0, plan.groups, one_group, rows)

    @_scoped
    def merge(rows_c):  # [a * bk, r] -> its K smallest distinct keys, then SENTINEL rows
        return bitonic.pad_rows(bitonic.unique_smallest(rows_c, plan.k), a * bk)

    return bitonic.slice_update(merge, rows, (), plan.cfg.row_chunk)[: plan.k]


# ------------------------------------------------------------------------------- 3. propagation


@_scoped
def _propagate_keys_chunk(keys_c, codes_c, gid_c, rev_c, lists, codes, plan: _Plan, axis: str):
    """Propagation of one chunk of columns: keys_c [K, r] (or Pairs), codes_c uint32 [r, W],
    gid_c [r], reverse neighbours rev_c int32 [R, r] (R may be 0); lists int32 [S2, n] (every
    point's first S2 neighbours) and codes [n, W] are the shard's tables -> merged keys [K, r]."""
    layout = plan.layout
    s1 = min(plan.cfg.sample_neighbors, plan.k)
    # The candidates: the first S2 neighbours of each of the first S1 neighbours and of the
    # reverse neighbours (NN-descent's "neighbours of reverse neighbours"), and the reverse
    # neighbours themselves.
    parents = jnp.concatenate([layout.ids(keys_c[:s1]), rev_c], axis=0)
    # Requests and answers, not the lists' ring: a chunk asks for r * S1 of the n * D rows.
    nn = _exchange_take(lists, parents, -1, plan, axis, table_axis=1)
    nn = jnp.concatenate([nn.reshape(-1, keys_c.shape[1]), rev_c], axis=0)  # [S, r]
    cd = _candidate_distances(codes, nn, codes_c, plan, axis)  # [S, r]
    kth = layout.dist(keys_c[-1:])
    # The paper's filter: only candidates that could enter the list reach the merge. A known
    # neighbour packs to the same key as its list entry, so the dedup drops it.
    drop = (nn < 0) | (nn == gid_c[None, :]) | (cd > kth)
    cand_keys = layout.pack(cd, jnp.where(drop, -1, nn))
    # keys_c is sorted (every list stays sorted): only the candidates are sorted, then merged
    # into it. 1M, one device, the propagation stage in one process, interleaved medians of 5
    # (2 cores, 2026-12-06): 6.43 s against 7.21 s for a sort of both, the same lists.
    return bitonic.unique_smallest((keys_c, cand_keys), plan.k, sorted_first=True)


# Requests per exchange of candidate codes on a mesh: its answer buffers [2 * requests, W]
# words are 2 MiB for 256-bit codes, against the 8 MiB of one chunk's candidates at once.
_CODE_REQUESTS = 32768


@_scoped
def _candidate_distances(codes, nn, codes_c, plan: _Plan, axis: str):
    """Hamming distances int32 [S, r] from the chunk's codes codes_c uint32 [r, W] to their
    candidates nn int32 [S, r] (global ids, < 0: BIG), codes [n, W] the shard's table.

    Candidate codes are gathered as rows (one cache line each; word-major rows would cost W
    misses a candidate) and reduced to distances at once. On a mesh they are asked of their
    owners (_exchange_take) a few candidate rows at a time, so the bytes a device moves are
    its requests' and their answers', O(N / D) a round. The codes' ring moved every shard's
    table past every chunk, O(N) a chunk whatever D (1.7 GB a device a round at 1M on 8
    devices), and computed the distances of all S x r candidates at every step."""
    distance = lambda cand: hamming_pairs(cand, codes_c[None, :, :])  # noqa: E731
    if plan.shards == 1:
        return _ring_take(codes, nn, BIG, plan, axis, reduce=distance)

    def part_distances(nn_p):  # [step, r] -> [step, r]
        cand = _exchange_take(codes, nn_p, 0, plan, axis)  # [step, r, W]
        return jnp.where(nn_p >= 0, distance(cand), BIG)

    return _chunked(part_distances, (nn,), max(1, _CODE_REQUESTS // nn.shape[1]))


@_scoped
def _propagate_keys(codes, keys, plan: _Plan, axis: str):
    """Propagation rounds on the lists keys uint32 [K, n] or Pairs (column p: p's list,
    sorted).
    Candidates are gathered per chunk of columns, so no [S, n] array is ever live."""
    s2 = min(plan.cfg.sample_width, plan.k)
    n_rev = min(plan.cfg.reverse_samples, plan.k)
    gid = _shard_index(plan, axis) * plan.rows + jnp.arange(plan.rows, dtype=jnp.int32)

    def one_round(_, keys):  # a loop, not unrolled: the round is compiled once
        ids = plan.layout.ids(keys)
        if n_rev:  # who lists me among their first n_rev neighbours
            rev = _reverse_edges(ids[:n_rev], plan, axis, n_rev)  # [R, n]
        else:
            rev = jnp.zeros((0, plan.rows), jnp.int32)
        # In place (the round reads its neighbours' lists from the ids[:s2] snapshot): the
        # new lists beside the old were 244 MB of a 1M round's 655 MB peak (XLA buffers), and
        # with the block table gone they were the build's peak. No slower (1M, 2 cores). The
        # snapshot stays home: chunks ask it for rows (_exchange_take).
        step = functools.partial(
            _propagate_keys_chunk, lists=ids[:s2], codes=codes, plan=plan, axis=axis
        )
        return bitonic.slice_update(step, keys, (codes, gid, rev), plan.chunk, other_axes=(0, 0, 1))

    return lax.fori_loop(0, plan.cfg.rounds, one_round, keys)


@_scoped
def _prune_keys_chunk(keys_c, codes, plan: _Plan, axis: str):
    """rng pruning of lists keys_c [K, r] -> edges uint32 [K, r] in the lists' place (of
    Pairs: in their lo words):
    kept edges first, then the pruned ones, each in rank order, packed as id << 1 | kept
    (SENTINEL: none), so the pruning writes over the lists instead of beside them; codes
    uint32 [n, W] is the shard's codes."""
    layout = plan.layout
    ids = layout.ids(keys_c)
    # Whole rows of W words gathered, then word-major for the pair distances (XLA keeps the
    # rows' layout, so the move costs no copy). Gathered word by word from word-major codes
    # [W, n], XLA ran one scalar loop over [W, K, r] in the rows' layout: at 1M on one
    # device (2 cores, 2026-12-06, profile) 1.9 s of stages 4-5 against 0.4-0.6 s so; on 8
    # simulated devices at 200k the same time either way.
    nb = jnp.moveaxis(_exchange_take(codes, ids, 0, plan, axis), -1, 0)  # [W, K, r]
    # (stages 4-5 at 1M on 8 simulated devices, 2 cores: 11.3 s with the ring, 9.1 s so)
    valid = ids >= 0
    ids, kept = _kept_first(ids, _rng_prune_codes_t(layout.dist(keys_c), nb, valid), valid)
    # Pairs keep their hi words (the distances, no longer read): the edges take the lo words.
    return bitonic.with_low_word(keys_c, _pack_edges(ids, kept))


def _pack_edges(ids, kept):
    """ids int32 (-1: none), kept bool -> uint32 id << 1 | kept (SENTINEL where no id)."""
    packed = (ids.astype(jnp.uint32) << 1) | kept.astype(jnp.uint32)
    return jnp.where(ids >= 0, packed, bitonic.SENTINEL)


def _edge_ids(edges):
    return jnp.where(edges == bitonic.SENTINEL, -1, (edges >> 1).astype(jnp.int32))


def _edge_kept(edges):
    return (edges != bitonic.SENTINEL) & ((edges & 1) == 1)


# ------------------------------------------------------------------------------- 4-5. pruning


def _rng_prune_t(d_pn, d_nn, valid):
    """rng_prune in [K, r] layout: d_pn [K, r], d_nn [K, K, r], valid [K, r] -> kept [K, r].
    Step j reads the contiguous slab d_nn[j] (the row layout read a strided column and ran
    about 10x slower on XLA:CPU, measured)."""
    k = d_pn.shape[0]

    def body(j, kept):
        return _prune_step(kept, j, d_nn[j], d_pn, valid)

    return lax.fori_loop(0, k, body, jnp.zeros_like(valid))


def _prune_step(kept, j, d_j, d_pn, valid):
    """Step j of the pruning: kept [K, r] with row j set, given d_j [<= K, r] the distances
    from neighbour j to the first rows (only kept ones, all before j, count)."""
    rows = d_j.shape[0]
    occluded = jnp.any(kept[:rows] & (d_j < d_pn[j][None, :]), axis=0)
    return kept.at[j].set(valid[j] & ~occluded)


_PRUNE_SEGMENT = 32  # pruning steps whose pair distances are computed together


def _rng_prune_codes_t(d_pn, nb, valid):
    """_rng_prune_t from the neighbours' codes nb uint32 [W, K, r] (word-major) instead of
    their pair distances. Step j reads d(i, j) for i < j only (no later one is kept yet), so
    the steps run in segments of _PRUNE_SEGMENT, each with the distances from its rows to the
    rows before its end: [32, <= K, r], int16 where every distance fits. At K = 64, 3/4 of
    the popcounts of the whole [K, K, r] in slabs half its size: a chunk (r = 4096) took
    11 ms against 17-34 ms, and the 1M build's last stage ran 12.6-13.3 s against 14.9-16.4
    (2 cores, 2026-12-06; segments of 8 ran a chunk in 9-10 ms, but the stage compiled in 3.5
    s against 2.2, one measurement). The same kept flags."""
    words, k, _ = nb.shape
    small = words * 32 <= jnp.iinfo(jnp.int16).max
    kept = jnp.zeros_like(valid)
    for start in range(0, k, _PRUNE_SEGMENT):
        end = min(start + _PRUNE_SEGMENT, k)
        d_seg = hamming_pairs_word_major(nb[:, start:end, None], nb[:, None, :end])
        d_seg = d_seg.astype(jnp.int16) if small else d_seg  # [end - start, end, r]

        def body(j, kept, d_seg=d_seg, start=start):
            return _prune_step(kept, j, d_seg[j - start], d_pn, valid)

        kept = lax.fori_loop(start, end, body, kept)
    return kept


def rng_prune(d_pn, d_nn, valid):
    """Relative-neighbourhood pruning in rank order.

    d_pn int32 [r, K] (p to its neighbours, ascending), d_nn int32 [r, K, K] (between
    neighbours, symmetric), valid bool [r, K] -> kept bool [r, K]: j is kept unless a kept
    i < j has d_nn[i, j] < d_pn[j]."""
    return _rng_prune_t(d_pn.T, jnp.transpose(d_nn, (2, 1, 0)), valid.T).T


def _kept_first(ids, kept, valid):
    """ids int32 [K, r] in rank order -> (ids with kept edges first, then the pruned ones, each
    in rank order; kept [K, r] reordered alike): a sort of the (distinct) priorities."""
    k = ids.shape[0]
    rank = jnp.arange(k, dtype=jnp.int32)[:, None]
    prio = jnp.where(kept, rank, jnp.where(valid, k + rank, 2 * k + rank)).astype(jnp.uint32)
    order = bitonic.sort(bitonic.pad_rows(prio, bitonic.next_pow2(k)))[:k]
    return jnp.take_along_axis(ids, (order % k).astype(jnp.int32), axis=0), order < k


def _reverse_edges_one_device(row, ranks: int, n: int, width: int, chunk: int | None = None):
    """_reverse_edges on one device: the same in-edges [width, n], sources ordered by (rank,
    source id), each rank's edges ranked among their target's by _stable_ranks (packed
    single-array sorts; `chunk` is its). 1M points, 16 ranks, 2 cores: 2.4 s against the pair
    sorts' 5.2 s, the same in-edges."""
    sources = jnp.arange(n, dtype=jnp.int32)

    def one_rank(r, state):
        rev, filled = state
        targets = row(r)
        slot, filled = _stable_ranks(targets, n, filled, chunk)
        col = jnp.where((targets >= 0) & (slot < width), targets, n)  # n: dropped
        return rev.at[slot, col].set(sources, mode="drop"), filled

    # The fill read from the edges, as in _reverse_edges: allocated once they exist.
    fill = jnp.minimum(row(0)[0], -1)
    init = (jnp.full((width, n), fill, jnp.int32), jnp.zeros((n,), jnp.int32))
    return lax.fori_loop(0, ranks, one_rank, init)[0]


@_scoped
def _reverse_edges(fwd_t, plan: _Plan, axis: str, width: int, ranks=None, targets=None):
    """In-edges, column layout: fwd_t int32 [E, n] (row j: every node's j-th edge, a global
    target or -1) -> sources int32 [width, n] (column t: t's first `width` sources ordered by
    (rank of the edge in its source's list, source id), -1 padded). Only the first `ranks`
    rows count (None: all); `targets` maps a row of fwd_t to its targets (None: as it is), so
    a caller passes its own array instead of a decoded copy of its first rows.

    One rank at a time: the rank's n edges are sorted by target (stably, so sources stay in id
    order) and each lands at its slot among its target's sources, written in place. One device
    ranks a rank's edges by _stable_ranks instead (_reverse_edges_one_device). A sort of
    all E * n edges at once held 16M entries at 1M points and its scratch was half the peak of
    the build's last stage (VmHWM); a rank's sort is n entries.

    On a mesh each shard sorts its own edges of the rank once, and they pass every shard on
    the ring in rotated order, so a first ring counts each shard's edges into each of this
    shard's nodes ([D, n]), and the second places shard v's sources after those of the shards
    before v: the slots of the single device, with nothing beside the result but the counts
    (merging each visit into running [width, n] lists took four such arrays, 61 MB a device
    at 1M on 8 devices, XLA buffer assignment)."""
    e, n = fwd_t.shape
    e = e if ranks is None else ranks
    row = (lambda r: fwd_t[r]) if targets is None else (lambda r: targets(fwd_t[r]))  # noqa: E731
    if plan.shards == 1:
        return _reverse_edges_one_device(row, e, n, width)
    base = _shard_index(plan, axis) * n

    def local_targets(targets):
        """Column of each edge's target on this shard, or n where it is elsewhere or none."""
        local = targets - base
        return jnp.where((targets >= 0) & (local >= 0) & (local < n), local, n)

    count_dtype = jnp.int8 if 2 * width <= jnp.iinfo(jnp.int8).max else jnp.int16

    def count(hist, v, targets):
        got = jax.ops.segment_sum(jnp.ones_like(targets), local_targets(targets), n + 1)[:n]
        # Capped at width (past it nothing is placed), so int8 or int16: a quarter or half
        # the bytes ([D, n] int16 was 2 MB of stage 5's 24 MB temp at 1M on 8 devices).
        return hist.at[v].set(jnp.minimum(got, width).astype(count_dtype))

    def capped_sum(x, y):  # associative on counts >= 0; x + y <= 2 * width never overflows
        return jnp.minimum(x + y, width)

    def one_rank(r, state):
        rev, filled = state
        # The shard's own edges of the rank, sorted by target once (a target's sources in id
        # order; none last), before they travel: each shard they visit finds its targets'
        # sources in runs, and sorted it nothing. A sort at every visit was D sorts of n
        # edges a rank on every device, as much as one device's whole build sorts.
        edge_targets = row(r)
        order = jnp.where(edge_targets >= 0, edge_targets, jnp.iinfo(jnp.int32).max)
        edge_sources = base + jnp.arange(n, dtype=jnp.int32)
        edges = lax.sort((order, edge_sources), num_keys=1, is_stable=True)
        hist = _ring_scan(edges[:1], count, jnp.zeros((plan.shards, n), count_dtype), plan, axis)
        # upto[v]: sources of shards 0..v per node (capped), so shard v's go after upto[v - 1].
        # Summed row by row in the counts' buffer, not by associative_scan, whose padded
        # halves and result sat beside the counts (stage 5's XLA temp at 1M on 8 devices:
        # 24.5 -> 24.0 MB).
        upto = lax.fori_loop(
            1, plan.shards, lambda v, h: h.at[v].set(capped_sum(h[v - 1], h[v])), hist
        )

        def place(rev, v, edge_targets, edge_sources):
            key = local_targets(edge_targets)  # this shard's targets: runs, ascending
            col = jnp.minimum(key, n - 1)
            before = jnp.where(v > 0, upto[jnp.maximum(v - 1, 0), col], 0)
            slot = _segment_rank(key) + filled[col] + before
            col = jnp.where((key < n) & (slot < width), key, n)  # out of range: dropped
            return rev.at[slot, col].set(edge_sources, mode="drop")

        rev = _ring_scan(edges, place, rev, plan, axis)
        return rev, filled + upto[-1]

    # The fill value is read from fwd_t (targets are >= -1, so it is always -1) so that the
    # [width, n] lists are allocated only once fwd_t exists: as a constant broadcast XLA
    # scheduled them first, beside the pruning that makes fwd_t (finalize's XLA temp at 1M:
    # 231 MB, 122 + 105 of the two phases; an optimization_barrier was folded away).
    fill = jnp.minimum(row(0)[0], -1)
    init = (jnp.full((width, n), fill, jnp.int32), jnp.zeros((n,), jnp.int32))
    return lax.fori_loop(0, e, one_rank, init)[0]


def merge_forward_reverse(fwd, rev, degree: int, id_bits: int | None = None):
    """Row = fwd[:degree//2], then rev, then the rest of fwd; duplicates and -1 removed, cut to
    degree. fwd int32 [n, K], rev int32 [n, R] -> int32 [n, degree].

    With id_bits (ids < 2**id_bits and id_bits + ceil(log2(K + R)) <= 32) the rows run through
    bitonic networks on (id, position) keys instead of lax.sort and top_k (4x faster on
    XLA:CPU, measured)."""
    m = fwd.shape[1] + rev.shape[1]
    if id_bits is not None and id_bits + max(1, (m - 1).bit_length()) <= 32:
        return _merge_forward_reverse_t(fwd.T, rev.T, degree, id_bits).T
    h = degree // 2
    cat = jnp.concatenate([fwd[:, :h], rev, fwd[:, h:]], axis=1)
    prio = jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), cat.shape)
    ids, prio = lax.sort((cat, prio), dimension=-1, num_keys=2)
    dup = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] == ids[:, :-1]], axis=1)
    prio = jnp.where(dup | (ids < 0), BIG, prio)
    _, pos = lax.top_k(-prio.astype(jnp.float32), degree)
    out = _take_along(ids, pos)
    return jnp.where(_take_along(prio, pos) >= BIG, -1, out)


@_scoped
def _merge_forward_reverse_t(fwd_t, rev_t, degree: int, id_bits: int):
    """merge_forward_reverse in column layout on bitonic networks: fwd_t [K, r], rev_t [R, r]
    -> [degree, r]."""
    h = degree // 2
    ids = jnp.concatenate([fwd_t[:h], rev_t, fwd_t[h:]], axis=0)
    m = ids.shape[0]
    pos_bits = max(1, (m - 1).bit_length())
    pos = jnp.arange(m, dtype=jnp.uint32)[:, None]
    # Sorted by (id, position), a repeated id follows its first occurrence: drop it.
    by_id = jnp.where(ids >= 0, (ids.astype(jnp.uint32) << pos_bits) | pos, bitonic.SENTINEL)
    by_id = bitonic.by_tiles(
        lambda t: bitonic.sort(bitonic.pad_rows(t, bitonic.next_pow2(m))), by_id
    )
    first = jnp.concatenate(
        [jnp.ones_like(by_id[:1], bool), (by_id[1:] >> pos_bits) != (by_id[:-1] >> pos_bits)]
    )
    keep = first & (by_id != bitonic.SENTINEL)
    # Back to position order: (position, id) keys of the kept entries, the first `degree`.
    by_pos = jnp.where(
        keep,
        ((by_id & ((1 << pos_bits) - 1)) << id_bits) | (by_id >> pos_bits),
        bitonic.SENTINEL,
    )
    out = bitonic.smallest(by_pos, bitonic.next_pow2(degree))[:degree]
    return jnp.where(out == bitonic.SENTINEL, -1, (out & ((1 << id_bits) - 1)).astype(jnp.int32))


@_scoped
def _finalize_keys(keys, codes, plan: _Plan, axis: str):
    """Stages 4-5 on the lists keys [K, n] (donated) -> uint32 [K, n] whose first `degree`
    rows are the graph, column p node p's edges (-1 as SENTINEL); from Pairs, Pairs whose lo
    words are that (their hi words stay in the output, so both donated buffers serve it).
    Everything is updated in the lists' buffer: the pruning writes the packed edges over the
    lists, the merge writes each node's row over its edges; beside it live only the in-edges
    [degree, n] and chunk buffers (as separate arrays the edges, kept flags and rows were
    0.4 GB of a 1M build)."""
    layout = plan.layout
    if plan.cfg.prune:
        step = functools.partial(_prune_keys_chunk, codes=codes, plan=plan, axis=axis)
        # Smaller chunks than propagation's: the pair distances are [K, K, r]. The codes
        # stay home: chunks ask them for rows (_exchange_take).
        keys = bitonic.slice_update(step, keys, (), plan.prune_chunk)
        edges = bitonic.low_word(keys)
    else:
        ids = layout.ids(keys)
        edges = _pack_edges(ids, ids >= 0)
    if not plan.cfg.reverse:
        return bitonic.with_low_word(keys, jnp.where(edges == bitonic.SENTINEL, edges, edges >> 1))
    sources = min(plan.degree, plan.cfg.reverse_sources or plan.degree)
    # Each rank's kept edges decoded as the loop reaches it: a decoded [sources, n] copy was
    # 61 MB of this stage's peak at 1M (XLA buffer assignment).
    kept_ids = lambda row: jnp.where(_edge_kept(row), _edge_ids(row), -1)  # noqa: E731
    rev_t = _reverse_edges(edges, plan, axis, plan.degree, ranks=sources, targets=kept_ids)
    id_bits = max(1, (plan.rows * plan.shards - 1).bit_length())

    def merge(edges_c, rev_c):
        # The transposes cancel inside where merge_forward_reverse runs its networks (ids
        # below 2^25); beyond, its lax.sort fallback works on rows and they are copies.
        row = merge_forward_reverse(_edge_ids(edges_c).T, rev_c.T, plan.degree, id_bits)
        return edges_c.at[: plan.degree].set(row.T.astype(jnp.uint32))  # -1 -> SENTINEL

    return bitonic.with_low_word(keys, bitonic.slice_update(merge, edges, (rev_t,), plan.chunk))


# ------------------------------------------------------------------------------- entry points

# The build runs as three compiled programs with only the lists passed between them (and
# donated to the next). XLA gives one program a single temporary slab sized for its worst
# moment; as one program the 1M build packed stage 2's block table and stage 4's pruning
# buffers into a 1.9 GB slab (its buffer assignment), apart each stage sizes its own.
STAGES = ("initial", "propagate", "finalize")


def _initial_stage(codes, plan: _Plan, axis: str):
    """Stages 1-2: the lists, keys uint32 [K, n] (or Pairs of them)."""
    return _initial_knn_keys(codes, plan, axis)


def _propagate_stage(codes, lists, plan: _Plan, axis: str):
    """Stage 3: lists -> refined lists, same layout."""
    return _propagate_keys(codes, lists, plan, axis)


def _finalize_stage(codes, lists, plan: _Plan, axis: str):
    """Stages 4-5: lists -> the search graph uint32 [K, n] (from Pairs: their lo words), in
    the lists' buffers (see _finalize_keys)."""
    return _finalize_keys(lists, codes, plan, axis)


def _arg_shapes(plan: _Plan, mesh, axis: str):
    """Abstract (codes, lists) of a build on this mesh, for compiling before the data exist."""
    total = plan.rows * plan.shards

    def spec(shape, dtype, *names):
        sharding = jax.sharding.NamedSharding(mesh, P(*names))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    codes = spec((total, plan.words), np.uint32, axis)
    keys = spec((plan.k, total), np.uint32, None, axis)
    return codes, bitonic.Pairs(keys, keys) if isinstance(plan.layout, PairLayout) else keys


@functools.lru_cache(maxsize=32)
def _executable(plan: _Plan, mesh, axis: str, stage: str):
    """One stage of the build for one plan, compiled (cached: a build of the same shapes
    reuses it)."""
    lists_spec = P(None, axis)  # keys, or both words of Pairs
    codes, lists = _arg_shapes(plan, mesh, axis)
    if stage == "initial":
        fn, args, in_specs, out_specs = _initial_stage, (codes,), (P(axis),), lists_spec
    elif stage == "propagate":
        fn, args, in_specs, out_specs = (
            _propagate_stage,
            (codes, lists),
            (P(axis), lists_spec),
            lists_spec,
        )
    else:
        fn, args, in_specs, out_specs = (
            _finalize_stage,
            (codes, lists),
            (P(axis), lists_spec),
            lists_spec,  # the graph in the lists' buffers (_finalize_keys)
        )
    local = functools.partial(fn, plan=plan, axis=axis)
    # check_vma=False: hamming_topk's loops start from replicated constants (no pcast), which the
    # varying-axis checker rejects although every value here is per-device by construction.
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    # The lists are updated in their own buffers by propagation and stages 4-5, which
    # return the graph in them.
    donate = (1,) if stage in ("propagate", "finalize") else ()
    return jax.jit(mapped, donate_argnums=donate).lower(*args).compile()


def release_build_programs():
    """Frees the compiled build programs. They hold about 55 MB (VmRSS at 1M, 2 cores,
    2026-11-26) and serve only a later build of the same shapes, which otherwise compiles
    them again (about 12 s at 1M); BinaryGraphIndex.build frees them after a large build."""
    _executable.cache_clear()


def _check_codes(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.dtype != np.uint32 or codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes (dtype={codes.dtype}, shape={codes.shape}) must be uint32 [N, W]")
    if codes.shape[0] < 2:
        raise ValueError(f"codes.shape[0]={codes.shape[0]} must be >= 2")
    return codes


def _plan_for(codes_shape, degree, mesh, config: GraphConfig) -> _Plan:
    if not isinstance(degree, (int, np.integer)) or degree < 1:
        raise ValueError(f"degree={degree!r} must be a positive int")
    n_total, words = codes_shape
    return _plan(n_total, words, int(degree), mesh.shape[config.axis], config)


@functools.partial(jax.jit, static_argnames=("degree", "n"))
def _graph_rows(edges_t, degree: int, n: int):
    """The packed-key finalize's output uint32 [K, n'] -> the graph int32 [n, degree]."""
    return lax.bitcast_convert_type(edges_t[:degree, :n].T, jnp.int32)  # SENTINEL -> -1


def _run(codes, degree: int, mesh, config: GraphConfig, stages: tuple[str, ...]):
    """Runs the given leading stages of the build; returns the graph (a jax array) after
    "finalize", else the lists as (ids, dist) int32 [N, K] numpy."""
    codes = _check_codes(codes)
    mesh = _mesh_or_default(mesh, config)
    plan = _plan_for(codes.shape, degree, mesh, config)
    programs = [_executable(plan, mesh, config.axis, stage) for stage in stages]
    release_free_heap()  # what compiling freed, before the build's buffers are allocated
    padded = codes
    if plan.rows * plan.shards != plan.n_total:  # rows for every shard: pad with zero codes
        padded = np.zeros((plan.rows * plan.shards, plan.words), np.uint32)
        padded[: plan.n_total] = codes
    device_codes = _put_global(padded, jax.sharding.NamedSharding(mesh, P(config.axis)))
    del padded
    out = programs[0](device_codes)
    for program in programs[1:]:
        jax.block_until_ready(out)
        release_free_heap()  # what the last stage freed
        out = program(device_codes, out)
    if stages[-1] == "finalize":  # the graph's rows, transposed
        return _graph_rows(bitonic.low_word(out), plan.degree, plan.n_total)
    out = (plan.layout.ids(out).T, plan.layout.dist(out).T)
    return tuple(to_host(x)[: plan.n_total] for x in out)


def _put_global(host: np.ndarray, sharding):
    """host (the same full array in every process) as a global array with this sharding."""
    if sharding.is_fully_addressable:
        # One process: a CPU device shares the unpadded array's memory (30 MB at 1M).
        return jax.device_put(host, sharding)
    # Many processes (jax.distributed): each places only the rows of its own devices.
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """A build's output as one numpy array in this process; across processes (a mesh over
    several hosts) every process gathers the whole of it, since each keeps the full index."""
    if x.is_fully_addressable:
        return np.asarray(x)  # on one CPU device a view, not a copy
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def build_memory(n: int, words: int, degree: int, *, mesh=None, config=GraphConfig()) -> dict:
    """XLA's memory analysis of the compiled build for N codes of `words` words, per device and
    per stage: {stage: {"argument", "output", "alias", "temp", "peak"}, "peak": the largest},
    in bytes. temp is the largest set of intermediate buffers live at once; peak = argument +
    output - alias (outputs written into donated arguments) + temp. Compiles, runs nothing, so
    it sizes a build for any mesh before the data exist."""
    mesh = _mesh_or_default(mesh, config)
    plan = _plan_for((n, words), degree, mesh, config)
    out = {}
    for stage in STAGES:
        stats = _executable(plan, mesh, config.axis, stage).memory_analysis()
        sizes = {
            "argument": int(stats.argument_size_in_bytes),
            "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes),
            "temp": int(stats.temp_size_in_bytes),
        }
        sizes["peak"] = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
        out[stage] = sizes
    out["peak"] = max(out[stage]["peak"] for stage in STAGES)
    return out


def _mesh_or_default(mesh, config: GraphConfig):
    if mesh is None:
        mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    if config.axis not in mesh.shape:
        raise ValueError(f"config.axis={config.axis!r} is not an axis of the mesh {mesh.shape}")
    return mesh


def build_graph(codes, degree: int, *, mesh=None, config: GraphConfig = GraphConfig()):
    """Search graph over codes uint32 [N, W] -> int32 [N, degree] (numpy; -1 pads tiny graphs).

    mesh: a Mesh whose axis config.axis shards the points (None: one device)."""
    return to_host(build_graph_device(codes, degree, mesh=mesh, config=config))


def build_graph_device(codes, degree: int, *, mesh=None, config: GraphConfig = GraphConfig()):
    """build_graph's graph as the jax array the build made (sharded like the mesh), so a
    caller that keeps it on the device needs no second copy (on CPU np.asarray of it is a
    view: the host copy beside the device one was 122 MB of an index's peak at 1M)."""
    return _run(codes, degree, mesh, config, STAGES)


def knn_graph(codes, k: int, *, mesh=None, config: GraphConfig = GraphConfig(), rounds=None):
    """The approximate Hamming kNN graph before pruning: (ids int32 [N, k], dist int32 [N, k]),
    rows sorted by (distance, index). rounds=0 gives the clustering-only graph."""
    cfg = dataclasses.replace(
        config,
        intermediate_degree=k,
        rounds=config.rounds if rounds is None else rounds,
        block_degree=config.block_degree or k,  # full lists (see GraphConfig.block_degree)
    )
    return _run(codes, k, mesh, cfg, STAGES[:2])


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
