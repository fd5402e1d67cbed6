"""Exact float k-NN search, side by side in one run: alijax.ann.exact.exact_search vs faiss
IndexFlatL2 (CPU; skipped where faiss is missing) vs a lax.top_k over each whole chunk of
scores (exact_search with group=0: what benchmarks/ann_gpu.py's run 3 used as its brute
force, there at default precision).

  python benchmarks/exact.py [--n 1048576] [--dim 128] [--queries 1,64,512] [--out PATH]

Random normal data, k = 10, squared L2. Each row: the median of --repeat timed calls after a
warm-up, queries per second, and whether the peer's ids equal ours (ties aside: the count of
differing ids is printed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from alijax.ann.exact import default_chunk_size, exact_search  # noqa: E402

K = 10


def median_s(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def faiss_flat(x):
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--queries", default="1,64,512")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/exact-cpu.json")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim), np.float32)
    xd = jnp.asarray(x)
    device = jax.devices()[0]
    index = faiss_flat(x) if device.platform == "cpu" else None
    rows = []
    for q in (int(v) for v in args.queries.split(",")):
        queries = rng.standard_normal((q, args.dim), np.float32)
        qd = jnp.asarray(queries)
        chunk = default_chunk_size(q, args.n)
        ours = lambda: jax.block_until_ready(exact_search(qd, xd, K))  # noqa: E731
        plain = lambda: jax.block_until_ready(exact_search(qd, xd, K, chunk_size=chunk, group=0))  # noqa: E731
        row = {"Q": q, "N": args.n, "dim": args.dim, "chunk": chunk}
        row["ours_s"] = median_s(ours, args.repeat)
        row["topk_per_chunk_s"] = median_s(plain, args.repeat)
        ids = np.asarray(ours()[1])
        row["topk_per_chunk_differ"] = int((np.asarray(plain()[1]) != ids).sum())
        if index is not None:
            row["faiss_s"] = median_s(lambda: index.search(queries, K), args.repeat)
            row["faiss_differ"] = int((index.search(queries, K)[1] != ids).sum())
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "device": str(device),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "k": K,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(table(report)))


def table(report: dict) -> list[str]:
    lines = [
        f"exact L2 top-{report['k']} on {report['device']}, {report['date'][:10]} (QPS; ratio = "
        "exact_search / peer)",
        "| Q | N | exact_search | top_k per chunk | ratio | faiss IndexFlatL2 | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        qps = lambda s: r["Q"] / s  # noqa: E731
        faiss_cells = (
            f"{qps(r['faiss_s']):.0f} | {r['faiss_s'] / r['ours_s']:.2f}"
            if "faiss_s" in r
            else "- | -"
        )
        lines.append(
            f"| {r['Q']} | {r['N']} | {qps(r['ours_s']):.0f} | {qps(r['topk_per_chunk_s']):.0f} "
            f"| {r['topk_per_chunk_s'] / r['ours_s']:.2f} | {faiss_cells} |"
        )
    return lines


if __name__ == "__main__":
    main()
