"""alijax.ann.index: build / search / add / delete / compact / save / load, input checks, and
the command line."""

import argparse
import json
import os
import signal
import sys
import threading

import numpy as np
import pytest

from alijax.ann import cli
from alijax.ann import codes as codes_lib
from alijax.ann import graph as graph_lib
from alijax.ann import index as index_lib
from alijax.ann import search as search_lib
from alijax.ann.index import BinaryGraphIndex
from alijax.data.files import FormatError
from alijax.data.vecs import read_ivecs, write_fvecs, write_ivecs
from alijax.parallel import run_local_processes
from tests.ann.test_codes import clustered
from tests.ann.test_search import exact_topk, recall

N = 2000


@pytest.fixture(scope="module")
def data():
    allx = clustered(seed=7, n=N + 400, dim=64, clusters=20)
    return allx[:N], allx[N : N + 200], allx[N + 200 :]  # base, queries, to add


@pytest.fixture(scope="module")
def built(data):
    x, _, _ = data
    return BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x, ids=np.arange(N) * 3)


def test_search_returns_user_ids_and_l2_scores(data, built):
    x, q, _ = data
    scores, ids = built.search(q, 10)
    truth = exact_topk(x, q, 10) * 3
    assert recall(ids, truth) >= 0.95  # measured 0.99+
    x16 = x.astype(np.float16).astype(np.float32)  # the default stored rerank vectors
    want = ((x16[ids // 3] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    assert (np.diff(scores, axis=1) >= 0).all()


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_similarity_metrics(data, metric):
    x, q, _ = data
    index = BinaryGraphIndex(bits=128, degree=16, metric=metric, binarizer="lsh").build(x)
    scores, ids = index.search(q, 10, candidates=128)
    xx, qq = (
        (x, q)
        if metric == "ip"
        else (
            x / np.linalg.norm(x, axis=1, keepdims=True),
            q / np.linalg.norm(q, axis=1, keepdims=True),
        )
    )
    assert recall(ids, exact_topk(xx, qq, 10, "ip")) >= 0.8  # ip is not what codes preserve
    assert (np.diff(scores, axis=1) <= 0).all()


def test_add_delete_compact_and_save_load(data, tmp_path):
    x, q, xa = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    new_ids = np.arange(len(xa)) + 10_000
    index.add(xa, new_ids)
    walks = [key for key in index_lib._add_programs if key[0] == "beam_search"]
    shapes = [key[2][2][0] for key in walks]  # the graphs' [cap, R]
    assert (index_lib._capacity(len(index.ids)), 16) in shapes  # this add's walk is kept
    assert len(index_lib._add_programs) <= index_lib._ADD_PROGRAMS
    _, found = index.search(xa, 1)
    assert (found[:, 0] == new_ids).mean() >= 0.95  # measured 1.0
    all_x = np.concatenate([x, xa])
    all_ids = np.concatenate([np.arange(N), new_ids])
    assert recall(index.search(q, 10)[1], all_ids[exact_topk(all_x, q, 10)]) >= 0.95

    gone = all_ids[exact_topk(all_x, q, 3).ravel()]  # the 3 best of every query
    index.delete(gone)
    _, ids = index.search(q, 10)
    assert not np.isin(ids, gone).any()
    _, ids = index.search(q, 10, candidates=16, refine=8)  # the hop meets deleted nodes too
    assert not np.isin(ids, gone).any() and (ids >= 0).all()
    assert len(index) == len(all_ids) - len(np.unique(gone))

    index.save(tmp_path / "ix")
    loaded = BinaryGraphIndex.load(tmp_path / "ix")
    s1, i1 = index.search(q, 10)
    s2, i2 = loaded.search(q, 10)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)

    index.compact()
    live = ~np.isin(all_ids, gone)
    _, ids = index.search(q, 10)
    assert not np.isin(ids, gone).any()
    assert recall(ids, all_ids[live][exact_topk(all_x[live], q, 10)]) >= 0.95
    assert len(index.graph) == live.sum() and (index.graph < live.sum()).all()


def test_add_in_batches_links_later_batches_to_earlier(data, monkeypatch):
    # Batches of 64 points (4096 by default) and edit blocks of 96 rows (a ragged last one):
    # the 200 new points go in as 4 batches, each searching the graph with the earlier ones
    # in it. They are found, reached through in-edges, and later batches link to earlier.
    x, q, xa = data
    monkeypatch.setattr(index_lib, "_ADD_BATCH", 64)
    monkeypatch.setattr(index_lib, "_EDIT_ROWS", 96)
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    index.add(xa, np.arange(len(xa)) + N)
    _, found = index.search(xa, 1)
    assert (found[:, 0] == np.arange(len(xa)) + N).mean() >= 0.95  # measured 1.0
    all_x = np.concatenate([x, xa])
    assert recall(index.search(q, 10)[1], exact_topk(all_x, q, 10)) >= 0.95
    new_rows = index.graph[N:]
    assert np.isin(np.arange(N, N + len(xa)), index.graph[:N]).mean() >= 0.9  # in-edges
    last = new_rows[192:]  # the 4th batch's rows
    assert ((last >= N) & (last < N + 192)).any(axis=1).mean() >= 0.5  # earlier batches
    assert index.graph.shape == (N + len(xa), 16) and index.codes.shape[0] == N + len(xa)


def test_search_after_small_adds_reuses_its_program(data):
    # After an add the search arrays are padded to the add's capacity, so a second small add
    # within it leaves the search's compiled shapes as they were; the new points are found.
    x, q, xa = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    index.add(xa[:10], np.arange(10) + N)
    index.search(q, 10)
    programs = set(search_lib._PROGRAMS)
    index.add(xa[10:20], np.arange(10, 20) + N)
    index.delete([N + 3])
    index.search(q, 10)
    assert set(search_lib._PROGRAMS) == programs
    scores, ids = index.search(xa[:20], 1)
    assert index.vectors.shape[0] == index.codes.shape[0] == N + 20
    want = np.arange(20) + N
    assert (ids[:, 0] == want)[want != N + 3].mean() >= 0.95  # measured 1.0
    assert (ids != N + 3).all() and np.isfinite(scores).all()


def test_adds_update_the_device_arrays_in_place(data):
    # A second add within the capacity writes into the first add's device buffers (no copy of
    # the index); a view of the graph that someone still holds is left as it was (jax copies
    # a buffer that a view pins instead of updating it).
    x, q, xa = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    index.add(xa[:10], np.arange(10) + N)
    pointers = {k: v[1].unsafe_buffer_pointer() for k, v in index._device_cache.items()}
    index.add(xa[10:20], np.arange(10, 20) + N)
    for name in index_lib._ROW_ARRAYS:
        assert index._device_cache[name][1].unsafe_buffer_pointer() == pointers[name], name
    held = index.graph
    before = held.copy()
    index.add(xa[20:30], np.arange(20, 30) + N)
    np.testing.assert_array_equal(held, before)
    assert index.graph.shape == (N + 30, 16) and (index.graph[: N + 20] != before).any()
    _, found = index.search(xa[:30], 1)
    assert (found[:, 0] == np.arange(30) + N).mean() >= 0.95  # measured 1.0


@pytest.mark.parametrize("fail", [("_prune_rows", 2), ("_link_back", 2), ("_set_rows", 8)])
def test_failed_add_keeps_the_finished_batches(data, monkeypatch, fail):
    # An error in the second of three batches -- before its rows are made, before its links
    # back, or in writing them (_set_rows' calls: codes, vectors, then per batch its rows,
    # deleted flags, links back) -- leaves the first batch's points in and linked, no edge to
    # the rest, padding rows clean, and the index searching and taking adds as before.
    x, q, xa = data
    monkeypatch.setattr(index_lib, "_ADD_BATCH", 64)
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    name, when = fail
    real, calls = getattr(index_lib, name), []

    def failing(*args):
        calls.append(1)
        if len(calls) == when:
            raise RuntimeError("interrupted")
        return real(*args)

    monkeypatch.setattr(index_lib, name, failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        index.add(xa[:150], np.arange(150) + N)
    assert len(index.ids) == index.graph.shape[0] == index.vectors.shape[0] == N + 64
    assert index.graph.max() < N + 64 and not index.deleted.any()
    padding = index_lib._host_view(index._device_cache["graph"][1])[N + 64 :]
    assert (padding == -1).all()
    assert index_lib._host_view(index._device_cache["deleted"][1])[N + 64 :].all()
    _, found = index.search(xa[:64], 1)
    assert (found[:, 0] == np.arange(64) + N).mean() >= 0.95  # measured 1.0
    monkeypatch.setattr(index_lib, name, real)
    index.add(xa[64:150], np.arange(64, 150) + N)
    _, found = index.search(xa[:150], 1)
    assert (found[:, 0] == np.arange(150) + N).mean() >= 0.95
    assert index.compact() is index and index.graph.max() < N + 150


def _state(index) -> dict:
    """Copies of the index's per-node arrays and ids."""
    return {name: np.array(getattr(index, name)) for name in (*index_lib._ROW_ARRAYS, "ids")}


def _assert_same(states: list, found: list) -> None:
    """Two runs' states (_state) and search results [(scores, ids), ...] are equal."""
    for name, want in states[0].items():
        np.testing.assert_array_equal(states[1][name], want, err_msg=name)
    for (s0, i0), (s1, i1) in zip(found[0], found[1]):
        np.testing.assert_array_equal(i1, i0)
        np.testing.assert_array_equal(s1, s0)


def _mirrors_match_the_device(index):
    for name in index_lib._ROW_ARRAYS:
        view, mirror = index._mirrors[name]
        assert view is getattr(index, name) and not view.flags.writeable, name
        np.testing.assert_array_equal(np.asarray(index._device_cache[name][1]), mirror, name)


def _adds_deletes_and_a_failed_add(index, xa, patch, q, mirrored):
    """index after adds within and past its capacity (N = 2000: 2048, then 3072), an add right
    after a delete, an add failing in its second batch's links back, and an add of other points
    than the failed one's; the searches between them. A graph held across an add is unchanged."""
    found = []
    index.add(xa[:10], np.arange(10) + N)
    index.delete([N + 3, 5])
    index.add(xa[10:20], np.arange(10, 20) + N)  # the tombstones' new array, no search between
    index.add(xa[20:60], np.arange(20, 60) + N)  # past the capacity
    found.append(index.search(q, 10))
    real, calls = index_lib._link_back, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args)

    patch.setattr(index_lib, "_link_back", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        index.add(xa[60:200], np.arange(60, 200) + N)
    patch.setattr(index_lib, "_link_back", real)
    if mirrored:
        _mirrors_match_the_device(index)  # the unfinished rows cleared on both sides
    found.append(index.search(q, 10))
    # The graph as handed out, a slice of it, a memoryview: none changes under the next add
    # (adds up to N + 174: rows past them stay padding).
    start = np.array(index.graph)
    holds = ((lambda g: g, 150, 170), (lambda g: g[: N + 100], 170, 185), (memoryview, 185, 200))
    for hold, first, stop in holds:
        held = hold(index.graph)
        before = np.array(held)
        index.add(xa[first:stop], np.arange(first, stop) + N)
        np.testing.assert_array_equal(np.asarray(held), before)
        del held
    assert (index.graph[: len(start)] != start).any()  # linked back to
    found.append(index.search(q, 10))
    return found


def test_adds_off_cpu_write_host_mirrors_and_match_the_cpu_path(data, monkeypatch):
    # Off CPU numpy cannot view the device arrays: add() then writes host mirrors of them
    # beside the device arrays, and copies none back (_host_view would). Forced here on CPU,
    # the index must end as the CPU path's does, each mirror equal to its device array to the
    # last padding row, the host arrays read-only; a mirror is copied only while something
    # outside the index views it.
    x, q, xa = data
    monkeypatch.setattr(index_lib, "_ADD_BATCH", 64)

    def copied_back(device):
        raise AssertionError("a device array copied back to the host")

    states, found = [], []
    for mirrored in (False, True):
        index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
        with monkeypatch.context() as patch:
            if mirrored:
                patch.setattr(index_lib, "_shares_host_memory", lambda device: False)
                patch.setattr(index_lib, "_host_view", copied_back)
            found.append(_adds_deletes_and_a_failed_add(index, xa, patch, q, mirrored))
            states.append(_state(index))
            if mirrored:
                # (ids, not the arrays: holding one here would count as a view from outside)
                kept = {name: id(index._mirrors[name][1]) for name in index_lib._ROW_ARRAYS}
                index.add(xa[124:134], np.arange(124, 134) + N)  # nothing outside holds them
                assert {k: id(index._mirrors[k][1]) for k in kept} == kept
    assert len(states[1]["ids"]) == N + 174 and states[1]["deleted"].sum() == 2
    _assert_same(states, found)
    _mirrors_match_the_device(index)
    with pytest.raises(ValueError):
        index.graph.flags.writeable = True


def _stream_of_small_adds(index, xa, q) -> list:
    """Adds of 1 to 16 points (one after a delete), and the searches after them."""
    start, found = 0, []
    for m in (1, 3, 16, 5, 1, 10):
        index.add(xa[start : start + m], np.arange(start, start + m) + N)
        start += m
        if m == 16:
            index.delete([N, 7])
            found.append(index.search(q, 10))
    found.append(index.search(q, 10))
    return found


def test_small_adds_in_one_program_give_the_general_paths_index(data, monkeypatch):
    # Adds of up to _SMALL_ADD points run as one program (_small_add) that must insert and
    # link them exactly as the general path does: the same arrays bit for bit, the same
    # search results. A failed one leaves the index as it was.
    x, q, xa = data
    states, found, programs = [], [], []
    for small in (16, 0):
        monkeypatch.setattr(index_lib, "_SMALL_ADD", small)
        index_lib._add_programs.clear()
        index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
        found.append(_stream_of_small_adds(index, xa, q))
        states.append(_state(index))
        programs.append({key[0] for key in index_lib._add_programs})
    assert programs == [{"_small_add"}, {"beam_search", "_batch_candidates"}]
    assert len(states[0]["ids"]) == N + 36 and states[0]["deleted"].sum() == 2
    _assert_same(states, found)
    # Linked back: old nodes lead to the new ones.
    assert np.isin(np.arange(N, N + 36), states[0]["graph"][:N]).mean() >= 0.9

    monkeypatch.setattr(index_lib, "_SMALL_ADD", 16)
    before = _state(index)

    def failing(*args, **kwargs):
        raise RuntimeError("failed to compile")

    with monkeypatch.context() as patch:
        patch.setattr(index_lib, "_add_compiled", failing)
        with pytest.raises(RuntimeError, match="failed to compile"):
            index.add(xa[100:104], np.arange(100, 104) + N)
    for name, want in before.items():
        np.testing.assert_array_equal(getattr(index, name), want, err_msg=name)
    index.add(xa[100:104], np.arange(100, 104) + N)
    assert index.search(xa[100:104], 1)[1][:, 0].tolist() == list(np.arange(100, 104) + N)


def _interrupt_after(fn):
    """fn, which sends this process a SIGINT (Ctrl-C) right after it runs: as an interrupt
    inside jax's call of a program that was handed (donated) the index's arrays."""

    def run(*args, **kwargs):
        out = fn(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return out

    return run


def _consistent(index, n: int) -> None:
    """index holds n points, its arrays those rows, and no edge leads past them."""
    assert len(index.ids) == n
    for name in index_lib._ROW_ARRAYS:
        assert getattr(index, name).shape[0] == n, name
        device = index._device_cache[name][1]
        np.testing.assert_array_equal(np.asarray(device)[:n], getattr(index, name), name)
    assert index.graph.max() < n


@pytest.mark.parametrize("mirrored", [False, True])
def test_a_ctrl_c_inside_an_add_leaves_the_index_whole(data, monkeypatch, mirrored):
    # A Ctrl-C landing while a program holds the donated arrays used to empty the index (a
    # small add's whole run on CPU) or leave edges to rows not in it. It is now raised once
    # the arrays are stored: a small add is then in; the general path stops at its last
    # finished batch. Off CPU (mirrored, forced here) a failure between the device's writes
    # and the mirrors' makes the mirrors again from the device.
    x, q, xa = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x)
    monkeypatch.setattr(index_lib, "_ADD_BATCH", 64)
    if mirrored:
        monkeypatch.setattr(index_lib, "_shares_host_memory", lambda device: False)
    index.add(xa[:3], np.arange(3) + N)

    real_compiled = index_lib._add_compiled
    with monkeypatch.context() as patch:
        patch.setattr(
            index_lib, "_add_compiled", lambda *a, **k: _interrupt_after(real_compiled(*a, **k))
        )
        with pytest.raises(KeyboardInterrupt):
            index.add(xa[3:8], np.arange(3, 8) + N)  # small: one program
    _consistent(index, N + 8)

    real_set_rows, writes = index_lib._set_rows, []

    def set_rows(*args):
        writes.append(1)
        return (_interrupt_after if len(writes) == 7 else lambda f: f)(real_set_rows)(*args)

    with monkeypatch.context() as patch:
        patch.setattr(index_lib, "_set_rows", set_rows)
        with pytest.raises(KeyboardInterrupt):  # in the second batch's first graph write
            index.add(xa[8:108], np.arange(8, 108) + N)
    _consistent(index, N + 8 + 64)
    if mirrored:
        _mirrors_match_the_device(index)
        real_write, calls = index_lib._RowArrays.write_mirror, []

        def write_mirror(self, *args):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real_write(self, *args)

        with monkeypatch.context() as patch:
            patch.setattr(index_lib._RowArrays, "write_mirror", write_mirror)
            with pytest.raises(KeyboardInterrupt):
                index.add(xa[108:110], np.arange(108, 110) + N)
        _consistent(index, N + 74)
        _mirrors_match_the_device(index)
    n = len(index.ids)
    index.add(xa[110:120], np.arange(110, 120) + N)
    _consistent(index, n + 10)
    added = index.ids[N:]  # (those of the interrupted batch are not: they were never in)
    assert (
        len(added) == 82 + 2 * mirrored
        and (index.search(xa[added - N], 1)[1][:, 0] == added).mean() >= 0.9
    )


def _updates(index, xa):
    """Adds of 1 and 2 points (all within one capacity), a delete among them, a compact, and
    an add after it."""
    for start in range(0, 45, 3):
        index.add(xa[start : start + 1], [N * 3 + start])
        index.add(xa[start + 1 : start + 3], [N * 3 + start + 1, N * 3 + start + 2])
        if start == 21:
            index.delete([N * 3, 15])
    index.compact()
    index.add(xa[45:50], np.arange(45, 50) + N * 3)


def test_searches_beside_adds_deletes_and_compact_on_other_threads(built, data, tmp_path):
    # add() writes in place the arrays search reads (and donates them), and compact() swaps
    # them all: searches on other threads wait for an update, and an update for the searches
    # in flight. Two threads search throughout; none fails or sees an id never added, and the
    # index ends as the same updates leave it with no searches beside them.
    _, q, xa = data
    built.save(tmp_path / "index")
    alone = BinaryGraphIndex.load(tmp_path / "index")
    _updates(alone, xa)
    shared = BinaryGraphIndex.load(tmp_path / "index")
    known = set(range(0, N * 3, 3)) | set(range(N * 3, N * 3 + 50)) | {-1}
    errors, searches, stop = [], [], threading.Event()

    def search_until_stopped():
        while not stop.is_set():
            try:
                ids = shared.search(q[:20], 10)[1]
                searches.append(set(ids.ravel().tolist()) <= known)
            except Exception as err:  # noqa: BLE001 (reported below)
                errors.append(err)

    shared.search(q[:20], 10)  # (compiled before the threads start)
    threads = [threading.Thread(target=search_until_stopped) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        _updates(shared, xa)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors, errors[:3]
    assert len(searches) >= 30 and all(searches)
    for name in (*index_lib._ROW_ARRAYS, "ids"):
        np.testing.assert_array_equal(getattr(shared, name), getattr(alone, name), err_msg=name)
    np.testing.assert_array_equal(shared.search(q, 10)[1], alone.search(q, 10)[1])


def test_read_write_lock_lets_readers_share_and_a_writer_wait_for_them():
    lock, events = index_lib._ReadWriteLock(), []
    reading, release = threading.Event(), threading.Event()

    def reader(name):
        with lock.reading():
            events.append(f"{name} in")
            reading.set()
            release.wait(5)
            events.append(f"{name} out")

    def writer():
        with lock.writing():
            events.append("writer")

    first = threading.Thread(target=reader, args=("r1",))
    first.start()
    reading.wait(5)
    with lock.reading():  # a second reader beside the first
        events.append("r2")
    waiting = threading.Thread(target=writer)
    waiting.start()
    while not lock._writers_waiting:  # the writer waits for r1
        threading.Event().wait(0.001)
    late = threading.Thread(target=reader, args=("r3",))
    late.start()  # and a reader arriving now waits for the writer
    threading.Event().wait(0.05)
    assert events == ["r1 in", "r2"]
    release.set()
    for thread in (first, waiting, late):
        thread.join(5)
    assert events == ["r1 in", "r2", "r1 out", "writer", "r3 in", "r3 out"]

    # The readers waiting when a writer finishes go before the next writer (a loop of adds
    # does not starve searches).
    events.clear()
    release.clear()

    def holding_writer():
        with lock.writing():
            events.append("w1")
            release.wait(5)

    def second_writer():
        with lock.writing():
            events.append("w2")

    first = threading.Thread(target=holding_writer)
    first.start()
    while not events:
        threading.Event().wait(0.001)
    waiting_reader = threading.Thread(target=reader, args=("r",))
    waiting_reader.start()
    while not lock._readers_waiting:
        threading.Event().wait(0.001)
    waiting_writer = threading.Thread(target=second_writer)
    waiting_writer.start()
    while lock._writers_waiting < 1:
        threading.Event().wait(0.001)
    release.set()
    for thread in (first, waiting_reader, waiting_writer):
        thread.join(5)
    assert events == ["w1", "r in", "r out", "w2"]


def test_batch_candidates_merge_the_walk_and_the_exact_batch_knn():
    # Each point's candidates: its walk's (old nodes, repeats included) and its k_batch nearest
    # among the batch's first `count` rows (exact Hamming, ties to the lower index, no self,
    # padding unused), the out_k best distinct by (distance, id).
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 4, (40, 2)).astype(np.uint32)  # many ties
    count, first, k_batch, out_k = 29, 500, 7, 9
    g_i = rng.integers(-1, 12, (40, 8)).astype(np.int32)
    g_d = np.where(g_i >= 0, (g_i * 7) % 5, graph_lib.BIG).astype(np.int32)  # one per id
    args = (codes, codes, first, 0, count, k_batch, out_k)
    ids, dist = (np.asarray(a) for a in index_lib._batch_candidates(g_i, g_d, *args))
    bits = np.unpackbits(codes[:count].view(np.uint8), axis=1).astype(np.int64)
    d = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    for i in range(count):
        near = [j for j in np.lexsort((np.arange(count), d[i]))[:k_batch] if j != i]
        pairs_i = {(int(d[i, j]), j + first) for j in near}
        pairs_i |= {(int(dd), int(ii)) for ii, dd in zip(g_i[i], g_d[i]) if ii >= 0}
        want = sorted(pairs_i)[:out_k]
        np.testing.assert_array_equal(ids[i], [p[1] for p in want])
        np.testing.assert_array_equal(dist[i], [p[0] for p in want])
    # A part of the batch's rows (as one thread of add() runs it): the same rows' candidates.
    part = index_lib._batch_candidates(
        g_i[8:24], g_d[8:24], codes[8:24], codes, first, 8, count, k_batch, out_k
    )
    np.testing.assert_array_equal(part[0], ids[8:24])
    np.testing.assert_array_equal(part[1], dist[8:24])


def test_edit_blocks_fit_the_rows():
    # Graph edits run in blocks of one of few sizes: 1024 rows, or for fewer rows the next
    # power of two, below 64 the next power of four (an add of 10 points prunes 16 rows, not
    # 1024); every row once. The add's walk parts are likewise powers of four up to 256, on
    # several threads smaller where that walks the points sooner (two parts of 64 for 100).
    assert [index_lib._part_rows(m) for m in (1, 2, 5, 17, 64, 65, 4096)] == [
        1,
        4,
        16,
        64,
        64,
        256,
        256,
    ]
    sizes = (10, 20, 50, 100, 200, 4096)
    assert [index_lib._part_rows(m, 2) for m in sizes] == [16, 16, 64, 64, 256, 256]
    for n, size in ((1, 1), (10, 16), (64, 64), (100, 128), (1024, 1024), (2500, 1024)):
        calls = []

        def one_block(start, stop, rows, calls=calls):
            calls.append((start, stop, rows))
            return np.tile(np.arange(start, start + rows, dtype=np.int32)[:, None], (1, 3))

        out = index_lib._by_blocks(n, 3, one_block)
        assert {c[2] for c in calls} == {size}
        assert sorted(c[:2] for c in calls) == [(s, min(n, s + size)) for s in range(0, n, size)]
        np.testing.assert_array_equal(out[:, 0], np.arange(n))


def test_id_table_finds_ids_across_appends_and_tail_merges(monkeypatch):
    # add() appends ids to a table whose sort order it merges, not sorts again, with a small
    # tail merged into the main order now and then: lookups must find every id at its row
    # (ids of any sign and order), before and after merges, and miss absent ones; views of
    # the ids handed out earlier keep their contents.
    monkeypatch.setattr(index_lib, "_ID_TAIL", 50)
    rng = np.random.default_rng(5)
    ids = rng.choice(np.arange(-(10**9), 10**9, 997), 900, replace=False).astype(np.int64)
    table = index_lib._IdTable(ids[:500])
    shown = []
    for start, stop in ((500, 501), (501, 530), (530, 560), (560, 700), (700, 701), (701, 900)):
        shown.append((table.ids, start))
        out = table.append(ids[start:stop])
        np.testing.assert_array_equal(out, ids[:stop])
        rows, found = table.lookup(np.concatenate([ids[:stop], [1, -3, 10**12]]))
        np.testing.assert_array_equal(found, [True] * stop + [False] * 3)
        np.testing.assert_array_equal(rows[:stop], np.arange(stop))
    for view, n in shown:
        np.testing.assert_array_equal(view, ids[:n])
    assert len(table._tail[0]) < 50  # merged on the way
    with pytest.raises(ValueError):
        table.ids[0] = 1  # read-only: the buffer's rows are the index's


def test_lookup_after_adds(data):
    x, _, xa = data
    index = BinaryGraphIndex(bits=64, degree=8, itq_iterations=5).build(x, ids=np.arange(N)[::-1])
    index.add(xa[:5], [10**6 + 4, -7, 10**6, 3 * N, -2])
    with pytest.raises(ValueError, match="already in the index, e.g. -7"):
        index.add(xa[5:7], [10**7, -7])
    internal, found = index._lookup(np.array([-2, 0, N - 1, 10**6, 5 * N]))
    np.testing.assert_array_equal(found, [True, True, True, True, False])
    np.testing.assert_array_equal(internal[:4], [N + 4, N - 1, 0, N + 2])
    assert index.delete([-7, 0]) == 2


def test_add_capacity_rounds_up_by_a_quarter_or_1024():
    for n in (1, 1000, 1025, 16_384, 100_001, 131_073, 2_000_000):
        cap = index_lib._capacity(n)
        assert n <= cap <= n + max(1024, n // 4)
    assert index_lib._capacity(100_001) == index_lib._capacity(100_100)  # a shared program


def test_corrupt_truncated_and_missing_files_refused(built, tmp_path):
    built.save(tmp_path / "ix")
    graph_path = tmp_path / "ix" / "graph.npy"
    data = bytearray(graph_path.read_bytes())
    data[-5] ^= 0xFF
    graph_path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="graph.npy.*checksum"):
        BinaryGraphIndex.load(tmp_path / "ix")

    built.save(tmp_path / "ix")  # replaces the folder
    BinaryGraphIndex.load(tmp_path / "ix")
    codes_path = tmp_path / "ix" / "codes.npy"
    codes_path.write_bytes(codes_path.read_bytes()[:-10])
    with pytest.raises(FormatError, match="codes.npy.*truncated"):
        BinaryGraphIndex.load(tmp_path / "ix")

    os.remove(tmp_path / "ix" / "manifest.json")
    with pytest.raises(FormatError, match="manifest.json"):
        BinaryGraphIndex.load(tmp_path / "ix")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p or ".old-" in p]


def test_format_versions(data, built, tmp_path):
    # Version 1 files (width 1 stored, the default then) load with their width; an unknown
    # version is refused naming it; this version stores the automatic width as null.
    _, q, _ = data
    built.save(tmp_path / "ix")
    path = tmp_path / "ix" / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["format_version"] == 2 and manifest["params"]["search_config"]["width"] is None
    manifest["format_version"] = 1
    del manifest["params_sha256"]  # (files before it have none)
    manifest["params"]["search_config"]["width"] = 1
    del manifest["params"]["search_config"]["refine"]  # files before the float hop: automatic
    path.write_text(json.dumps(manifest))
    old = BinaryGraphIndex.load(tmp_path / "ix")
    assert old.search_config.width == 1
    np.testing.assert_array_equal(old.search(q, 10)[1], built.search(q, 10)[1])
    manifest["format_version"] = 3
    path.write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="format_version=3"):
        BinaryGraphIndex.load(tmp_path / "ix")


def test_bad_input_refused(data, built):
    x, q, _ = data
    bad = x[:50].copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="vectors holds NaN"):
        BinaryGraphIndex(bits=64).build(bad)
    with pytest.raises(ValueError, match="vectors holds NaN"):
        built.add(bad, np.arange(50) + 10**6)
    with pytest.raises(ValueError, match=r"vectors.shape\[1\]=63"):
        built.add(x[:5, :63], np.arange(5) + 10**6)
    with pytest.raises(ValueError, match=r"queries.shape\[1\]"):
        built.search(q[:, :10], 5)
    with pytest.raises(ValueError, match=r"config.refine=17 must be in 0..16"):
        built.search(q, 5, candidates=16, refine=17)
    with pytest.raises(ValueError, match=r"config.refine=-1"):
        built.search(q, 5, candidates=16, refine=-1)
    with pytest.raises(ValueError, match=r"config.candidates=0 must be an int >= 1"):
        built.search(q, 5, candidates=0)  # (ran with the default 64)
    with pytest.raises(ValueError, match=r"candidates=3.7 must be an int or None"):
        built.search(q, 5, candidates=3.7)  # (ran as 3)
    with pytest.raises(ValueError, match=r"config.width=0 must be an int >= 1"):
        built.search(q, 5, width=0)  # (ran as automatic)
    with pytest.raises(ValueError, match="ids holds duplicates"):
        BinaryGraphIndex(bits=64).build(x[:10], ids=[1] * 10)
    with pytest.raises(ValueError, match="already in the index"):
        built.add(x[:2], [0, 3])
    with pytest.raises(ValueError, match="not in the index"):
        built.delete([1])  # ids are multiples of 3
    with pytest.raises(ValueError, match="bits"):
        BinaryGraphIndex(bits=48)
    with pytest.raises(ValueError, match="metric"):
        BinaryGraphIndex(metric="hamming")


