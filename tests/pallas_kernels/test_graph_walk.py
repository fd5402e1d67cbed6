"""The fused graph walk against a per-query numpy walk (python sets and sorts), and its jnp
reference against the same; both merges, ragged query blocks, widths whose neighbour slots are
not a power of two, graph rows with missing edges and repeated ids, lists with empty slots.

Each kernel test class runs twice: interpret=True on CPU, and compiled on a GPU.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.graph_walk import (
    GATHERS,
    MERGES,
    SENTINEL,
    GraphWalkConfig,
    default_config,
    graph_walk,
    graph_walk_reference,
)


def popcount(x):
    return np.unpackbits(np.ascontiguousarray(x).view(np.uint8), axis=-1).sum(-1)


def np_walk(query_codes, codes, graph, start, *, width, iterations, id_bits):
    """One query at a time, until it has nothing left to expand or the cap: the walk as the
    kernel's docstring states it, with python ints for keys."""
    size = start.shape[1]
    limit = (1 << (31 - id_bits)) - 1
    out = []
    for qc, keys in zip(query_codes, start):
        keys = [int(k) for k in keys]
        pending = []
        for _ in range(iterations + 1):
            if not pending and all(k & 1 for k in keys):
                break
            listed = {k >> 1 for k in keys}
            new = []
            for node in pending:
                if node < 0:
                    continue
                d = int(popcount(codes[node] ^ qc))
                key = d << (id_bits + 1) | node << 1 if d < limit else int(SENTINEL)
                if key < keys[-1] and key >> 1 not in listed and not (width > 1 and key in new):
                    new.append(key)
            keys = sorted(keys + new)[:size]
            pending = []
            unexpanded = sorted({k for k in keys if not k & 1})  # a key listed twice: one parent
            for parent in unexpanded[:width]:
                keys = [k | 1 if k == parent else k for k in keys]  # each copy of it
                pending += [int(v) for v in graph[(parent >> 1) & ((1 << id_bits) - 1)]]
        out.append(keys)
    return np.array(out, np.uint32)


def make_case(rng, n, w, r, q, size, entries, *, repeats=False):
    """(query_codes, codes, graph, start, id_bits): random codes; a graph with ~10% missing
    edges (and, with repeats, ids repeated within rows); start lists of the `entries` nearest
    of a random entry sample, sorted, SENTINEL-padded when entries < size."""
    codes = rng.integers(0, 2**32, (n, w), dtype=np.uint32)
    query_codes = rng.integers(0, 2**32, (q, w), dtype=np.uint32)
    graph = rng.integers(0, n, (n, r)).astype(np.int32)
    graph[rng.random((n, r)) < 0.1] = -1
    if repeats:
        graph[:, -1] = graph[:, 0]
    id_bits = max(1, (n - 1).bit_length())
    sample = rng.choice(n, entries, replace=False)
    d = popcount(codes[sample][None, :, :] ^ query_codes[:, None, :])
    keys = np.sort((d.astype(np.uint32) << (id_bits + 1)) | (sample.astype(np.uint32) << 1), 1)
    start = np.full((q, size), SENTINEL, np.uint32)
    start[:, : min(size, entries)] = keys[:, :size]
    return query_codes, codes, graph, start, id_bits


# (n, W, R, Q, L, entries, width, iterations, block_q, repeated ids)
CASES = [
    (300, 8, 6, 5, 16, 40, 1, 8, 2, False),  # Q ragged in its blocks
    (300, 8, 6, 6, 16, 40, 2, 8, 1, False),  # two parents: neighbour repeats across rows
    (300, 3, 6, 7, 32, 20, 3, 20, 4, True),  # 18 neighbour slots (not a power of two)
    (500, 8, 8, 4, 8, 30, 1, 40, 1, True),  # repeated ids in one parent's row
    (200, 1, 5, 3, 8, 5, 2, 0, 2, False),  # no iterations after the first; empty slots
]


# On a GPU: ragged query blocks, a width whose slots are padded, repeated ids, empty slots.
GPU_CASES = (0, 2, 3, 4)


