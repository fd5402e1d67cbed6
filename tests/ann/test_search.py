"""alijax.ann.search: beam search on hand-made graphs, rerank against numpy, recall@10 after
float rerank against exact float ground truth, deleted nodes never returned."""

import collections
import functools
import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import pxla  # jax's in-memory executable cache

from alijax.ann import bitonic, codes, graph, search
from tests.ann.test_codes import clustered


def exact_topk(x, q, k, metric="l2"):
    if metric == "l2":
        s = ((q[:, None, :].astype(np.float64) - x[None]) ** 2).sum(-1)
        return np.argsort(s, axis=1, kind="stable")[:, :k]
    return np.argsort(-(q.astype(np.float64) @ x.T), axis=1, kind="stable")[:, :k]


def recall(found, truth):
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())


@pytest.fixture(scope="module")
def setup():
    allx = clustered(seed=5, n=2200, dim=64, clusters=20)
    x, q = allx[:2000], allx[2000:]
    b = codes.fit_itq(x, 256, iterations=20, rng=jax.random.key(0))
    c, qc = codes.encode(b, x), codes.encode(b, q)
    g = graph.build_graph(c, 16)
    entries = np.linspace(0, 1999, 64).astype(np.int32)
    return x, q, c, qc, g, entries


def _assert_each_node_listed_once(ids):
    for row in np.asarray(ids):
        assert len(set(row[row >= 0])) == (row >= 0).sum()


def _path_graph(n=64):
    """Nodes 0..n-1 on a line: codes uint32 [n, 2] (node i = i ones), graph int32 [n, 2]."""
    bits = np.arange(64)[None, :] < np.arange(n)[:, None]
    c = np.packbits(bits, axis=1, bitorder="little").view("<u4")
    g = np.stack([np.arange(n) - 1, np.arange(n) + 1], axis=1)
    return c, np.where((g >= 0) & (g < n), g, -1).astype(np.int32)


def test_beam_search_walks_a_path_graph():
    # Nodes 0..63 on a line (code of node i = i ones), graph = path; entry 0, query = node 50.
    c, g = _path_graph()
    ids, dist = search.beam_search(
        jnp.asarray(c[50:51]),
        jnp.asarray(c),
        jnp.asarray(g),
        jnp.asarray([0], jnp.int32),
        candidates=4,
        iterations=100,
    )
    np.testing.assert_array_equal(ids, [[50, 49, 51, 48]])
    np.testing.assert_array_equal(dist, [[0, 1, 1, 2]])


def test_iteration_cap_stops_the_walk():
    # The path graph again: from entry 0 the walk gains about one node an iteration, so a cap
    # of 10 cannot reach node 50, and the default cap for L is L // (4 * width) + 4.
    c, g = _path_graph()
    args = (jnp.asarray(c[50:51]), jnp.asarray(c), jnp.asarray(g), jnp.asarray([0], jnp.int32))
    ids, _ = search.beam_search(*args, candidates=4, iterations=10)
    assert 0 < ids.max() < 20, ids
    assert search.SearchConfig(32, width=1).iterations() == 12
    assert search.SearchConfig(64, width=2).iterations() == 12
    assert search.SearchConfig(32, max_iterations=7).iterations() == 7


def test_automatic_width_grows_with_the_index():
    sizes = (1000, 1_000_000, 1_400_000, 1_500_000, 2_000_000, 2_900_000, 5_000_000, 10**9)
    assert [search.auto_width(n) for n in sizes] == [1, 1, 1, 2, 2, 4, 4, 4]
    auto = search.SearchConfig(64)
    assert auto.for_codes(2_000_000).width == 2
    assert auto.for_codes(2_000_000).iterations() == 12
    assert search.SearchConfig(64, width=3).for_codes(5_000_000).width == 3  # chosen: kept
    assert search.SearchConfig(2).for_codes(5_000_000).width == 2  # no wider than the list
    # A long list: a parent per 128 slots of its power-of-two size where that is wider.
    widths = [search.SearchConfig(L).for_codes(1000).width for L in (128, 129, 256, 512, 1024)]
    assert widths == [1, 2, 2, 4, 8]
    assert search.SearchConfig(512).for_codes(5_000_000).width == 4
    assert search.SearchConfig(1024).for_codes(5_000_000).width == 8
    assert search.SearchConfig(512).for_codes(1000).iterations() == 512 // 16 + 4
    with pytest.raises(ValueError, match="for_codes"):
        auto.iterations()