def test_ids_checked_at_delete_and_add(data):
    x, q, _ = data
    index = BinaryGraphIndex(bits=64, itq_iterations=5).build(x[:50], ids=np.arange(50) + 10)
    with pytest.raises(ValueError, match="ids.dtype=float64 must be integer"):
        index.delete([13.7])  # (was: id 13 deleted)
    with pytest.raises(ValueError, match="ids.dtype=<U2 must be integer"):
        index.delete(["15"])
    assert index.delete([17, 17, 18]) == 2  # an id given twice counts once
    assert index.delete(np.array([17], np.uint8)) == 0
    with pytest.raises(ValueError, match="17 was deleted.*compact"):
        index.add(x[:1], [17])
    index.compact()
    index.add(x[50:51], [17])  # once compacted, the id is free
    assert index.search(x[50:51], 1)[1][0, 0] == 17
    with pytest.raises(ValueError, match="past int64's range"):
        BinaryGraphIndex(bits=64).build(x[:3], ids=np.array([2**64 - 1, 2**63, 5], np.uint64))
    with pytest.raises(ValueError, match="holds -1"):
        BinaryGraphIndex(bits=64).build(x[:3], ids=[4, -1, 5])
    big = np.array([2**63 - 1, 0, 7], np.uint64)  # uint64 within int64's range: kept
    assert BinaryGraphIndex(bits=64).build(x[:3], ids=big).ids.tolist() == [2**63 - 1, 0, 7]


