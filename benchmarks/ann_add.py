"""Live inserts: BinaryGraphIndex.add against hnswlib's add_items, one run, same data and machine.

  python benchmarks/ann_add.py [--n 200000] [--m 20000] [--chunk 0] [--nq 1000]
                               [--out-dir benchmarks/results]

Both build on the first n synthetic points (benchmarks/ann.py's data), then insert m more: ours
first 1000 (which compiles the add's programs, timed apart), then the rest in one call, or with
--chunk C in calls of C points (a stream of inserts: every call's fixed costs and any compilation
a call needs are in the rate); hnswlib (M=16, ef_construction=200, all cores, its capacity set
for n + m at init) the same split. Per
method: insert rate, the resident memory the inserts add at their peak (Linux VmHWM after a
reset), and recall@10 after them against exact float ground truth over all n + m points. Then
ours is built on all n + m points for comparison. Prints a markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from ann import THREADS, _status_mib, ground_truth, log, recalls, synthetic  # noqa: E402

from alijax.ann.index import BinaryGraphIndex  # noqa: E402

FIRST = 1000  # the first insert call, apart: it compiles ours' add programs


def _reset_peak() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current resident size
    return _status_mib("VmRSS")


def _insert(add, x_new, first_id, chunk: int) -> dict:
    """Times add(vectors, ids) on the first FIRST points, then on the rest (in calls of chunk
    points; 0: one call); peak MiB added."""
    before = _reset_peak()
    t = time.perf_counter()
    add(x_new[:FIRST], np.arange(first_id, first_id + FIRST))
    first = time.perf_counter() - t
    step = chunk or len(x_new)
    calls = []  # each call's seconds: the first of a stream of small calls may compile
    for start in range(FIRST, len(x_new), step):
        stop = min(len(x_new), start + step)
        t = time.perf_counter()
        add(x_new[start:stop], np.arange(first_id + start, first_id + stop))
        calls.append(time.perf_counter() - t)
    rest = sum(calls)
    return {
        "first_s": first,
        "rest_s": rest,
        "points_per_s": (len(x_new) - FIRST) / rest,
        "call_ms_median": 1e3 * float(np.median(calls)),
        "call_ms_max": 1e3 * max(calls),
        "peak_mib": _status_mib("VmHWM") - before,
    }


def run_ours(base, x_new, q, truth, sweep, chunk: int) -> dict:
    index = BinaryGraphIndex(bits=256, degree=32).build(base, ids=np.arange(len(base)))
    row = _insert(index.add, x_new, len(base), chunk)
    for cand in sweep:
        row[f"L={cand}"] = recalls(index.search(q, 10, cand)[1], truth)["recall@10"]
    return row


def run_rebuilt(x_all, q, truth, sweep) -> dict:
    t = time.perf_counter()
    index = BinaryGraphIndex(bits=256, degree=32).build(x_all)
    row = {"build_s": time.perf_counter() - t}
    for cand in sweep:
        row[f"L={cand}"] = recalls(index.search(q, 10, cand)[1], truth)["recall@10"]
    return row


def run_hnswlib(base, x_new, q, truth, sweep, chunk: int) -> dict:
    import hnswlib

    index = hnswlib.Index("l2", base.shape[1])
    index.init_index(len(base) + len(x_new), 16, 200)
    index.set_num_threads(THREADS)
    index.add_items(base, np.arange(len(base)))
    row = _insert(index.add_items, x_new, len(base), chunk)
    for ef in sweep:
        index.set_ef(ef)
        row[f"ef={ef}"] = recalls(index.knn_query(q, 10)[0], truth)["recall@10"]
    return row


def markdown(report) -> str:
    res = report["results"]
    lines = [
        f"### add {report['m']} into {report['n']} (synthetic, d={report['dim']}, "
        f"{report['threads']} threads"
        + (f", the rest in calls of {report['chunk']})" if report.get("chunk") else ")"),
        "",
        "| method | first 1000 s | rest points/s | rest calls: median / max ms | peak MiB "
        "added | recall@10 after |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("ours", "hnswlib"):
        r = res[name]
        rec = ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k.startswith(("L=", "ef=")))
        lines.append(
            f"| {name} | {r['first_s']:.2f} | {r['points_per_s']:.0f} | "
            f"{r['call_ms_median']:.2f} / {r['call_ms_max']:.0f} | {r['peak_mib']:.0f} | {rec} |"
        )
    ours, theirs = res["ours"], res["hnswlib"]
    ratio = ours["points_per_s"] / theirs["points_per_s"]
    call_ratio = theirs["call_ms_median"] / ours["call_ms_median"]
    rebuilt = ", ".join(f"{k} {v:.4f}" for k, v in res["ours rebuilt"].items() if "=" in k)
    lines += [
        "",
        f"- insert rate, ours / hnswlib: {ratio:.2f}x",
        f"- median call, hnswlib's time / ours: {call_ratio:.2f}x (without a first call's compiling)",
        f"- ours rebuilt: {rebuilt}",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--m", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=0, help="points per insert call (0: one)")
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    if args.m <= FIRST:
        raise ValueError(f"--m={args.m} must be > {FIRST} (the first insert is timed apart)")
    x_all, q = synthetic(args.n + args.m, args.nq)
    base, x_new = x_all[: args.n], x_all[args.n :]
    truth = ground_truth(x_all, q, 10)
    results = {}
    log("ours: build, then add")
    results["ours"] = run_ours(base, x_new, q, truth, (64, 128), args.chunk)
    log("hnswlib: build, then add_items")
    results["hnswlib"] = run_hnswlib(base, x_new, q, truth, (64, 128), args.chunk)
    log("ours: rebuilt on all points")
    results["ours rebuilt"] = run_rebuilt(x_all, q, truth, (64, 128))
    report = {
        "n": args.n,
        "m": args.m,
        "chunk": args.chunk,
        "nq": args.nq,
        "dim": x_all.shape[1],
        "threads": THREADS,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "results": results,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    chunked = f"-chunk{args.chunk}" if args.chunk else ""
    stem = os.path.join(args.out_dir, f"ann-add-{args.n // 1000}k-{args.m // 1000}k{chunked}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table, flush=True)


if __name__ == "__main__":
    main()