def test_automatic_float_hop_from_a_list_of_256():
    refines = [search.SearchConfig(L).for_codes(1000).refine for L in (64, 128, 255, 256, 512)]
    assert refines == [0, 0, 0, 4, 4]
    assert search.SearchConfig(512, refine=0).for_codes(1000).refine == 0  # chosen: kept
    assert search.SearchConfig(64, refine=8, width=1).for_codes(1000).refine == 8


@pytest.mark.parametrize("n_entries", [1, 37, 64, 200])
def test_seed_is_the_nearest_entry_of_each_strided_group(n_entries):
    rng = np.random.default_rng(n_entries)
    c = rng.integers(0, 2**32, (300, 2), dtype=np.uint32)
    c[:20] = c[0]  # ties: the lower id wins
    qc = np.concatenate([c[:1], rng.integers(0, 2**32, (4, 2), dtype=np.uint32)])
    entries = rng.permutation(300)[:n_entries].astype(np.int32)
    layout = search.KeyLayout.for_ids(300, flag=True)
    size = 16
    args = (jnp.asarray(qc), jnp.asarray(c), jnp.asarray(entries))
    seed = np.asarray(search._seed(*args, layout, size))
    x = (c[entries][:, None, :] ^ qc[None]).view(np.uint8)
    d = np.unpackbits(x, axis=-1).sum(-1)  # [E, Q]
    want = np.full((size, len(qc)), np.iinfo(np.uint32).max, np.uint64)
    for e, node in enumerate(entries):  # group of entry e: e % size
        shift = layout.id_bits + layout.flag_bits
        key = (d[e].astype(np.uint64) << shift) | (np.uint64(node) << layout.flag_bits)
        want[e % size] = np.minimum(want[e % size], key)
    np.testing.assert_array_equal(seed, np.sort(want, axis=0).astype(np.uint32))


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 4 * 25 * 8])  # None: one chunk; else 2 rows
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rerank_matches_numpy(metric, chunk_bytes, monkeypatch):
    if chunk_bytes:
        monkeypatch.setattr(search, "_RERANK_BYTES", chunk_bytes)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    cand = np.array([np.arange(0, 50, 2), np.arange(1, 50, 2), np.r_[np.arange(24), -1]])
    deleted = np.zeros(50, bool)
    deleted[[4, 6]] = True
    s, i = search.rerank(
        jnp.asarray(q),
        jnp.asarray(x),
        jnp.asarray(cand, jnp.int32),
        5,
        metric,
        jnp.asarray(deleted),
    )
    for row in range(3):
        ok = cand[row][(cand[row] >= 0) & ~deleted[np.maximum(cand[row], 0)]]
        want = ok[exact_topk(x[ok], q[row : row + 1], 5, metric)[0]]
        np.testing.assert_array_equal(i[row], want)
        ref = ((x[want] - q[row]) ** 2).sum(-1) if metric == "l2" else x[want] @ q[row]
        np.testing.assert_allclose(s[row], ref, rtol=1e-5)