def test_queries_and_vectors_checked(data):
    x, q, _ = data
    index = BinaryGraphIndex(bits=64, itq_iterations=5).build(x[:50])
    scores, ids = index.search(q[:0], 5)  # no queries: no results
    assert scores.shape == ids.shape == (0, 5) and ids.dtype == np.int64
    with pytest.raises(ValueError, match="queries.dtype=complex64 must be a real float"):
        index.search(q[:2].astype(np.complex64), 5)
    huge = x[:5].astype(np.float64)
    huge[2, 0] = 1e300
    with pytest.raises(ValueError, match="NaN or Inf \\(or values beyond float32's range\\)"):
        index.search(huge, 5)
    # A build fits the binarizer anew: another dimension is another index, not an error.
    index.build(x[:50, :16])
    assert index.dim == 16 and index.search(x[:3, :16], 1)[1][:, 0].tolist() == [0, 1, 2]


def test_save_keeps_a_folder_that_is_not_an_index(built, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("a researcher's notes")
    with pytest.raises(ValueError, match="not a saved index"):
        built.save(folder)
    assert (folder / "notes.txt").read_text() == "a researcher's notes"
    (tmp_path / "empty").mkdir()
    built.save(tmp_path / "empty")  # an empty folder, or a saved index, is replaced
    built.save(tmp_path / "empty")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        built.save(tmp_path / "file")


def _edit_manifest(path, edit):
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m["params"].update(degree=17), "params sha256 checksum mismatch"),
        (lambda m: m["params"].update(bits=128), "params sha256 checksum mismatch"),
        (lambda m: m["params"].pop("bits"), "bad params \\(KeyError"),
        (lambda m: m["params"]["graph_config"].update(bogus=1), "bad params \\(TypeError"),
        (lambda m: m["params"].update(metric="l3"), "bad params \\(ValueError"),
        (lambda m: m["params"].update(degree=17), "graph.npy: shape/dtype"),
        (lambda m: m.update(arrays=[]), "'arrays' must map"),
        (lambda m: m["arrays"]["graph"].pop("bytes"), "graph.npy: not listed"),
    ],
)
def test_a_bad_manifest_is_refused_naming_it(built, tmp_path, edit, match):
    built.save(tmp_path / "ix")
    path = tmp_path / "ix" / "manifest.json"
    if "checksum" not in match:  # (as a file from before the params' checksum)
        _edit_manifest(path, lambda m: m.pop("params_sha256"))
    _edit_manifest(path, edit)
    with pytest.raises(FormatError, match=match):
        BinaryGraphIndex.load(tmp_path / "ix")


