"""Bitonic sorting networks on packed uint32 keys, along axis 0 of [n, ...] arrays.

Search and graph construction keep many short sorted lists (one per query or per point) and
merge candidates into them. XLA:CPU's sort and TopK run one row at a time and cost 10-60 ns an
element on short rows; a bitonic network instead is a fixed sequence of elementwise min/max
between rows, and with the lists laid out along axis 0 every compare-exchange works on long
contiguous rows (one element per list), which XLA vectorises. Measured on 2 cores, 1000 lists
of 64 keys: 0.08 ms for a merge, against 0.44 ms for lax.top_k on [1000, 64] rows.

Keys are uint32 with everything that orders an entry packed in (e.g. distance << b | id), so a
network moves one array; `SENTINEL` (all ones) pads and sorts last. Lengths along axis 0 are
powers of two where noted (pad with `pad_rows`).

Where an entry does not fit 32 bits (more than 2**22 ids beside 256-bit distances, say), the
networks take `Pairs` of two uint32 words instead, ordered by (hi, lo): each compare-exchange
is then a lexicographic compare and four selects instead of one min and one max, and the same
entries sort to the same order as their packed keys would (`PairLayout` against `KeyLayout`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SENTINEL = np.uint32(0xFFFFFFFF)
BIG = 1 << 30  # the distance an empty or dropped entry decodes to (as in graph and search)


@dataclasses.dataclass(frozen=True)
class KeyLayout:
    """A list entry packed into one uint32 key: distance | id | optional flag bit.

    Sorting keys orders entries by (distance, id), so ties go to the lower id and results are
    deterministic; a flag in the lowest bit (search's "expanded") never changes the order of
    two different entries. The distance field is what the id and flag leave of 32 bits; a
    distance that does not fit below its all-ones value, or an id < 0, packs to SENTINEL."""

    id_bits: int
    flag_bits: int = 0

    @staticmethod
    def for_ids(n_ids: int, flag: bool = False) -> "KeyLayout":
        return KeyLayout(max(1, (n_ids - 1).bit_length()), int(flag))

    @staticmethod
    def fits(n_ids: int, n_bits: int, flag: bool = False) -> bool:
        """Whether every distance 0..n_bits between n_ids ids packs (256-bit codes: up to 2**22
        ids with a flag, 2**23 without)."""
        layout = KeyLayout.for_ids(n_ids, flag)
        return n_bits < layout.dist_limit

    @property
    def dist_limit(self) -> int:
        return (1 << (32 - self.id_bits - self.flag_bits)) - 1

    def pack(self, dist, ids):
        shift = self.id_bits + self.flag_bits
        key = (dist.astype(jnp.uint32) << shift) | (ids.astype(jnp.uint32) << self.flag_bits)
        return jnp.where((ids >= 0) & (dist >= 0) & (dist < self.dist_limit), key, SENTINEL)

    def ids(self, key):
        node = ((key >> self.flag_bits) & ((1 << self.id_bits) - 1)).astype(jnp.int32)
        return jnp.where(key == SENTINEL, -1, node)

    def dist(self, key):
        d = (key >> (self.id_bits + self.flag_bits)).astype(jnp.int32)
        return jnp.where(key == SENTINEL, BIG, d)

    def empty(self, shape, fill=SENTINEL, lo_fill=None):
        """SENTINEL keys of `shape` (fill: SENTINEL, or a traced one; lo_fill is PairLayout's)."""
        return jnp.full(shape, fill, jnp.uint32)

    def unexpanded(self, key):
        """Search's flag bit clear (flag_bits=1); the sentinel has it set."""
        return (key & 1) == 0

    def mark(self, key, chosen):
        """key with the flag bit set where chosen."""
        return key | chosen.astype(jnp.uint32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pairs:
    """Keys of two uint32 words [n, ...] each, ordered by hi, then lo. An entry whose hi word
    is SENTINEL is empty whatever its lo (it sorts after every real entry); the networks pad
    with (SENTINEL, SENTINEL), which sorts last of all. Indexing applies to both words."""

    hi: jax.Array
    lo: jax.Array

    @property
    def shape(self):
        return self.hi.shape

    def __getitem__(self, index):
        return Pairs(self.hi[index], self.lo[index])

    @property
    def T(self):  # noqa: N802 (as an array's)
        return Pairs(self.hi.T, self.lo.T)


@dataclasses.dataclass(frozen=True)
class PairLayout:
    """A list entry as Pairs: hi = distance, lo = id << flag_bits | flag, for distances in
    [0, BIG) and int32 ids >= 0 (beyond 2**31 - flag_bits ids the lo word would wrap). The
    order is KeyLayout's (distance, id, flag). pack makes empty entries (SENTINEL, SENTINEL);
    any entry whose hi is SENTINEL decodes as empty."""

    flag_bits: int = 0

    def pack(self, dist, ids):
        ok = (ids >= 0) & (dist >= 0) & (dist < BIG)  # BIG: empty, as KeyLayout decodes it
        hi = jnp.where(ok, dist.astype(jnp.uint32), SENTINEL)
        lo = jnp.where(ok, ids.astype(jnp.uint32) << self.flag_bits, SENTINEL)
        return Pairs(hi, lo)

    def ids(self, key):
        node = (key.lo >> self.flag_bits).astype(jnp.int32)
        return jnp.where(key.hi == SENTINEL, -1, node)

    def dist(self, key):
        return jnp.where(key.hi == SENTINEL, BIG, key.hi.astype(jnp.int32))

    def empty(self, shape, fill=SENTINEL, lo_fill=SENTINEL):
        """Empty Pairs of `shape`: hi words `fill` (SENTINEL, or a traced one), lo words
        `lo_fill`. Where a loop carries them, lo_fill should differ from fill (0, say): XLA
        makes two equal broadcasts one buffer, and a loop carrying Pairs whose words share a
        buffer copies both at every step (a mesh's stage-2 rows, XLA live ranges)."""
        return Pairs(jnp.full(shape, fill, jnp.uint32), jnp.full(shape, lo_fill, jnp.uint32))

    def unexpanded(self, key):
        """Search's flag bit clear on a real entry (an empty pair is empty by its hi word)."""
        return ((key.lo & 1) == 0) & ~is_empty(key)

    def mark(self, key, chosen):
        """key with the flag bit set where chosen."""
        return Pairs(key.hi, key.lo | chosen.astype(jnp.uint32))


def low_word(key):
    """The word that holds a layout's flag bit (bit 0): the key itself, or a pair's lo."""
    return key.lo if isinstance(key, Pairs) else key


def with_low_word(key, low):
    return Pairs(key.hi, low) if isinstance(key, Pairs) else low


def is_empty(key):
    """Whether each entry is empty: SENTINEL, or a pair whose hi word is (see PairLayout)."""
    return (key.hi if isinstance(key, Pairs) else key) == SENTINEL


def less(a, b):
    """a < b elementwise, keys or Pairs (lexicographic)."""
    if isinstance(a, Pairs):
        return (a.hi < b.hi) | ((a.hi == b.hi) & (a.lo < b.lo))
    return a < b


def equal(a, b):
    if isinstance(a, Pairs):
        return (a.hi == b.hi) & (a.lo == b.lo)
    return a == b


def where(cond, a, b):
    """jnp.where over keys or Pairs; a or b may be SENTINEL (a scalar) for the empty key."""
    if isinstance(a, Pairs) or isinstance(b, Pairs):
        a = a if isinstance(a, Pairs) else Pairs(a, a)
        b = b if isinstance(b, Pairs) else Pairs(b, b)
        return Pairs(jnp.where(cond, a.hi, b.hi), jnp.where(cond, a.lo, b.lo))
    return jnp.where(cond, a, b)


def _min_max(a, b):
    if isinstance(a, Pairs):
        swap = less(b, a)
        return where(swap, b, a), where(swap, a, b)
    return jnp.minimum(a, b), jnp.maximum(a, b)


def minimum(a, b):
    return _min_max(a, b)[0]


def min_rows(x):
    """The smallest key along axis 0 of x [n, ...] -> [...]."""
    if isinstance(x, Pairs):
        hi = jnp.min(x.hi, axis=0)
        return Pairs(hi, jnp.min(jnp.where(x.hi == hi, x.lo, SENTINEL), axis=0))
    return jnp.min(x, axis=0)


def _tree(fn, *keys):
    """fn applied to each word of keys (arrays, or Pairs of the same structure)."""
    return jax.tree.map(fn, *keys)


def layout_for(n_ids: int, n_bits: int) -> KeyLayout | PairLayout:
    """The (distance, id) entries of n_ids codes of n_bits, no flag: one uint32 key where it
    fits, else Pairs (the same order either way). graph._plan makes the same choice inline, on
    its module's KeyLayout name, which its tests replace to force Pairs."""
    return KeyLayout.for_ids(n_ids) if KeyLayout.fits(n_ids, n_bits) else PairLayout()


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _empty_of(a):
    """The empty key of a's unsigned dtype, all ones: SENTINEL for uint32 (the networks also
    sort narrower keys, graph's uint16 in-block keys)."""
    return np.dtype(a.dtype).type(np.iinfo(a.dtype).max)


def pad_rows(x, rows: int):
    """x [n, ...] (keys or Pairs) -> [rows, ...] padded with SENTINEL (rows >= n)."""

    def pad(a):
        widths = [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)
        return jnp.pad(a, widths, constant_values=_empty_of(a))

    return _tree(pad, x)


def _exchange(x, stride: int, flip: bool):
    n, rest = x.shape[0], x.shape[1:]
    blocks = _tree(lambda a: a.reshape(n // (2 * stride), 2, stride, *rest), x)
    lo, hi = blocks[:, 0], blocks[:, 1]
    if flip:  # element i against 2*stride - 1 - i: two sorted halves become one bitonic clean
        small, large = _min_max(lo, hi[:, ::-1])
        join = lambda s, b: jnp.concatenate([s, b[:, ::-1]], axis=1).reshape(n, *rest)  # noqa: E731
        return _tree(join, small, large)
    small, large = _min_max(lo, hi)
    return _tree(lambda s, b: jnp.stack([s, b], axis=1).reshape(n, *rest), small, large)


def _half_cleaners(x, stride: int):
    while stride >= 1:
        x = _exchange(x, stride, flip=False)
        stride //= 2
    return x


def sort(x):
    """Ascending sort along axis 0 of x [n, ...] (keys or Pairs), n a power of two."""
    n, size = x.shape[0], 1
    while size < n:
        x = _half_cleaners(_exchange(x, size, flip=True), size // 2)
        size *= 2
    return x


def merge_smallest(a, b):
    """a, b [n, ...] (keys or Pairs), each sorted along axis 0 (n a power of two) -> the n
    smallest, sorted."""
    # min(a[i], b[n-1-i]) holds the n smallest as a bitonic sequence (Batcher's merge).
    return _half_cleaners(minimum(a, b[::-1]), a.shape[0] // 2)


def drop_repeats(x):
    """x [n, ...] (keys or Pairs) sorted along axis 0 -> x with every entry once, still
    sorted: a repeat equals the entry before it, so it becomes SENTINEL and a sort moves the
    gaps to the end (n a power of two)."""
    repeat = equal(x[1:], x[:-1]) & ~is_empty(x[1:])
    repeat = jnp.concatenate([jnp.zeros((1,) + repeat.shape[1:], bool), repeat])
    return sort(where(repeat, SENTINEL, x))


def contains(sorted_keys, keys):
    """sorted_keys [S, Q] (keys or Pairs of a layout with a flag bit, bit 0, as search's lists
    are; each column ascending, distinct entries, S a power of two), keys [F, Q] of the same
    layout with the flag clear -> bool [F, Q]: whether each key's entry, its flag ignored, is
    in its column of sorted_keys (an empty key never is).

    A branch-free lower bound per key: log2(S) halving steps, each a gather of one row per
    lane, then the entry found there is compared with the flag bit set on both sides (an
    entry's key with the flag clear is its lowest, so the lower bound lands on it)."""
    size, lanes = sorted_keys.shape[0], keys.shape[1]
    check_pow2("sorted_keys.shape[0]", size)
    flat = jax.tree.map(lambda a: a.reshape(-1), sorted_keys)
    lane = jnp.arange(lanes, dtype=jnp.int32)[None, :]

    def row(pos):
        return jax.tree.map(lambda a: a[pos * lanes + lane], flat)

    below = jnp.zeros(keys.shape, jnp.int32)  # entries known to be below the key
    step = size // 2
    while step:
        below = jnp.where(less(row(below + step - 1), keys), below + step, below)
        step //= 2
    found = row(below)  # below <= size - 1: a key past the last entry is compared with it

    def flagged(key):
        return with_low_word(key, low_word(key) | 1)

    return equal(flagged(found), flagged(keys)) & ~is_empty(keys)


# Lists per tile: each network stage is one pass over its array, so the networks run on column
# tiles small enough to stay in cache ([512, 50000] keys in one piece made every stage a
# 200 MB round trip to memory; tiles of 256 lists ran 3x faster, measured on 2 cores).
TILE = 256


def _even_slices(n: int, size: int) -> tuple[int, int]:
    """(count, length): the fewest slices of at most `size` that cover n, made equal in length
    so the last, moved back to end at n, overlaps the one before as little as possible."""
    count = -(-n // size)
    return count, -(-n // count)


def _take(a, start, size: int, axis: int):
    """The slice of `size` from `start` along `axis` of an array or of each word of Pairs."""
    return _tree(lambda w: lax.dynamic_slice_in_dim(w, start, size, axis=axis % w.ndim), a)


def slice_map(fn, arrays, size: int, axis: int = -1):
    """fn applied to consecutive slices of `size` along `axis` of every array in `arrays` (all
    of length n there), its outputs (any pytree) joined along the same axis.

    The slices run one after another in a fori_loop that reads each slice in place and writes
    its outputs into place, so no padded or transposed copy of an input or an output is made
    (lax.map over moved axes made two such copies of each, 0.5 GB apiece in a 1M-point graph
    build, measured with XLA's buffer assignment). The last slice is moved back to end at n,
    overlapping the one before, so fn must be position-wise: its output at a position may
    depend only on its inputs at that position (then the overlap is recomputed identically)."""
    n = arrays[0].shape[axis]
    if n <= size:
        return fn(*arrays)
    count, size = _even_slices(n, size)
    take = functools.partial(_take, size=size, axis=axis)
    shapes = jax.eval_shape(fn, *(take(a, 0) for a in arrays))

    def full(shape):
        at = axis % len(shape.shape)
        return jnp.zeros(shape.shape[:at] + (n,) + shape.shape[at + 1 :], shape.dtype)

    def put(o, y, start):
        return lax.dynamic_update_slice_in_dim(o, y, start, axis=axis % o.ndim)

    def body(i, out):
        start = jnp.minimum(i * size, n - size)
        got = fn(*(take(a, start) for a in arrays))
        return jax.tree.map(functools.partial(put, start=start), out, got)

    return lax.fori_loop(0, count, body, jax.tree.map(full, shapes))


def slice_update(fn, x, others, size: int, axis: int = -1, *, other_axes=None, carry=None):
    """x with each slice of `size` along `axis` replaced by fn(x slice, *the same slice of each
    array in `others`), which has the x slice's shape and dtype; returns the updated x. x may
    be a pytree of arrays of one length n along `axis` (a tuple of lists, say): fn then takes
    and returns the same pytree of slices.

    The loop carries x itself, so XLA updates its buffer in place instead of allocating an
    output beside it (a donated argument is updated where it lies). As in slice_map, fn must
    be position-wise and the last slice is moved back to end at n; its overlap with the slice
    before keeps the values already written there (so fn is compiled once, for one shape).

    other_axes: the axis each of `others` is sliced along (default: `axis` for all).
    carry: state threaded through the slices in order (a table that travels a ring and comes
    back, say): fn takes it last and returns (new slice, carry), and the result is (x, carry).
    """
    n = jax.tree.leaves(x)[0].shape[axis]
    axes = (axis,) * len(others) if other_axes is None else tuple(other_axes)
    threaded = carry is not None

    def apply(old, parts, state):
        return fn(old, *parts, state) if threaded else (fn(old, *parts), state)

    if n <= size:
        new, carry = apply(x, others, carry)
        return (new, carry) if threaded else new
    count, size = _even_slices(n, size)

    def body(i, loop):
        x, state = loop
        start = jnp.minimum(i * size, n - size)
        old = jax.tree.map(lambda a: _take(a, start, size, axis), x)
        parts = [_take(o, start, size, ax) for o, ax in zip(others, axes)]  # each may be Pairs
        new, state = apply(old, parts, state)
        written = start + jnp.arange(size) < i * size  # by slice i - 1

        def put(a, old_a, new_a):
            at = axis % a.ndim
            done = written.reshape([size if d == at else 1 for d in range(a.ndim)])
            return lax.dynamic_update_slice_in_dim(a, jnp.where(done, old_a, new_a), start, at)

        return jax.tree.map(put, x, old, new), state

    x, carry = lax.fori_loop(0, count, body, (x, carry))
    return (x, carry) if threaded else x


def by_tiles(fn, x, tile: int = TILE):
    """fn applied to column tiles of x [m, c] (keys or Pairs; fn: [m, tile] -> [k, tile]) ->
    [k, c], one tile after the other so each network's intermediates stay small."""
    return slice_map(fn, (x,), tile, axis=1)


def _smallest(x, k: int):
    m = x.shape[0]
    chunks = -(-m // k)
    # Chunk c holds rows c, c + chunks, ...: which rows share a chunk does not change the k
    # smallest, and this split is a reshape, with no transposed copy.
    rest = x.shape[1:]
    x = sort(_tree(lambda w: w.reshape(k, chunks, *rest), pad_rows(x, chunks * k)))
    while chunks > 1:  # x [k, chunks, ...]: chunk c sorted along axis 0
        if chunks % 2:
            x = _tree(lambda w: jnp.concatenate([w, jnp.full_like(w[:, :1], _empty_of(w))], 1), x)
            chunks += 1
        x = merge_smallest(x[:, 0::2], x[:, 1::2])
        chunks //= 2
    return x[:, 0]


def check_pow2(name: str, value: int):
    if value < 1 or value != next_pow2(value):
        raise ValueError(f"{name}={value} must be a power of two")


def smallest(x, k: int):
    """The k smallest along axis 0 of x [m, c] (keys or Pairs; any m; SENTINEL-padded when
    m < k), sorted; k a power of two. Chunks of k are sorted, then merged pairwise (a
    tournament), so the cost is O(m log^2 k), not a sort of all m."""
    check_pow2("k", k)
    return by_tiles(lambda t: _smallest(t, k), x)


def _window_after_sorted(first, rest, window: int):
    """_smallest(first joined with rest along axis 0, window) where first is already sorted:
    rest sorted on its own (its `window` smallest), then merged with first, instead of a sort
    of both (propagation's list of 64 keys and 128 candidates: 1792 + 1280 compare-exchanges
    a list against 4608)."""
    rest = _smallest(rest, min(window, next_pow2(rest.shape[0])))
    fit = lambda a: pad_rows(_tree(lambda w: w[:window], a), window)  # noqa: E731
    return merge_smallest(fit(first), fit(rest))


def _distinct_smallest(s, k: int):
    """The k smallest distinct keys of s [window, ...], sorted along axis 0."""
    repeat = jnp.concatenate([jnp.zeros((1, *s.shape[1:]), bool), equal(s[1:], s[:-1])], axis=0)
    # The k smallest of the window with its repeats emptied, not a sort of the whole window:
    # chunks of k sorted and merged (propagation's 256-key window, k = 64: 3456 compare-
    # exchanges a list against 4608).
    return _smallest(where(repeat, SENTINEL, s), next_pow2(k))[:k]


def unique_smallest(x, k: int, window: int | None = None, *, sorted_first: bool = False):
    """The k smallest distinct keys along axis 0 of x [m, c] (keys or Pairs), sorted,
    SENTINEL-padded. x may also be a tuple of such [m_i, c], taken as their concatenation along
    axis 0, which is then formed one tile at a time (never as a whole [sum m_i, c] array).

    Equal keys are duplicates (the same entry met twice); after a sort they are adjacent, the
    repeats become SENTINEL and the k smallest of the rest are taken (holes last). Only the
    `window` smallest keys (a power of two >= k; default all) are deduplicated, so heavy
    duplication beyond the window can leave fewer than k distinct keys in one call.

    sorted_first: x is a tuple whose first part is sorted along axis 0 already (a list that
    the other parts are merged into): the others are sorted alone and merged with it. The same
    result as without."""
    parts = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    if sorted_first and len(parts) < 2:
        raise ValueError("sorted_first=True needs x to be a tuple of two or more parts")
    full = next_pow2(max(sum(p.shape[0] for p in parts), k))
    window = full if window is None else min(window, full)
    check_pow2("window", window)
    if window < k:
        raise ValueError(f"window={window} must be >= k={k}")
    join = lambda *t: _tree(lambda *w: jnp.concatenate(w, axis=0), *t)  # noqa: E731
    if sorted_first:
        window_of = lambda first, *t: _window_after_sorted(first, join(*t), window)  # noqa: E731
    else:
        window_of = lambda *t: _smallest(join(*t), window)  # noqa: E731
    tiles = lambda *t: _distinct_smallest(window_of(*t), k)  # noqa: E731
    return slice_map(tiles, parts, TILE, axis=1)