def test_reference_equals_the_numpy_walk():
    rng = np.random.default_rng(0)
    for n, w, r, q, size, entries, width, iterations, _, repeats in CASES:
        qc, codes, graph, start, id_bits = make_case(
            rng, n, w, r, q, size, entries, repeats=repeats
        )
        kw = dict(width=width, iterations=iterations, id_bits=id_bits)
        want = np_walk(qc, codes, graph, start, **kw)
        got = graph_walk_reference(qc, codes, graph, start, **kw)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{n=} {width=}")
        assert (want[:, 0] != SENTINEL).all()  # the walks found something
        assert not (want == start).all()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 120),
    w=st.sampled_from([1, 2, 4]),
    r=st.integers(1, 9),
    q=st.integers(1, 5),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    entries=st.integers(1, 40),
    width=st.integers(1, 4),
    iterations=st.integers(0, 30),
    block_q=st.sampled_from([1, 2, 4]),
    merge=st.sampled_from(MERGES),
    gather=st.sampled_from(GATHERS),
    seed=st.integers(0, 2**16),
)
def test_any_shape_walks_as_numpy(
    n, w, r, q, size, entries, width, iterations, block_q, merge, gather, seed
):
    # Down to one code, one edge, one list slot; a width up to the list; graphs with missing
    # edges and repeats; lists with more slots than entries.
    width = min(width, size)
    rng = np.random.default_rng(seed)
    qc, codes, graph, start, id_bits = make_case(
        rng, n, w, r, q, size, min(entries, n), repeats=bool(seed % 2)
    )
    kw = dict(width=width, iterations=iterations, id_bits=id_bits)
    config = GraphWalkConfig(block_q=block_q, merge=merge, gather=gather)
    got = graph_walk(qc, codes, graph, start, **kw, config=config, interpret=True)
    np.testing.assert_array_equal(np.asarray(got), np_walk(qc, codes, graph, start, **kw))