def test_command_line_build_and_search(data, tmp_path, capsys):
    x, q, _ = data
    write_fvecs(tmp_path / "base.fvecs", x)
    write_fvecs(tmp_path / "q.fvecs", q)
    write_ivecs(tmp_path / "gt.ivecs", exact_topk(x, q, 10).astype(np.int32))
    parser = argparse.ArgumentParser()
    cli.add_index_commands(parser.add_subparsers(dest="command"))
    build = ["index", "build", "--input", str(tmp_path / "base.fvecs"), "--bits", "128"]
    build += ["--degree", "16", "--out"]
    args = parser.parse_args([*build, str(tmp_path)])  # holds the inputs: refused, unbuilt
    with pytest.raises(SystemExit, match="--out: .* is not a saved index"):
        args.run(args)
    args = parser.parse_args([*build, str(tmp_path / "ix")])
    assert args.run(args) == 0
    args = parser.parse_args(
        [
            "index",
            "search",
            "--index",
            str(tmp_path / "ix"),
            "--queries",
            str(tmp_path / "q.fvecs"),
            "--k",
            "10",
            "--width",
            "2",
            "--refine",
            "4",
            "--groundtruth",
            str(tmp_path / "gt.ivecs"),
            "--exact",
            "--out",
            str(tmp_path / "r.ivecs"),
        ]
    )
    assert args.run(args) == 0
    out = capsys.readouterr().out
    assert "QPS" in out and "recall@10" in out
    recall = float(out.split("recall@10 ")[1].split()[0].rstrip(";"))
    assert recall >= 0.9
    # --exact: brute force over the saved index finds the file's truth (float64 there: a near
    # tie may fall the other way in float32, so a few of the 2000 entries may differ).
    against_exact = float(out.split("recall@10 against it ")[1].split()[0])
    assert abs(against_exact - recall) <= 0.002, out
    assert read_ivecs(tmp_path / "r.ivecs").shape == (200, 10)
    # --walk fused: the Pallas walk (interpreted here, so on 16 queries) finds the same ids.
    write_fvecs(tmp_path / "q16.fvecs", q[:16])
    search16 = ["index", "search", "--index", str(tmp_path / "ix"), "--k", "10", "--width", "2"]
    search16 += ["--queries", str(tmp_path / "q16.fvecs")]
    for walk in ("xla", "fused"):
        args = parser.parse_args(
            [*search16, "--walk", walk, "--out", str(tmp_path / f"{walk}.ivecs")]
        )
        assert args.run(args) == 0
    np.testing.assert_array_equal(
        read_ivecs(tmp_path / "fused.ivecs"), read_ivecs(tmp_path / "xla.ivecs")
    )
    np.testing.assert_array_equal(
        read_ivecs(tmp_path / "xla.ivecs"), read_ivecs(tmp_path / "r.ivecs")[:16]
    )