def test_rerank_chunks_are_larger_off_cpu(monkeypatch):
    # A chunk is a trip of a sequential loop: on CPU 16 MB of gathered rows bound the memory;
    # on an accelerator each trip is ~30 launches, so a batch of 10000 at L=128 is one trip.
    assert search._rerank_rows(128, 128) == 256
    monkeypatch.setattr(search.jax, "default_backend", lambda: "gpu")
    assert search._rerank_rows(128, 128) == 16384
    assert search._rerank_rows(4 * 32, 128) >= 10_000  # the float hop's neighbours'


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_rerank_similarities_ask_for_full_float32(metric):
    # The rerank exists to make the binary candidates' order exact: its products must not be
    # left to a GPU's default TF32 (on CPU the results are the same either way).
    queries, vectors = np.ones((2, 8), np.float32), np.ones((5, 8), np.float32)
    cand = np.array([[0, 1, 2], [3, 4, -1]], np.int32)
    jaxpr = jax.make_jaxpr(lambda q, v, c: search.rerank(q, v, c, 2, metric))(
        queries, vectors, cand
    )
    text = str(jaxpr)
    assert text.count("dot_general") == 1 and "Precision.HIGHEST" in text


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rerank_ties_go_to_the_earlier_candidate(metric):
    # Duplicate vectors give equal scores: the earlier list position comes first, as
    # lax.top_k orders them; missing (-1) and deleted candidates come last, as -1.
    rng = np.random.default_rng(1)
    x = rng.integers(-2, 3, size=(12, 4)).astype(np.float32)
    x[5] = x[2]
    x[7] = x[2]
    q = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)
    cand = rng.integers(-1, 12, size=(6, 24)).astype(np.int32)  # L=24: padded to 32
    deleted = np.zeros(12, bool)
    deleted[3] = True
    s, i = search.rerank(
        jnp.asarray(q), jnp.asarray(x), jnp.asarray(cand), 20, metric, jnp.asarray(deleted)
    )
    xs = x[np.maximum(cand, 0)]
    score = ((xs - q[:, None]) ** 2).sum(-1) if metric == "l2" else (xs * q[:, None]).sum(-1)
    bad = (cand < 0) | deleted[np.maximum(cand, 0)]
    for row in range(len(q)):
        key = np.where(bad[row], np.inf, score[row] if metric == "l2" else -score[row])
        order = np.lexsort((np.arange(24), key))[:20]
        want = np.where(bad[row][order], -1, cand[row][order])
        np.testing.assert_array_equal(i[row], want)
        miss = np.inf if metric == "l2" else -np.inf
        np.testing.assert_array_equal(s[row], np.where(want < 0, miss, score[row][order]))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_rerank_skips_nan_scores(metric):
    # A NaN score (here from a NaN vector) is no result, whatever its sign bit.
    x = np.array([[1.0, 0.0], [np.nan, 0.0], [-np.nan, 1.0], [0.5, 0.5]], np.float32)
    q = np.array([[1.0, 1.0]], np.float32)
    cand = jnp.asarray([[1, 2, 0, 3]], jnp.int32)
    s, i = search.rerank(jnp.asarray(q), jnp.asarray(x), cand, 4, metric)
    want = [3, 0] if metric == "l2" else [0, 3]  # l2: 0.5 < 1.0; ip: 1.0 == 1.0, earlier first
    np.testing.assert_array_equal(i[0], want + [-1, -1])
    assert not np.isnan(s).any()


def _hop_reference(x, q, cand, graph, deleted, k, refine, metric):
    """The float hop (search._hop) in numpy: the candidates' scores, the graph neighbours of
    the best `refine` that are not candidates, and the best k of all (ties to the lower id)."""

    def score(nodes):
        v = x[nodes].astype(np.float64)
        return ((v - q) ** 2).sum(-1) if metric == "l2" else -(v @ q)

    ok = lambda n: n[(n >= 0) & ~deleted[np.maximum(n, 0)]]  # noqa: E731
    listed = ok(cand)
    parents = listed[np.lexsort((listed, score(listed)))][:refine]
    hop = np.unique(graph[parents].ravel())
    nodes = np.concatenate([listed, ok(np.setdiff1d(hop[hop >= 0], cand))])
    return nodes[np.lexsort((nodes, score(nodes)))][:k]


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("refine", [1, 3, 8])
@pytest.mark.parametrize("pairs", [False, True])
def test_float_hop_scores_the_best_candidates_neighbours(metric, refine, pairs, monkeypatch):
    # Random graph rows (with missing edges, and neighbours that are candidates already, are
    # deleted, or repeat across parents): the rerank returns numpy's best k of the candidates
    # and the hop's new nodes, each once, in chunks of queries too, with the walk's list as
    # one key or as Pairs.
    monkeypatch.setattr(search, "_RERANK_BYTES", 4 * 12 * 8 * 3)  # 3 queries a chunk
    if pairs:
        monkeypatch.setattr(bitonic.KeyLayout, "fits", staticmethod(lambda *a, **k: False))
    rng = np.random.default_rng(refine)
    n, dim, degree, size, k = 60, 8, 6, 12, 10
    x = rng.integers(-3, 4, size=(n, dim)).astype(np.float32)  # ties between nodes
    q = rng.normal(size=(7, dim)).astype(np.float32)
    graph = rng.integers(-1, n, size=(n, degree)).astype(np.int32)
    codes_ = rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32)
    query_codes = rng.integers(0, 2**32, size=(len(q), 2), dtype=np.uint64).astype(np.uint32)
    cand = np.stack([rng.permutation(n)[:size] for _ in q]).astype(np.int32)
    cand[1, 3:] = -1  # a short list
    deleted = np.zeros(n, bool)
    deleted[rng.choice(n, 8, replace=False)] = True
    hop = search.FloatHop(jnp.asarray(graph), jnp.asarray(codes_), jnp.asarray(query_codes), refine)
    s, i = search.rerank(
        jnp.asarray(q), jnp.asarray(x), jnp.asarray(cand), k, metric, jnp.asarray(deleted), hop
    )
    s, i = np.asarray(s), np.asarray(i)
    for row in range(len(q)):
        want = _hop_reference(x, q[row], cand[row], graph, deleted, k, refine, metric)
        np.testing.assert_array_equal(i[row, : len(want)], want)
        assert (i[row, len(want) :] == -1).all()
        v = x[want].astype(np.float64)
        ref = ((v - q[row]) ** 2).sum(-1) if metric == "l2" else v @ q[row]
        np.testing.assert_allclose(s[row, : len(want)], ref, rtol=1e-5)
        assert np.isinf(s[row, len(want) :]).all()


