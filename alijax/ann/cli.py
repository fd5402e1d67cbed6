"""`python -m alijax index build|search`: the index on .fvecs / .bvecs / .fbin files.

  index build  --input X.fvecs --out DIR [--bits 256] [--degree 32] [--metric l2] [--binarizer itq]
  index search --index DIR --queries Q.fvecs --k 10 [--candidates L] [--width W] [--refine P]
               [--walk xla|fused] [--groundtruth GT.ivecs] [--exact] --out results.ivecs

Hook: `add_index_commands(subparsers)` adds the `index` command; each sub-command sets
`args.run(args) -> int`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import numpy as np

from alijax.data.files import FormatError


def add_index_commands(subparsers) -> argparse.ArgumentParser:
    """Adds `index build` and `index search` to an argparse subparsers object."""
    index = subparsers.add_parser("index", help="build or search a Binary Distributed Graph index")
    sub = index.add_subparsers(dest="index_command", required=True)

    build = sub.add_parser("build", help="build an index from a vector file")
    build.add_argument("--input", required=True, help=".fvecs, .bvecs or .fbin (and other *bin)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument("--bits", type=int, default=256)
    build.add_argument("--degree", type=int, default=32)
    build.add_argument("--metric", choices=("l2", "ip", "cosine"), default="l2")
    build.add_argument("--binarizer", choices=("itq", "lsh"), default="itq")
    build.add_argument(
        "--vector-dtype",
        choices=("float32", "float16"),
        default=None,
        help="dtype of the stored rerank vectors (default: the index's)",
    )
    build.add_argument(
        "--sharded",
        action="store_true",
        help="shard the graph build over all devices (a data mesh); on several hosts, run the "
        "same command on each with ALIJAX_COORDINATOR, ALIJAX_NUM_PROCESSES, ALIJAX_PROCESS_ID",
    )
    build.set_defaults(run=_build)

    search = sub.add_parser("search", help="search an index with a query file")
    search.add_argument("--index", required=True)
    search.add_argument("--queries", required=True)
    search.add_argument("--k", type=int, default=10)
    search.add_argument("--candidates", type=int, default=None, help="L binary candidates")
    search.add_argument(
        "--width",
        type=int,
        default=None,
        help="parents expanded per iteration (default: the index's; automatic by its size)",
    )
    search.add_argument(
        "--refine",
        type=int,
        default=None,
        help="best reranked candidates whose graph neighbours are scored too (0: none; "
        "default: automatic, 4 from L=256)",
    )
    search.add_argument(
        "--walk",
        choices=("xla", "fused"),
        default=None,
        help="the walk by XLA ops or by the fused Pallas kernel (a GPU's; interpreted elsewhere, "
        "slow); default: the index's (SearchConfig.walk)",
    )
    search.add_argument("--groundtruth", default=None, help=".ivecs of true neighbour ids")
    search.add_argument(
        "--exact",
        action="store_true",
        help="also search exactly (brute force over the index's live vectors, alijax.ann.exact): "
        "its QPS, and the recall@k against it, for data without a ground-truth file",
    )
    search.add_argument("--out", required=True, help="result ids as .ivecs")
    search.set_defaults(run=_search)
    return index


def _read(path: str, flag: str) -> np.ndarray:
    """The vector file named by `flag` as float32 [n, d], or an exit naming the flag."""
    from alijax.data.vecs import read_vecs

    try:
        x = np.asarray(read_vecs(path), dtype=np.float32)
    except (OSError, ValueError) as err:  # FormatError is a ValueError
        raise SystemExit(f"{flag}: {err}") from None
    if x.shape[0] == 0:
        raise SystemExit(f"{flag}: {path} holds no vectors")
    return x


def _read_truth(path: str, rows: int, k: int) -> np.ndarray:
    """--groundtruth as int32 [rows, >= k], read and checked before any search runs."""
    from alijax.data.vecs import read_ivecs

    try:
        truth = np.asarray(read_ivecs(path))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--groundtruth: {err}") from None
    if truth.shape[0] != rows or truth.shape[1] < k:
        raise SystemExit(f"--groundtruth shape {truth.shape} must be [{rows}, >= {k}]")
    return truth


def _build(args) -> int:
    from alijax import parallel
    from alijax.ann.index import BinaryGraphIndex, check_save_directory

    try:  # before the build, not after it
        check_save_directory(args.out)
    except ValueError as err:
        raise SystemExit(f"--out: {err}") from None
    # Before jax starts a backend: with a coordinator in the environment the mesh spans the
    # devices of every process. Each reads the whole input and keeps the whole graph.
    parallel.maybe_initialize_distributed()
    x = _read(args.input, "--input")
    mesh = parallel.make_mesh() if args.sharded else None
    t0 = time.perf_counter()
    dtype = {} if args.vector_dtype is None else {"vector_dtype": args.vector_dtype}
    index = BinaryGraphIndex(
        bits=args.bits, degree=args.degree, metric=args.metric, binarizer=args.binarizer, **dtype
    ).build(x, mesh=mesh)
    seconds = time.perf_counter() - t0
    import jax

    if jax.process_index() == 0:  # every process holds the same index; one writes it
        index.save(args.out)
        print(f"built {len(index)} x {x.shape[1]} in {seconds:.1f} s -> {args.out}")
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("alijax index build: saved")
    return 0


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] & truth[:, :k]| / k."""
    found, truth = found[:, :k], truth[:, :k]
    return float((found[:, :, None] == truth[:, None, :]).any(axis=2).mean())