def test_command_line_refuses_bad_arguments_before_searching(data, tmp_path):
    # Each bad argument is a one-line exit naming it (not a traceback), before any search runs
    # or --out is written (a bad --groundtruth was found after both).
    x, q, _ = data
    BinaryGraphIndex(bits=64, degree=8, itq_iterations=5).build(x[:300]).save(tmp_path / "ix")
    write_fvecs(tmp_path / "q.fvecs", q[:20])
    write_fvecs(tmp_path / "q8.fvecs", q[:20, :8])
    write_ivecs(tmp_path / "gt5.ivecs", np.zeros((20, 5), np.int32))
    parser = argparse.ArgumentParser()
    cli.add_index_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "r.ivecs"
    good = dict(index="ix", queries="q.fvecs", k="10", out=str(out))
    cases = [
        (dict(groundtruth="missing.ivecs"), "--groundtruth: .*missing.ivecs"),
        (dict(groundtruth="gt5.ivecs"), r"--groundtruth shape \(20, 5\) must be \[20, >= 10\]"),
        (dict(queries="q8.fvecs"), "--queries: dimension 8, the index's is 64"),
        (dict(queries="missing.fvecs"), "--queries: .*missing.fvecs"),
        (dict(queries="."), "--queries: "),
        (dict(k="0"), "--k 0 must be >= 1"),
        (dict(k="500", exact=True), "--k 500 must be at most the index's 300 live vectors"),
        (dict(index="q.fvecs"), "--index: .*not a saved index"),
        (dict(out=str(tmp_path / "nodir" / "r.ivecs")), "--out: folder .*nodir does not exist"),
        (dict(candidates="4"), "k=10 must be in 1..candidates=4"),
    ]
    for change, match in cases:
        given = {**good, **change}
        argv = ["index", "search"]
        for name, value in given.items():
            if value is True:
                argv.append(f"--{name}")
            else:
                path = tmp_path / value if name in ("index", "queries", "groundtruth") else value
                argv += [f"--{name}", str(path)]
        args = parser.parse_args(argv)
        with pytest.raises(SystemExit, match=match):
            args.run(args)
        assert not out.exists(), change