def test_float_hop_finds_what_the_codes_missed(setup):
    # A list too short for k: the hop's neighbours lift recall@k, a search never lists a node
    # twice, and its two programs (the walk's list as sorted keys) give rerank's results.
    x, q, c, qc, g, entries = setup
    truth = exact_topk(x, q, 32)
    found = {}
    for refine in (0, 8):
        config = search.SearchConfig(32, refine=refine, threads=1)
        scores, found[refine] = search.search(q, qc, c, g, x, entries, 32, config=config)
        _assert_each_node_listed_once(found[refine])
    assert recall(found[8], truth) > recall(found[0], truth) + 0.02, (
        recall(found[0], truth),
        recall(found[8], truth),
    )
    config = config.for_codes(len(c))
    cand, _ = search.beam_search(
        *map(jnp.asarray, (qc, c, g, entries)),
        candidates=32,
        width=config.width,
        iterations=config.iterations(),
    )
    hop = search.FloatHop(jnp.asarray(g), jnp.asarray(c), jnp.asarray(qc), 8)
    want_scores, want = search.rerank(jnp.asarray(q), jnp.asarray(x), cand, 32, "l2", hop=hop)
    np.testing.assert_array_equal(found[8], want)
    np.testing.assert_array_equal(scores, want_scores)