def _search(args) -> int:
    from alijax.ann.index import BinaryGraphIndex
    from alijax.data.vecs import write_ivecs

    # Every argument is checked before the searches run and --out is written.
    try:
        index = BinaryGraphIndex.load(args.index)
    except FormatError as err:
        raise SystemExit(f"--index: {err}") from None
    q = _read(args.queries, "--queries")
    if q.shape[1] != index.dim:
        raise SystemExit(f"--queries: dimension {q.shape[1]}, the index's is {index.dim}")
    if args.k < 1:
        raise SystemExit(f"--k {args.k} must be >= 1")
    if args.exact and args.k > len(index):
        raise SystemExit(f"--k {args.k} must be at most the index's {len(index)} live vectors")
    truth = _read_truth(args.groundtruth, len(q), args.k) if args.groundtruth else None
    out_folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_folder):
        raise SystemExit(f"--out: folder {out_folder} does not exist")
    if args.walk:
        index.search_config = dataclasses.replace(index.search_config, walk=args.walk)
    options = dict(candidates=args.candidates, width=args.width, refine=args.refine)
    # Untimed first: it compiles the programs of these query batches (a few queries alone
    # would compile smaller ones, and the timed search would compile again: 46 QPS for 200).
    try:
        index.search(q, args.k, **options)
    except ValueError as err:  # (--candidates, --width, --refine out of range)
        raise SystemExit(str(err)) from None
    t0 = time.perf_counter()
    _, ids = index.search(q, args.k, **options)
    seconds = time.perf_counter() - t0
    write_ivecs(args.out, ids.astype(np.int32))
    line = f"{len(q)} queries, k={args.k}: {len(q) / seconds:.0f} QPS"
    if truth is not None:
        line += f", recall@{args.k} {recall_at_k(ids, truth, args.k):.4f}"
    if args.exact:
        qps, truth = _exact_truth(index, q, args.k)
        line += (
            f"; exact search {qps:.0f} QPS, recall@{args.k} against it "
            f"{recall_at_k(ids, truth, args.k):.4f}"
        )
    print(line)
    return 0


def _exact_truth(index, queries: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    """(QPS of the exact search, its ids [Q, k]) over the index's live vectors, compiled first."""
    import jax

    from alijax.ann.exact import exact_search

    live = ~np.asarray(index.deleted)
    vectors, ids = np.asarray(index.vectors)[live], np.asarray(index.ids)[live]
    run = lambda: jax.block_until_ready(exact_search(queries, vectors, k, metric=index.metric))  # noqa: E731
    run()
    t0 = time.perf_counter()
    _, rows = run()
    return len(queries) / (time.perf_counter() - t0), ids[np.asarray(rows)]