def _two_processes(command: list[str]) -> list[str]:
    """Runs command as two jax.distributed processes of 4 CPU devices each (gloo collectives
    between them), as two hosts would; returns their outputs after both succeed."""
    runs = run_local_processes(command, 2, 4, timeout=400)
    for status, log in runs:
        assert status == 0, log[-3000:]
    return [log for _, log in runs]


def test_build_across_two_processes_gives_the_single_process_index(data, tmp_path):
    # One graph over a mesh of both processes' 8 devices (`index build --sharded`); process 0
    # saves the index. It must be the index one process builds alone.
    x, q, _ = data
    write_fvecs(tmp_path / "base.fvecs", x)
    command = [sys.executable, "-m", "alijax", "index", "build", "--sharded", "--degree", "16"]
    command += ["--input", str(tmp_path / "base.fvecs"), "--out", str(tmp_path / "ix")]
    logs = _two_processes(command)
    assert "built 2000 x 64" in logs[0] and "built" not in logs[1]
    # The codes are process 0's ITQ fit, which can differ from this process's in float
    # rounding (XLA:CPU splits matmuls by its thread count): the graph over them must be the
    # one a single device builds, and it must serve searches.
    both = BinaryGraphIndex.load(tmp_path / "ix")
    np.testing.assert_array_equal(both.graph, graph_lib.build_graph(both.codes, 16))
    assert recall(both.search(q, 10)[1], exact_topk(x, q, 10)) >= 0.95