def test_float_of_ordered_key_inverts_it():
    x = np.array([-np.inf, -3.5, -1e-30, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    back = search.float_of_ordered_key(search.ordered_key(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(back), x)


def test_ordered_key_keeps_the_float_order():
    # (No subnormals: XLA:CPU compares them as zero, and so ties them with 0 as top_k did.)
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(search.ordered_key(jnp.asarray(x))).astype(np.int64)
    assert (np.diff(keys[[0, 1, 2, 3]]) > 0).all() and keys[3] == keys[4]
    assert (np.diff(keys[4:]) > 0).all() and keys[-1] < 0xFFFFFFFF


def test_recall_at_10_after_rerank(setup):
    x, q, c, qc, g, entries = setup
    truth = exact_topk(x, q, 10)
    _, idx = search.search(q, qc, c, g, x, entries, 10, config=search.SearchConfig(64))
    r = recall(idx, truth)
    assert r >= 0.95, r  # measured 0.99+ (see report)
    _, idx2 = search.search(
        q, qc, c, g, x, entries, 10, config=search.SearchConfig(64, width=2, batch_size=37)
    )
    assert recall(idx2, truth) >= 0.95


@pytest.mark.parametrize("pairs", [False, True])
def test_wide_beams_list_shared_neighbours_once(setup, pairs):
    # Parents' rows share neighbours: the sorted rows keep each entry once, and a wide
    # search lists every node once.
    rng = np.random.default_rng(0)
    layout = bitonic.PairLayout(1) if pairs else bitonic.KeyLayout.for_ids(16, flag=True)
    ids = rng.integers(-1, 16, (32, 5))  # repeats and empties in each column
    keys = layout.pack(jnp.asarray(ids % 3), jnp.asarray(ids))  # an id's distance is its own
    got = bitonic.drop_repeats(bitonic.sort(keys))
    for col in range(5):
        want = sorted({(i % 3, i) for i in ids[:, col] if i >= 0})
        found = np.asarray(layout.ids(got[:, col]))
        np.testing.assert_array_equal(found[: len(want)], [i for _, i in want])
        assert (found[len(want) :] == -1).all()
    _, _, c, qc, g, entries = setup
    ids, _ = search.beam_search_jit(
        jnp.asarray(qc[:50]), c, g, entries, candidates=64, width=4, iterations=20
    )
    _assert_each_node_listed_once(ids)


def test_deleted_never_returned(setup):
    x, q, c, qc, g, entries = setup
    truth = exact_topk(x, q, 10)
    deleted = np.zeros(len(x), bool)
    deleted[truth[:, :5].ravel()] = True  # the 5 best of every query
    _, idx = search.search(q, qc, c, g, x, entries, 10, deleted=deleted)
    assert not deleted[idx[idx >= 0]].any()
    assert (idx >= 0).all()


def test_bad_arguments(setup):
    x, q, c, qc, g, entries = setup
    with pytest.raises(ValueError, match="metric"):
        search.search(q, qc, c, g, x, entries, 10, metric="l1")
    with pytest.raises(ValueError, match="k=100"):
        search.search(q, qc, c, g, x, entries, 100)


@pytest.mark.parametrize(
    "field, value",
    [
        ("candidates", 0),
        ("width", 0),  # (was automatic)
        ("max_iterations", 0),  # (was automatic)
        ("max_iterations", -1),  # (ran no walk at all)
        ("threads", -1),
        ("batch_size", 0),
        ("refine", True),
        ("refine", -1),
        ("candidates", 3.7),
    ],
)
def test_search_config_refuses_what_it_would_misread(field, value):
    with pytest.raises(ValueError, match=f"config.{field}={value!r} must be an int"):
        search.SearchConfig(**{field: value})
    with pytest.raises(ValueError, match="config.walk='tpu'"):
        search.SearchConfig(walk="tpu")


def test_an_index_too_large_for_one_word_keys_searches_with_pairs():
    # 2**23 codes of 256 bits: (distance, id, flag) needs 9 + 23 + 1 bits, so the list holds
    # Pairs (traced only: the arrays would be 8 GB).
    def shapes(n):
        return (
            jax.ShapeDtypeStruct((2, 8), jnp.uint32),
            jax.ShapeDtypeStruct((n, 8), jnp.uint32),
            jax.ShapeDtypeStruct((n, 4), jnp.int32),
            jax.ShapeDtypeStruct((4,), jnp.int32),
        )

    seed = functools.partial(search.seed_list, candidates=8)
    assert isinstance(jax.eval_shape(seed, *shapes(1 << 23)[:2], shapes(1)[3]), bitonic.Pairs)
    assert not isinstance(jax.eval_shape(seed, *shapes(1 << 22)[:2], shapes(1)[3]), bitonic.Pairs)
    ids, dist = jax.eval_shape(
        functools.partial(search.beam_search, candidates=8), *shapes(1 << 23)
    )
    assert ids.shape == dist.shape == (2, 8) and ids.dtype == jnp.int32
    with pytest.raises(ValueError, match="2\\*\\*31"):
        search._layout(jax.ShapeDtypeStruct((1 << 31, 8), jnp.uint32))
    with pytest.raises(ValueError, match="pairs=False"):
        jax.eval_shape(
            functools.partial(search.seed_list, candidates=8, pairs=False),
            *shapes(1 << 23)[:2],
            shapes(1)[3],
        )


class _NoKeys(search.KeyLayout):
    fits = staticmethod(lambda *a, **k: False)


def test_batched_search_with_pair_keys_returns_what_one_word_keys_do(setup, monkeypatch):
    # The whole batched search (the seed and walk programs, threads, rerank) on lists of Pairs,
    # as an index past 2**22 codes runs it.
    x, q, c, qc, g, entries = setup
    run = functools.partial(search.search, q, qc, c, g, x, entries, 10)
    keys = run(config=search.SearchConfig(32, width=2))
    monkeypatch.setattr(search, "KeyLayout", _NoKeys)
    monkeypatch.setattr(search, "_PROGRAMS", collections.OrderedDict())  # not the keys' programs
    assert isinstance(search._layout(c), bitonic.PairLayout)
    pairs = run(config=search.SearchConfig(32, width=2))
    np.testing.assert_array_equal(pairs[1], keys[1])
    np.testing.assert_array_equal(pairs[0], keys[0])


@pytest.mark.parametrize("width", [1, 3])
def test_pair_keys_walk_exactly_as_one_word_keys(setup, width):
    # The two layouts order entries the same, so every list, and every result, is the same.
    x, q, c, qc, g, entries = setup
    args = [jnp.asarray(a) for a in (qc, c, g, entries)]
    run = functools.partial(search.beam_search, *args, candidates=48, width=width, iterations=9)
    keys, pairs = run(pairs=False), run(pairs=True)
    assert isinstance(
        search.seed_list(*args[:2], args[3], candidates=48, pairs=True), bitonic.Pairs
    )
    np.testing.assert_array_equal(pairs[0], keys[0])
    np.testing.assert_array_equal(pairs[1], keys[1])
    assert (np.asarray(keys[0]) >= 0).all()


@pytest.mark.parametrize("width, pairs", [(1, False), (3, True)])
def test_membership_by_binary_search_walks_as_the_compares_do(setup, monkeypatch, width, pairs):
    # From search._LOOKUP_FROM the list's membership test is a binary search of the sorted list
    # instead of a compare with every entry: the same neighbours are dropped, so every list is
    # the same. Both tests at L=48 (a list of 64) and L=256, where the default switches.
    _, _, c, qc, g, entries = setup
    args = [jnp.asarray(a) for a in (qc[:64], c, g, entries)]
    for candidates in (48, 256):
        results = []
        for lookup_from in (1, 1 << 20):
            monkeypatch.setattr(search, "_LOOKUP_FROM", lookup_from)
            results.append(
                search.beam_search(
                    *args, candidates=candidates, width=width, iterations=12, pairs=pairs
                )
            )
        (ids, dist), (ids_c, dist_c) = results
        np.testing.assert_array_equal(ids, ids_c)
        np.testing.assert_array_equal(dist, dist_c)
        _assert_each_node_listed_once(ids)
        assert (np.asarray(ids)[:, :48] >= 0).all()


@pytest.mark.parametrize("candidates, width", [(24, 1), (48, 3), (256, 2)])
def test_fused_walk_lists_what_the_xla_walk_does(setup, candidates, width):
    # The Pallas kernel (interpreted here) from the same start lists, on a graph the index's
    # build made: the same lists, bit for bit, also where the XLA walk tests membership by a
    # binary search (L=256) and where wide beams share neighbours.
    _, _, c, qc, g, entries = setup
    args = [jnp.asarray(a) for a in (qc[:12], c, g)]
    top = search.seed_list(args[0], args[1], jnp.asarray(entries), candidates=candidates)
    run = functools.partial(
        search.walk, *args, top, candidates=candidates, width=width, iterations=10
    )
    (ids, dist), (ids_f, dist_f) = run(), run(fused=True)
    np.testing.assert_array_equal(ids_f, ids)
    np.testing.assert_array_equal(dist_f, dist)
    assert (np.asarray(ids)[:, :24] >= 0).all()


def test_search_with_the_fused_walk(setup):
    x, q, c, qc, g, entries = setup
    run = functools.partial(search.search, q[:9], qc[:9], c, g, x, entries, 10)
    xla = run(config=search.SearchConfig(32))
    fused = run(config=search.SearchConfig(32, walk="fused"))
    np.testing.assert_array_equal(fused[1], xla[1])
    np.testing.assert_array_equal(fused[0], xla[0])
    with pytest.raises(ValueError, match="config.walk"):
        run(config=search.SearchConfig(32, walk="kernel"))


def test_threads_give_the_same_results(setup, monkeypatch):
    x, q, c, qc, g, entries = setup
    monkeypatch.setattr(search, "_THREAD_MIN_SLOTS", 1)  # split even these 200 queries
    assert search.thread_count(len(q), search.SearchConfig(32, threads=2), cpu=True) == 2
    one = search.search(q, qc, c, g, x, entries, 10, config=search.SearchConfig(32, threads=1))
    two = search.search(
        q, qc, c, g, x, entries, 10, config=search.SearchConfig(32, threads=2, batch_size=64)
    )
    np.testing.assert_array_equal(one[1], two[1])
    np.testing.assert_array_equal(one[0], two[0])
    # One thread, 13 batches dispatched ahead of the one waited for: the same, in order.
    many = search.search(
        q, qc, c, g, x, entries, 10, config=search.SearchConfig(32, threads=1, batch_size=16)
    )
    np.testing.assert_array_equal(many[1], one[1])
    np.testing.assert_allclose(many[0], one[0], rtol=1e-6)


def test_small_searches_run_on_one_thread_and_accelerators_always_do():
    count = search.thread_count
    assert count(200, search.SearchConfig(32, threads=2), cpu=True) == 1  # 6400 slots
    assert count(1000, search.SearchConfig(32, threads=2), cpu=True) == 2
    assert count(100, search.SearchConfig(128, threads=4), cpu=True) == 1
    assert count(10_000, search.SearchConfig(128, threads=4), cpu=True) == 4
    assert count(10_000, search.SearchConfig(128, threads=4), cpu=False) == 1


def test_lru_program_makes_room_before_compiling():
    # A compilation's peak should not stand on the program it is about to evict.
    cache, lock = collections.OrderedDict(), threading.Lock()
    seen = []

    def compile_fn(name):
        seen.append((name, list(cache)))
        return name

    for name in ("a", "b", "a", "c"):
        assert search.lru_program(cache, lock, 2, name, lambda n=name: compile_fn(n)) == name
    assert seen == [("a", []), ("b", ["a"]), ("c", ["a"])]  # "b", least recent, went first
    assert list(cache) == ["a", "c"]


def test_search_keeps_only_the_latest_compiled_programs(setup, monkeypatch):
    # A compiled search program holds 10-20 MB; a sweep over list sizes must not keep them all
    # (jax.jit's own caches would), and an evicted program gives the same results when the
    # shape comes back (compiled again). These 2000 codes count as a large index here.
    x, q, c, qc, g, entries = setup
    assert search.programs_kept(len(x)) == search.SMALL_INDEX_SEARCH_PROGRAMS
    assert search.programs_kept(search.LARGE_INDEX) == search.SEARCH_PROGRAMS
    monkeypatch.setattr(search, "LARGE_INDEX", len(x))
    run = lambda cand: search.search(  # noqa: E731
        q, qc, c, g, x, entries, 10, config=search.SearchConfig(cand, threads=1)
    )
    first = run(16)
    gc.collect()
    cached = pxla._cached_compilation.cache_info().currsize
    for cand in (24, 32, 40):
        run(cand)
        assert len(search._PROGRAMS) == search.SEARCH_PROGRAMS
        gc.collect()  # jax's caches hold none of them (weak keys: gone with the trace)
        assert pxla._cached_compilation.cache_info().currsize <= cached
    assert all(dict(key[-1])["candidates"] != 16 for key in search._PROGRAMS)
    again = run(16)
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], again[0])


def test_query_counts_in_one_batch_bucket_share_a_program(setup):
    # Counts 17 to 20 run on one compiled program (batch_rows: 20 rows), and a query's results
    # do not depend on the queries searched with it (the padding, the other rows).
    x, q, c, qc, g, entries = setup
    config = search.SearchConfig(32, threads=1)
    full = search.search(q, qc, c, g, x, entries, 10, config=config)
    search._PROGRAMS.clear()
    for m in (17, 18, 20, 19):
        scores, idx = search.search(q[:m], qc[:m], c, g, x, entries, 10, config=config)
        np.testing.assert_array_equal(idx, full[1][:m])
        np.testing.assert_allclose(scores, full[0][:m], rtol=1e-6)
    assert len(search._PROGRAMS) == 1
    rows = (0, 1, 3, 16, 17, 20, 21, 32, 33, 200, 257, 1000)
    assert [search.batch_rows(r) for r in rows] == [1, 1, 4, 16, 20, 20, 24, 32, 36, 208, 288, 1056]
    assert all(search.batch_rows(r) % 64 for r in range(1, 5000))
    assert search.query_batches(1025, 1024, 1) == (513, 544)  # two even batches
    assert search.query_batches(1000, 1024, 2) == (500, 544)


def test_queries_encoded_inside_the_program_match_codes_given(setup):
    x, q, c, qc, g, entries = setup
    binarizer = codes.fit_itq(x, 256, iterations=20, rng=jax.random.key(0))  # setup's
    np.testing.assert_array_equal(codes.encode(binarizer, q), qc)
    given = search.search(q, qc, c, g, x, entries, 10)
    encoded = search.search(q, binarizer, c, g, x, entries, 10)
    np.testing.assert_array_equal(encoded[1], given[1])
    np.testing.assert_array_equal(encoded[0], given[0])
    with pytest.raises(ValueError, match=r"queries.shape=\(200, 32\) must be \[Q, 64\]"):
        search.search(q[:, :32], binarizer, c, g, x, entries, 10)