class GraphWalkTests:
    interpret: bool

    @pytest.mark.parametrize("merge", MERGES)
    @pytest.mark.parametrize("case", range(len(CASES)))
    def test_equals_the_numpy_walk(self, case, merge):
        if not self.interpret and case not in GPU_CASES:
            pytest.skip("a GPU session's minutes: each case compiles two kernels")
        self.check_case(case, merge=merge)

    @pytest.mark.parametrize("merge", MERGES)
    @pytest.mark.parametrize("case", [0, 1, 3])
    def test_codes_gathered_as_rows(self, case, merge):
        if not self.interpret and case != 0:
            pytest.skip("a GPU session's minutes: each case compiles two kernels")
        self.check_case(case, merge=merge, gather="rows")

    def check_case(self, case, **config):
        """CASES[case] walked by the kernel in this config equals the numpy walk."""
        n, w, r, q, size, entries, width, iterations, block_q, repeats = CASES[case]
        rng = np.random.default_rng(n + q)
        qc, codes, graph, start, id_bits = make_case(
            rng, n, w, r, q, size, entries, repeats=repeats
        )
        kw = dict(width=width, iterations=iterations, id_bits=id_bits)
        want = np_walk(qc, codes, graph, start, **kw)
        config = GraphWalkConfig(block_q=block_q, **config)
        got = graph_walk(qc, codes, graph, start, **kw, config=config, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{case=} {config=}")

    @pytest.mark.parametrize(
        "size,width,merge,gather",
        [(128, 1, "scatter", "rows"), (128, 2, "select", "words"), (256, 2, "scatter", "words")],
    )
    def test_the_benchmarks_shapes(self, size, width, merge, gather):
        # Lists of 128-256 over rows of 32 edges and 256-bit codes, as the 1M benchmark walks
        # them (the GPU's only run of these register-heavy shapes before the benchmark).
        rng = np.random.default_rng(size + width)
        qc, codes, graph, start, id_bits = make_case(rng, 3000, 8, 32, 3, size, 400)
        kw = dict(width=width, iterations=12, id_bits=id_bits)
        config = GraphWalkConfig(merge=merge, gather=gather, num_warps=2)
        got = graph_walk(qc, codes, graph, start, **kw, config=config, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(got), np_walk(qc, codes, graph, start, **kw))

    def test_keys_past_2_to_the_31(self):
        # id_bits 22 and 384-bit codes: keys of distance >= 256 have the top bit set. Twenty
        # codes are ~192 from the queries, the rest ~315, so lists of 32 hold both kinds, and
        # a signed compare or shift anywhere would put the far ones first.
        rng = np.random.default_rng(4)
        n, w = 500, 12
        ones = np.where(np.arange(n) < 20, 0.5, 0.9)[:, None]
        codes = np.packbits(rng.random((n, 32 * w)) < ones, axis=1, bitorder="little")
        queries = np.packbits(rng.random((3, 32 * w)) < 0.1, axis=1, bitorder="little")
        codes, queries = codes.view("<u4"), queries.view("<u4")
        graph = rng.integers(0, n, (n, 8)).astype(np.int32)
        sample = np.concatenate([[0, 1, 2], rng.choice(np.arange(20, n), 37, replace=False)])
        d = popcount(codes[sample][None] ^ queries[:, None])
        start = np.sort((d.astype(np.uint32) << 23) | (sample.astype(np.uint32) << 1), 1)[:, :32]
        assert (start >= 2**31).any() and (start < 2**31).any()
        kw = dict(width=2, iterations=10, id_bits=22)
        want = np_walk(queries, codes, graph, start, **kw)
        got = graph_walk(queries, codes, graph, start, **kw, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(got), want)
        assert not (want == start).all() and (want >= 2**31).any() and (want < 2**31).any()

    def test_default_config(self):
        rng = np.random.default_rng(1)
        qc, codes, graph, start, id_bits = make_case(rng, 400, 8, 8, 3, 32, 64)
        kw = dict(width=1, iterations=12, id_bits=id_bits)
        got = graph_walk(qc, codes, graph, start, **kw, interpret=self.interpret)
        np.testing.assert_array_equal(np.asarray(got), np_walk(qc, codes, graph, start, **kw))


class TestGraphWalkInterpret(GraphWalkTests):
    interpret = True


@pytest.mark.gpu
class TestGraphWalkGpu(GraphWalkTests):
    interpret = False


class TestValidation:
    def args(self):
        rng = np.random.default_rng(2)
        return make_case(rng, 100, 4, 6, 3, 8, 20)

    def test_bad_operands_are_named(self):
        qc, codes, graph, start, id_bits = self.args()
        kw = dict(width=1, iterations=4, id_bits=id_bits)
        cases = [
            ("query_codes", (qc.astype(np.int32), codes, graph, start), kw),
            ("codes", (qc, codes[:, :3], graph, start), kw),
            ("graph", (qc, codes, graph[:50], start), kw),
            ("graph", (qc, codes, graph.astype(np.float32), start), kw),
            ("start", (qc, codes, graph, start[:, :6]), kw),
            ("start", (qc, codes, graph, start[:2]), kw),
            ("width", (qc, codes, graph, start), dict(kw, width=0)),
            ("width", (qc, codes, graph, start), dict(kw, width=9)),
            ("iterations", (qc, codes, graph, start), dict(kw, iterations=-1)),
            ("id_bits", (qc, codes, graph, start), dict(kw, id_bits=6)),
            ("id_bits", (qc, codes, graph, start), dict(kw, id_bits=24)),
        ]
        for name, operands, kwargs in cases:
            for fn in (functools.partial(graph_walk, interpret=True), graph_walk_reference):
                with pytest.raises(ValueError, match=name):
                    fn(*(jnp.asarray(x) for x in operands), **kwargs)

    def test_bad_configs_are_named(self):
        qc, codes, graph, start, id_bits = self.args()
        kw = dict(width=1, iterations=4, id_bits=id_bits, interpret=True)
        for config, name in [
            (GraphWalkConfig(block_q=3), "block_q"),
            (GraphWalkConfig(num_warps=6), "num_warps"),
            (GraphWalkConfig(merge="sort"), "merge"),
            (GraphWalkConfig(gather="cols"), "gather"),
        ]:
            with pytest.raises(ValueError, match=name):
                graph_walk(qc, codes, graph, start, **kw, config=config)

    def test_rows_gather_needs_power_of_two_words(self):
        qc, codes, graph, start, id_bits = make_case(np.random.default_rng(3), 100, 3, 6, 3, 8, 20)
        with pytest.raises(ValueError, match="config.gather='rows'.* 3"):
            graph_walk(
                *(jnp.asarray(x) for x in (qc, codes, graph, start)),
                width=1,
                iterations=4,
                id_bits=id_bits,
                config=GraphWalkConfig(gather="rows"),
                interpret=True,
            )

    @pytest.mark.parametrize("words,gather", [(8, "rows"), (4, "rows"), (3, "words")])
    @pytest.mark.parametrize(
        "size,fresh,warps", [(32, 32, 2), (64, 32, 2), (128, 32, 2), (128, 64, 4), (128, 128, 8),
                             (256, 64, 8), (512, 128, 16), (1024, 256, 16), (128, 18, 2)]
    )  # fmt: skip
    def test_default_config(self, words, gather, size, fresh, warps):
        # Warps for ~64 elements a thread of the merge's [L, F] compares (ptxas's registers).
        config = default_config(10_000, size, fresh, words)
        config.validate()
        assert (config.merge, config.gather, config.num_warps) == ("scatter", gather, warps)

    @pytest.mark.parametrize("merge", MERGES)
    @pytest.mark.parametrize("gather", GATHERS)
    def test_lowers_for_cuda(self, merge, gather):
        """Pallas-Triton lowers in Python: what it cannot lower fails here on CPU, not in a GPU
        session. 1M codes of 256 bits, degree 32, a batch of 10000 queries."""
        spec = jax.ShapeDtypeStruct
        for size, width in [(64, 1), (128, 2)]:
            fn = functools.partial(
                graph_walk,
                width=width,
                iterations=36,
                id_bits=20,
                config=GraphWalkConfig(merge=merge, gather=gather),
            )
            operands = (
                spec((10_000, 8), jnp.uint32),
                spec((1 << 20, 8), jnp.uint32),
                spec((1 << 20, 32), jnp.int32),
                spec((10_000, size), jnp.uint32),
            )
            text = jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",)).as_text()
            assert "triton" in text