_AGREE_SCRIPT = """
import jax, numpy as np
from alijax import parallel
from alijax.ann import index
parallel.maybe_initialize_distributed()
rank = jax.process_index()
mesh = parallel.make_mesh()
assert index._spans_processes(mesh) and not index._spans_processes(None)
codes = np.full((5, 2), 7 + rank, np.uint32)  # what each process computed alone
mean = np.full((3,), 0.5 + rank, np.float32)
got_mean, got_codes = index._from_process_zero((mean, codes))
print("AGREED", rank, got_mean.tolist(), got_codes[0].tolist(), got_codes.dtype)
"""


def test_processes_take_process_zeros_codes():
    # The build makes every process use process 0's binarizer and codes, so the graph's rows
    # and the saved codes agree even where hosts round differently.
    logs = _two_processes([sys.executable, "-c", _AGREE_SCRIPT])
    for rank, log in enumerate(logs):
        assert f"AGREED {rank} [0.5, 0.5, 0.5] [7, 7] uint32" in log, log[-2000:]


def test_entry_points_scale_with_the_index(built):
    from alijax.ann.index import default_num_entries

    assert [default_num_entries(n) for n in (100, 2000, 20_000, 100_000, 10**7)] == [
        100,
        2000,
        8192,
        8333,
        16384,
    ]
    assert len(built.entries) == default_num_entries(N) and len(set(built.entries.tolist())) == N


