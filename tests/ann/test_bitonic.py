"""alijax.ann.bitonic: the sorting networks against numpy sorts, and the key packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alijax.ann import bitonic


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_sort_and_merge_match_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.integers(0, 2**32, size=(n, 7), dtype=np.uint32)  # [n, lists] layout
    x[: n // 2, 0] = x[0, 0]  # repeated keys
    np.testing.assert_array_equal(bitonic.sort(jnp.asarray(x)), np.sort(x, axis=0))
    a = np.sort(x, axis=0)
    b = np.sort(rng.integers(0, 2**32, size=(n, 7), dtype=np.uint32), axis=0)
    want = np.sort(np.concatenate([a, b]), axis=0)[:n]
    np.testing.assert_array_equal(bitonic.merge_smallest(jnp.asarray(a), jnp.asarray(b)), want)


@pytest.mark.parametrize("m", [1, 3, 8, 100, 192, 320])
@pytest.mark.parametrize("k", [1, 4, 64])
def test_smallest_and_unique_smallest_match_numpy(m, k):
    rng = np.random.default_rng(m * 100 + k)
    x = rng.integers(0, 50, size=(m, 5), dtype=np.uint32)  # many repeats
    pad = np.full((k, 5), bitonic.SENTINEL, np.uint32)
    want = np.concatenate([np.sort(x, axis=0), pad])[:k]
    np.testing.assert_array_equal(bitonic.smallest(jnp.asarray(x), k), want)
    got = np.asarray(bitonic.unique_smallest(jnp.asarray(x), k))
    for c in range(5):
        u = np.unique(x[:, c])[:k]
        np.testing.assert_array_equal(got[:, c], np.concatenate([u, pad[: k - len(u), c]]))


def test_smallest_refuses_a_k_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="k=3"):
        bitonic.smallest(jnp.zeros((8, 2), jnp.uint32), 3)


@pytest.mark.parametrize("flag", [False, True])
def test_key_layout_orders_by_distance_then_id(flag):
    layout = bitonic.KeyLayout.for_ids(1000, flag=flag)
    dist = jnp.asarray([5, 3, 3, 0, 256, 7, 1 << 30], jnp.int32)
    ids = jnp.asarray([1, 999, 7, 500, -1, 2, 3], jnp.int32)
    keys = layout.pack(dist, ids)
    np.testing.assert_array_equal(layout.ids(keys), [1, 999, 7, 500, -1, 2, -1])
    big = bitonic.BIG
    np.testing.assert_array_equal(layout.dist(keys), [5, 3, 3, 0, big, 7, big])
    np.testing.assert_array_equal(
        np.argsort(np.asarray(keys), kind="stable"), [3, 2, 1, 0, 5, 4, 6]
    )
    if flag:  # the flag bit never changes what a key decodes to
        np.testing.assert_array_equal(layout.ids(keys | 1), layout.ids(keys))
    assert bitonic.KeyLayout.fits(1 << 22, 256, flag=True)
    assert not bitonic.KeyLayout.fits(1 << 23, 256, flag=True)
    assert bitonic.KeyLayout.fits(1 << 23, 256) and not bitonic.KeyLayout.fits(1 << 24, 256)


def _as_u64(p):
    return np.asarray(p.hi).astype(np.uint64) << 32 | np.asarray(p.lo)


@pytest.mark.parametrize("n", [1, 2, 16, 64])
def test_pair_networks_order_by_hi_then_lo(n):
    rng = np.random.default_rng(n)
    words = lambda: rng.integers(0, 6, size=(n, 5), dtype=np.uint32)  # noqa: E731 (many ties)
    x = bitonic.Pairs(jnp.asarray(words()), jnp.asarray(words() * 1000))
    want = np.sort(_as_u64(x), axis=0)
    np.testing.assert_array_equal(_as_u64(bitonic.sort(x)), want)
    np.testing.assert_array_equal(_as_u64(bitonic.min_rows(x)), want[0])
    y = bitonic.Pairs(jnp.asarray(words()), jnp.asarray(words()))
    both = np.sort(np.concatenate([want, np.sort(_as_u64(y), axis=0)]), axis=0)[:n]
    merged = bitonic.merge_smallest(bitonic.sort(x), bitonic.sort(y))
    np.testing.assert_array_equal(_as_u64(merged), both)
    padded = bitonic.pad_rows(x, 2 * n)
    assert (np.asarray(padded.hi[n:]) == bitonic.SENTINEL).all()
    assert (np.asarray(padded.lo[n:]) == bitonic.SENTINEL).all()
    assert (
        not np.asarray(bitonic.is_empty(x)).any() and np.asarray(bitonic.is_empty(padded[n:])).all()
    )


@pytest.mark.parametrize("m, k", [(3, 4), (100, 16), (700, 64)])
def test_pair_smallest_and_unique_smallest_match_the_keys(m, k):
    # A key split into (high half, low half) words orders as the key: the same results, also
    # through the tiles (300 columns: two tiles) and a tuple of parts.
    rng = np.random.default_rng(m)
    x = rng.integers(0, 3 * m, size=(m, 300), dtype=np.uint32) * 40_000  # repeats, both words
    split = lambda a: bitonic.Pairs(jnp.asarray(a >> 16), jnp.asarray(a & 0xFFFF))  # noqa: E731
    join = lambda p: np.asarray(p.hi) << 16 | np.asarray(p.lo)  # noqa: E731
    np.testing.assert_array_equal(join(bitonic.smallest(split(x), k)), bitonic.smallest(x, k))
    parts = (x[: m // 2], x[m // 2 :])
    want = bitonic.unique_smallest(tuple(jnp.asarray(p) for p in parts), k, window=k)
    got = bitonic.unique_smallest(tuple(split(p) for p in parts), k, window=k)
    np.testing.assert_array_equal(join(got), want)


def test_pair_layout_orders_as_the_key_layout():
    dist = jnp.asarray([5, 3, 3, 0, 256, 7, -1], jnp.int32)
    ids = jnp.asarray([1, 999, 7, 500, -1, 2, 3], jnp.int32)
    keys = bitonic.KeyLayout.for_ids(1000, flag=True).pack(dist, ids)
    layout = bitonic.PairLayout(flag_bits=1)
    pairs = layout.pack(dist, ids)
    np.testing.assert_array_equal(np.argsort(_as_u64(pairs)), np.argsort(np.asarray(keys)))
    np.testing.assert_array_equal(layout.ids(pairs), [1, 999, 7, 500, -1, 2, -1])
    big = bitonic.BIG
    np.testing.assert_array_equal(layout.dist(pairs), [5, 3, 3, 0, big, 7, big])
    flagged = bitonic.with_low_word(pairs, bitonic.low_word(pairs) | 1)
    np.testing.assert_array_equal(layout.ids(flagged), layout.ids(pairs))
    big_id = layout.pack(jnp.asarray([3]), jnp.asarray([(1 << 31) - 1]))
    assert int(layout.ids(big_id)[0]) == (1 << 31) - 1


def test_tiled_networks_and_tuple_input_match_numpy():
    # 600 lists: three tiles of 200 (TILE 256), the path every large build takes.
    rng = np.random.default_rng(7)
    a = rng.integers(0, 300, size=(40, 600), dtype=np.uint32)
    b = rng.integers(0, 300, size=(30, 600), dtype=np.uint32)
    both = np.concatenate([a, b])
    np.testing.assert_array_equal(bitonic.smallest(jnp.asarray(both), 16), np.sort(both, 0)[:16])
    got = np.asarray(bitonic.unique_smallest((jnp.asarray(a), jnp.asarray(b)), 16))
    for col in range(600):
        np.testing.assert_array_equal(got[:, col], np.unique(both[:, col])[:16])


@pytest.mark.parametrize(
    "m_first, m_rest, k, window",
    [(64, 128, 64, None), (16, 300, 16, 32), (40, 7, 8, None), (8, 100, 64, 64)],
)
@pytest.mark.parametrize("pairs", [False, True])
def test_unique_smallest_after_a_sorted_first_part_matches_numpy(m_first, m_rest, k, window, pairs):
    # Propagation's merge: a sorted list (distinct keys, SENTINEL-padded) and candidates that
    # repeat its keys and each other; 300 lists, two tiles. Sorting only the candidates and
    # merging them gives what sorting both gives, and numpy's k smallest distinct keys where
    # the window holds them all.
    rng = np.random.default_rng(m_first * 1000 + m_rest)
    first = np.stack([np.sort(rng.choice(400, m_first, replace=False)) for _ in range(300)], 1)
    first = first.astype(np.uint32) * 40_000
    first[m_first - m_first // 4 :, ::3] = bitonic.SENTINEL  # short lists
    rest = rng.integers(0, 400, size=(m_rest, 300), dtype=np.uint32) * 40_000
    rest[: m_rest // 3] = first[rng.integers(0, m_first, (m_rest // 3, 1)), np.arange(300)]
    rest[-(m_rest // 5) :] = bitonic.SENTINEL
    if pairs:
        split = lambda a: bitonic.Pairs(jnp.asarray(a >> 16), jnp.asarray(a & 0xFFFF))  # noqa: E731
        join = lambda p: np.asarray(p.hi) << 16 | np.asarray(p.lo)  # noqa: E731
    else:
        split, join = jnp.asarray, np.asarray
    want = join(bitonic.unique_smallest((split(first), split(rest)), k, window))
    got = join(bitonic.unique_smallest((split(first), split(rest)), k, window, sorted_first=True))
    np.testing.assert_array_equal(got, want)
    if window is None:
        both = np.concatenate([first, rest])
        for col in range(300):
            u = np.unique(both[:, col])
            u = u[u != bitonic.SENTINEL][:k]
            pad = np.full(k - len(u), bitonic.SENTINEL, np.uint32)
            np.testing.assert_array_equal(got[:, col], np.concatenate([u, pad]))
    with pytest.raises(ValueError, match="sorted_first"):
        bitonic.unique_smallest(split(first), k, sorted_first=True)


@pytest.mark.parametrize("axis", [0, 1])
def test_slice_map_joins_overlapping_slices(axis):
    x = jnp.arange(3 * 37).reshape(3, 37) if axis else jnp.arange(37 * 3).reshape(37, 3)
    fn = lambda t: {"double": t * 2, "sum": jnp.sum(t, axis=1 - axis, keepdims=True)}  # noqa: E731
    got = bitonic.slice_map(fn, (x,), 10, axis=axis)  # 4 slices, the last overlapping
    for name, want in fn(x).items():
        np.testing.assert_array_equal(got[name], want)


@pytest.mark.parametrize("axis", [0, 1])
def test_slice_update_is_fn_of_the_original_at_every_position(axis):
    # fn may not be applied twice anywhere: x -> x * 3 + 1 applied twice would give 9x + 4.
    x = jnp.arange(3 * 37).reshape(3, 37) if axis else jnp.arange(37 * 3).reshape(37, 3)
    other = x % 5
    fn = lambda t, o: t * 3 + o  # noqa: E731
    got = bitonic.slice_update(fn, x, (other,), 10, axis=axis)  # 4 slices, the last overlapping
    np.testing.assert_array_equal(got, fn(x, other))
    np.testing.assert_array_equal(bitonic.slice_update(fn, x, (other,), 64, axis), fn(x, other))


def test_slice_update_updates_a_tuple_of_arrays_of_different_widths():
    # Rows of two arrays (ids and distances, say): one slice of rows updates both, each in its
    # own buffer; fn mixes them, so a slice applied twice or to the wrong rows shows.
    ids = jnp.arange(37 * 4).reshape(37, 4)
    dist = jnp.arange(37 * 2).reshape(37, 2) * 7
    fn = lambda t: (t[0] * 3 + t[1][:, :1], t[1] + t[0][:, :2])  # noqa: E731
    got = bitonic.slice_update(fn, (ids, dist), (), 10, axis=0)
    for g, want in zip(got, fn((ids, dist))):
        np.testing.assert_array_equal(g, want)


def test_slice_update_threads_a_carry_and_slices_others_along_their_own_axis():
    # Columns of x [2, 37] in slices of 10; the other array is [37, 2] (sliced along axis 0),
    # and the carry counts the slices fn saw and the columns it wrote (the last slice
    # overlaps the one before: 4 slices of 10 over 37 columns).
    x = jnp.arange(2 * 37).reshape(2, 37)
    rows = (jnp.arange(37 * 2).reshape(37, 2) % 7).astype(x.dtype)

    def fn(t, o, carry):
        calls, width = carry
        return t * 3 + o.T, (calls + 1, width + t.shape[1])

    got, (calls, width) = bitonic.slice_update(
        fn, x, (rows,), 10, other_axes=(0,), carry=(jnp.int32(0), jnp.int32(0))
    )
    np.testing.assert_array_equal(got, x * 3 + rows.T)
    assert (int(calls), int(width)) == (4, 40)
    whole, (calls, _) = bitonic.slice_update(
        fn, x, (rows,), 64, other_axes=(0,), carry=(jnp.int32(0), jnp.int32(0))
    )
    np.testing.assert_array_equal(whole, x * 3 + rows.T)
    assert int(calls) == 1


@pytest.mark.parametrize("size", [1, 2, 8, 256])
@pytest.mark.parametrize("pairs", [False, True])
def test_contains_finds_entries_whatever_their_flag(size, pairs):
    # Columns of distinct sorted entries, about half flagged (expanded), the last quarter
    # empty; probes: the columns' own entries (flag clear), random (distance, id) pairs, empty
    # keys, and keys past every entry and before every entry.
    rng = np.random.default_rng(size)
    lanes, probes, n_ids = 7, 40, 5000
    layout = bitonic.PairLayout(flag_bits=1) if pairs else bitonic.KeyLayout.for_ids(n_ids, True)
    dist = rng.integers(0, 12, (size, lanes))
    ids = np.stack([rng.choice(n_ids, size, replace=False) for _ in range(lanes)], axis=1)
    ids[size - size // 4 :] = -1
    keys = layout.pack(jnp.asarray(dist), jnp.asarray(ids))
    keys = layout.mark(keys, jnp.asarray(rng.random((size, lanes)) < 0.5) & ~bitonic.is_empty(keys))
    order = jnp.asarray(np.argsort(_as_u64(keys) if pairs else np.asarray(keys), axis=0))
    keys = jax.tree.map(lambda a: jnp.take_along_axis(a, order, 0), keys)

    own = rng.integers(0, size, (probes, lanes))
    is_own = rng.random((probes, lanes)) < 0.5
    p_dist = np.where(is_own, np.take_along_axis(dist, own, 0), rng.integers(0, 12, own.shape))
    p_ids = np.where(is_own, np.take_along_axis(ids, own, 0), rng.integers(-1, n_ids, own.shape))
    p_dist[-2:], p_ids[-2:] = [[13], [0]], [[n_ids - 1], [0]]  # after, before every entry
    got = np.asarray(bitonic.contains(keys, layout.pack(jnp.asarray(p_dist), jnp.asarray(p_ids))))

    entries = [
        set(zip(dist[:, j][ids[:, j] >= 0], ids[:, j][ids[:, j] >= 0])) for j in range(lanes)
    ]
    want = np.array(
        [[(p_dist[f, j], p_ids[f, j]) in entries[j] for j in range(lanes)] for f in range(probes)]
    )
    np.testing.assert_array_equal(got, want)
    assert want.any() and not want.all()