@pytest.mark.parametrize("grow", ["one add", "small adds"])
def test_adds_spread_the_entry_points_over_the_new_rows(data, grow):
    # An index built from 2 points and grown by adds: its searches (and each add's walk) start
    # from entries over all its rows. With the build's 2 entries kept (before the fix),
    # recall@10 at L >= N was 0.075 on 400 points of 6 clusters (degree 8, one add).
    x, q, _ = data
    n = 300
    index = BinaryGraphIndex(bits=64, degree=8, itq_iterations=5).build(x[:2])
    if grow == "one add":
        index.add(x[2:n], np.arange(2, n))
    else:
        for start in range(2, n, 37):  # small adds (their own program) and general ones
            index.add(x[start : min(n, start + 37)], np.arange(start, min(n, start + 37)))
    np.testing.assert_array_equal(index.entries, np.arange(n))  # all rows, below the floor
    want = exact_topk(x[:n], q, 10)
    assert recall(index.search(q, 10, candidates=512)[1], want) >= 0.99  # measured 1.0
    programs = set(search_lib._PROGRAMS)
    index.add(x[n : n + 5], np.arange(n, n + 5))  # within the capacity: the same programs
    assert recall(index.search(q, 10, candidates=512)[1], exact_topk(x[: n + 5], q, 10)) >= 0.99
    assert set(search_lib._PROGRAMS) == programs


def test_grown_entries_pad_with_no_entry():
    index = BinaryGraphIndex(bits=64, num_entries=6)
    np.testing.assert_array_equal(index._entries(4, rows=1024), [0, 1, 2, 3, -1, -1])
    np.testing.assert_array_equal(index._entries(11, rows=1024), [0, 2, 4, 6, 8, 10])
    assert len(BinaryGraphIndex()._entries(300, rows=1024)) == 1024


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_device_vectors_fill_every_row(dtype):
    from alijax.ann.index import _device_vectors

    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    got = np.asarray(_device_vectors(x, dtype, rows=7))  # blocks 0-6, 7-13, 13-19 (overlap)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, x.astype(dtype))


def test_float32_vectors(data, built):
    x, q, _ = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20, vector_dtype="float32")
    index.build(x, ids=np.arange(N) * 3)
    assert index.vectors.dtype == np.float32
    np.testing.assert_array_equal(index.vectors, x)
    scores, ids = index.search(q, 10)
    want = ((x[ids // 3] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    # Same graph as the float16 default: the rerank differs only where rounding reorders.
    np.testing.assert_array_equal(index.graph, built.graph)
    assert (ids == built.search(q, 10)[1]).mean() >= 0.99


def test_float16_vectors(data, tmp_path):
    x, q, xa = data
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20)  # float16 by default
    index.build(x)
    assert index.vectors.dtype == np.float16 and index.vectors.nbytes == x.nbytes // 2
    scores, ids = index.search(q, 10)
    assert recall(ids, exact_topk(x, q, 10)) >= 0.95  # measured 0.99+
    x16 = x.astype(np.float16).astype(np.float32)  # what the rerank scores
    want = ((x16[ids] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(scores, want, rtol=1e-5)
    index.add(xa[:20], np.arange(20) + N)
    assert index.vectors.dtype == np.float16 and len(index.vectors) == N + 20

    index.save(tmp_path / "ix")
    loaded = BinaryGraphIndex.load(tmp_path / "ix")
    assert loaded.vector_dtype == "float16" and loaded.vectors.dtype == np.float16
    np.testing.assert_array_equal(index.search(q, 10)[1], loaded.search(q, 10)[1])

    manifest = tmp_path / "ix" / "manifest.json"
    text = manifest.read_text().replace('"vector_dtype": "float16"', '"vector_dtype": "float32"')
    assert '"vector_dtype": "float32"' in text
    manifest.write_text(text)
    with pytest.raises(FormatError, match="manifest.json: params sha256 checksum mismatch"):
        BinaryGraphIndex.load(tmp_path / "ix")
    _edit_manifest(manifest, lambda m: m.pop("params_sha256"))  # (as a file from before it)
    with pytest.raises(FormatError, match=r"vectors.npy: shape/dtype \(2020, 64\)/float16"):
        BinaryGraphIndex.load(tmp_path / "ix")


def test_float16_range_and_bad_dtype_refused(data):
    x, _, _ = data
    with pytest.raises(ValueError, match="vectors holds values beyond float16"):
        BinaryGraphIndex(bits=64, vector_dtype="float16").build(x * 1e5)
    with pytest.raises(ValueError, match="vector_dtype"):
        BinaryGraphIndex(vector_dtype="int8")


def test_sharded_build_gives_the_single_device_index(data, built):
    from alijax.parallel import make_mesh

    x, q, _ = data
    # The graph comes back sharded over the 8 devices; the index keeps a host copy of it.
    index = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20)
    index.build(x, ids=np.arange(N) * 3, mesh=make_mesh())
    np.testing.assert_array_equal(index.graph, built.graph)
    np.testing.assert_array_equal(index.search(q, 10)[1], built.search(q, 10)[1])


def test_large_build_frees_its_compiled_programs(data, built, monkeypatch):
    # From _RELEASE_PROGRAMS_FROM points the build's programs (55 MB at 1M) are freed; below,
    # they stay for the next build of the same shapes. Either way the index is the same.
    x, _, _ = data
    small = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x, ids=np.arange(N) * 3)
    assert graph_lib._executable.cache_info().currsize > 0
    monkeypatch.setattr(index_lib, "_RELEASE_PROGRAMS_FROM", N)
    large = BinaryGraphIndex(bits=256, degree=16, itq_iterations=20).build(x, ids=np.arange(N) * 3)
    assert graph_lib._executable.cache_info().currsize == 0
    assert codes_lib._fit_itq._cache_size() == 0
    np.testing.assert_array_equal(small.graph, large.graph)
    np.testing.assert_array_equal(small.graph, built.graph)
