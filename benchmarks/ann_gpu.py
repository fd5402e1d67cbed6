"""Binary graph index on one accelerator vs exact brute force on the same device, one run.

  python benchmarks/ann_gpu.py [--n 1000000] [--nq 10000] [--out benchmarks/results/ann-gpu.json]

The issue's one-GPU targets: a 1M-vector build in <= 10 s, and search at recall@10 >= 0.95 at
>= 10x the throughput of exact brute-force search on the same card. The baseline, and the
ground truth, is `alijax.ann.exact.exact_search`: exact float32 L2 top-10 by matmul (HIGHEST
precision, no TF32) in chunks of the base, each merged into a running top-k through an exact
group pre-selection. Run 3's baseline (the same matmul at default precision, then a lax.top_k
over every whole chunk) is timed too and printed beside it: its top_k dominated it, so the
ratios of run 3 were against a weaker brute force.
Build time is reported twice: the first build (JIT compilation included) and a second build of
the same shapes (compiled). Search is swept over L, the query batch size and the beam width: on
a GPU each beam-search iteration is a handful of small kernels, so a batch of 1024 queries (the
CPU default) leaves the card mostly idle; larger batches amortise that per-iteration latency,
and wider beams need fewer iterations. --walks: the XLA walk, and the fused Pallas walk
(pallas_kernels.graph_walk: one program walks a query to its end; at the first batch size only).
Beside the graph, the same codes scanned exactly
(`--scans`, mode "scan": the binary top-L by alijax.ann.hamming, the fused Pallas kernel on a
GPU; "scan tc": the int8 tensor-core top-k over the codes' signs, GPU only), then the same float
rerank: on one card a flat binary scan may beat the walk, and this says by how much. --phases
times one batch's programs apart (seed, walk, rerank; the walk also cut at 1-8 iterations, and
the fused walk in a few configs, its lists checked against the XLA walk's), so one run says
where a batch's time goes and what an iteration costs. Last, --add
points are inserted (`index.add`): 1000 first
(compiling), then the rest in calls of 1000, reported as points/s; the data are then one draw
of n + add points (--add 0: session 5's data, n points).
Runs anywhere (CPU: use a small --n); needs no faiss.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ann import synthetic  # noqa: E402
from jax import lax  # noqa: E402

from alijax.ann import codes as codes_lib  # noqa: E402
from alijax.ann import exact, hamming, search  # noqa: E402
from alijax.ann.index import BinaryGraphIndex  # noqa: E402
from pallas_kernels import graph_walk  # noqa: E402
from pallas_kernels import hamming_topk as hk  # noqa: E402


def topk_per_chunk(x, q, k):
    """Run 3's brute-force baseline: float L2 top-k at default precision (TF32 on a recent
    GPU), a lax.top_k over each whole chunk of 65536 scores."""
    return exact.exact_search(q, x, k, chunk_size=65536, precision=lax.Precision.DEFAULT, group=0)[
        1
    ]


ADD_FIRST = 1000  # points of the first add call (it compiles), and of each call after it


def _timed_adds(index, extra, first_id: int) -> dict:
    """Inserts `extra` into the index: ADD_FIRST points, then the rest in calls of ADD_FIRST."""
    ids = np.arange(first_id, first_id + len(extra))
    t = time.perf_counter()
    index.add(extra[:ADD_FIRST], ids[:ADD_FIRST])
    first = time.perf_counter() - t
    t = time.perf_counter()
    for s in range(ADD_FIRST, len(extra), ADD_FIRST):
        index.add(extra[s : s + ADD_FIRST], ids[s : s + ADD_FIRST])
    rest = time.perf_counter() - t
    print(
        f"add: first {first:.2f} s, then {(len(extra) - ADD_FIRST) / rest:.0f} points/s", flush=True
    )
    return {"first_s": first, "points_per_s": (len(extra) - ADD_FIRST) / rest, "points": len(extra)}


def scan_modes(on_gpu: bool) -> list[str]:
    """The exact binary scans to run: the tensor-core one runs compiled on a GPU only."""
    return ["scan", "scan tc"] if on_gpu else ["scan"]


def scan_search(mode: str, queries, query_codes, codes, signs, vectors, candidates: int, k: int):
    """Exact binary top-`candidates` of every query, then the index's float L2 rerank: ids."""
    if mode == "scan tc":
        _, cand = hk.hamming_topk_tensorcore(query_codes, signs, candidates)
    else:
        _, cand = hamming.hamming_topk(query_codes, codes, candidates)
    _, ids = search.rerank(queries, vectors, cand, k, "l2")
    return np.asarray(ids)


def recall_at_10(ids, truth) -> float:
    return float((ids[:, :10, None] == truth[:, None, :10]).any(axis=2).mean())


def timed(fn, repeat=3):
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--nq", type=int, default=10_000)
    parser.add_argument("--sweep", default="16,32,64,128")
    parser.add_argument("--batch-sizes", default="10000,1024", help="query batch sizes to try")
    parser.add_argument(
        "--widths", default="1,4", help="parents expanded per iteration (SearchConfig.width)"
    )
    parser.add_argument(
        "--caps",
        default="1",
        help="multiples of the default iteration cap to sweep (the fused walk stops each query "
        "when it is done, so a higher cap may cost it less than it costs the XLA walk's batch)",
    )
    parser.add_argument(
        "--walks",
        default=None,
        help="SearchConfig.walk values to sweep, fused first (default: fused,xla on a GPU, xla "
        "elsewhere, where the fused kernel is interpreted); fused at the first batch size only",
    )
    parser.add_argument("--add", type=int, default=10_000, help="points added after (0: none)")
    parser.add_argument(
        "--scans", default="32,64,128,256", help="L of the exact binary scans ('' for none)"
    )
    parser.add_argument(
        "--phases",
        default="64:1:10000",
        help="L:width:batch of one search timed program by program (seed, walk, rerank) and "
        "with the walk cut at 1, 2, 4, 8 iterations: where a batch's time goes ('' for none)",
    )
    parser.add_argument("--out", default="benchmarks/results/ann-gpu.json")
    args = parser.parse_args(argv)
    if 0 < args.add <= ADD_FIRST:
        parser.error(f"--add {args.add}: 0 (none) or more than {ADD_FIRST} (the first call's)")
    device = str(jax.devices()[0])
    x, q = synthetic(args.n + args.add, args.nq)
    x, extra = x[: args.n], x[args.n :]
    xd = jnp.asarray(x)
    secs_exact, (_, truth) = timed(lambda: jax.block_until_ready(exact.exact_search(q, xd, 10)))
    truth = np.asarray(truth)
    exact_qps = len(q) / secs_exact
    secs_per_chunk, _ = timed(lambda: jax.block_until_ready(topk_per_chunk(xd, q, 10)), repeat=1)
    topk_qps = len(q) / secs_per_chunk
    print(
        f"{device}: N={args.n} Q={args.nq}; exact brute force {exact_qps:.0f} QPS "
        f"(run 3's, a top_k over each chunk: {topk_qps:.0f})",
        flush=True,
    )
    t = time.perf_counter()
    index = BinaryGraphIndex(bits=256, degree=32).build(x)
    build_first = time.perf_counter() - t
    t = time.perf_counter()
    BinaryGraphIndex(bits=256, degree=32).build(x)
    build_warm = time.perf_counter() - t
    print(f"build: first {build_first:.1f} s, second {build_warm:.1f} s", flush=True)
    on_gpu = jax.default_backend() == "gpu"
    walks = (args.walks or ("fused,xla" if on_gpu else "xla")).split(",")
    # The phases first: a few short programs that say where a batch's time goes, and time
    # the fused walk's configs against the XLA walk's (its first run on a GPU).
    phase_times = phases(index, q, args.phases, "fused" in walks) if args.phases else None
    rows = []
    base_config = index.search_config
    batches = [int(b) for b in args.batch_sizes.split(",")]
    for walk in walks:
        for batch in batches if walk == "xla" else batches[:1]:
            index.search_config = dataclasses.replace(base_config, batch_size=batch, walk=walk)
            rows += graph_rows(index, q, truth, args, batch, walk)
    index.search_config = base_config
    # The scans last: a slow scan (k = 256 in a kernel built for k = 10) could use up a run's
    # time limit.
    rows += scans(args, index, x, xd, q, truth)
    report = {
        "device": device,
        "n": args.n,
        "nq": args.nq,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "exact_qps": exact_qps,
        "exact_topk_per_chunk_qps": topk_qps,
        "build_first_s": build_first,
        "build_warm_s": build_warm,
        "rows": rows,
        "phases": phase_times,
        "add": None,
    }
    # The search's results written and printed first: kept should the adds run past a limit.
    _write(args.out, report)
    print("\n".join(_summary(report)), flush=True)
    if len(extra):
        report["add"] = _timed_adds(index, extra, args.n)
        _write(args.out, report)
        print(_summary(report)[-1], flush=True)


def graph_rows(index, q, truth, args, batch: int, walk: str) -> list[dict]:
    """The index's search over the sweep of L, widths and caps, every query in one call a row."""
    rows = []
    config = index.search_config
    sweep = itertools.product(
        (int(w) for w in args.widths.split(",")),
        (int(c) for c in args.caps.split(",")),
        (int(c) for c in args.sweep.split(",")),
    )
    for width, times, cand in sweep:
        if width * 4 > cand:  # a quarter of the list at most per iteration
            continue
        cap = times * search.SearchConfig(cand, width=width).iterations()
        index.search_config = dataclasses.replace(config, max_iterations=cap)
        try:
            secs, (_, ids) = timed(lambda: index.search(q, 10, candidates=cand, width=width))
        except Exception as err:  # a kernel that fails must not cost the other rows
            print(f"{walk} L={cand} width={width}: {type(err).__name__}: {str(err)[:300]}")
            continue
        mode = "graph" if walk == "xla" else f"graph {walk}"
        row = {"mode": mode, "L": cand, "batch": batch, "width": width, "cap": cap}
        rows.append({**row, "recall@10": recall_at_10(ids, truth), "qps": len(q) / secs})
        # One line a row, as it comes: a run cut off by its time limit keeps what it got.
        print(json.dumps(rows[-1]), flush=True)
    index.search_config = config
    return rows


def scans(args, index, x, xd, q, truth) -> list[dict]:
    """The exact binary scan rows: every query in one call per L (the codes made once, as an
    index keeps them; the tensor-core signs too, 8x their size)."""
    lengths = [int(c) for c in args.scans.split(",") if c]
    if not lengths:
        return []
    codes = jnp.asarray(codes_lib.encode(index.binarizer, x))
    query_codes = jnp.asarray(codes_lib.encode(index.binarizer, q))
    modes = scan_modes(jax.default_backend() == "gpu")
    signs = hk.code_signs(codes) if "scan tc" in modes else None
    qd = jnp.asarray(q)
    rows = []
    for mode in modes:
        for cand in lengths:
            try:
                secs, ids = timed(
                    lambda: scan_search(mode, qd, query_codes, codes, signs, xd, cand, 10)
                )
            except Exception as err:  # a kernel that fails must not cost the other rows
                print(f"{mode} L={cand}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            row = {"mode": mode, "L": cand, "batch": len(q), "width": 0}
            rows.append({**row, "recall@10": recall_at_10(ids, truth), "qps": len(q) / secs})
            print(json.dumps(rows[-1]), flush=True)
    return rows


WALK_CAPS = (1, 2, 4, 8)
# The fused walk's configs timed in the phases: (merge, queries a program, warps, gather).
# Fewer warps a query leave room for more queries an SM, whose gathers hide each other's latency
# (a query's iterations are a chain of dependent gathers); more queries a program give a
# program's own gathers more in flight.
# The default (graph_walk.default_config) first, then by the programs an SM holds (a run's
# time limit may cut the list short).
FUSED_CONFIGS = (
    ("scatter", 1, 2, "rows"),
    ("scatter", 1, 4, "words"),
    ("scatter", 1, 1, "words"),
    ("scatter", 1, 2, "words"),
    ("select", 1, 4, "words"),
    ("scatter", 4, 4, "words"),
)


def phases(index, q, spec: str, fused: bool = False) -> dict:
    """One batch's search (L:width:batch) timed a program at a time, as the index runs them:
    the seed (queries encoded, start lists), the walk (with its iteration cap, and cut at
    WALK_CAPS iterations: the slope is the cost of an iteration, the rest fixed), the rerank.
    With `fused`, the same walk by the Pallas kernel in each of FUSED_CONFIGS, and whether
    its lists equal the XLA walk's. Medians of 3 in ms, each program waited for."""
    candidates, width, batch = (int(v) for v in spec.split(":"))
    batch = min(batch, len(q))
    cfg = dataclasses.replace(
        index.search_config, candidates=candidates, width=width, batch_size=batch
    ).for_codes(len(index.ids))
    codes, graph, vectors, entries, deleted = (
        jax.device_put(getattr(index, name))
        for name in ("codes", "graph", "vectors", "entries", "deleted")
    )
    queries = jnp.asarray(q[:batch])

    def median_ms(fn):
        secs, out = timed(lambda: jax.block_until_ready(fn()))
        return 1e3 * secs, out

    seed_ms, (top, query_codes) = median_ms(
        lambda: search.seed_batch(queries, index.binarizer, codes, entries, candidates=candidates)
    )

    def walk(iterations, **walk_options):
        return search.walk_batch(
            query_codes,
            codes,
            graph,
            top,
            candidates=candidates,
            width=width,
            iterations=iterations,
            **walk_options,
        )

    walk_ms, (cand, _) = median_ms(lambda: walk(cfg.iterations()))
    cut_ms = {cap: median_ms(lambda: walk(cap))[0] for cap in WALK_CAPS}
    rerank_ms, _ = median_ms(
        lambda: search.rerank_batch(queries, vectors, cand, deleted, k=10, metric=index.metric)
    )
    print(f"seed {seed_ms:.2f} ms, walk {walk_ms:.2f} ms, rerank {rerank_ms:.2f} ms", flush=True)
    fused_ms, fused_equal = {}, {}
    for merge, block_q, warps, gather in FUSED_CONFIGS if fused else ():
        name = f"{merge}/{block_q}/{warps}/{gather}"
        config = graph_walk.GraphWalkConfig(
            block_q=block_q, num_warps=warps, merge=merge, gather=gather
        )
        try:
            fused_ms[name], (ids, _) = median_ms(
                lambda: walk(cfg.iterations(), fused=True, kernel_config=config)
            )
        except Exception as err:  # a config that fails to compile must not cost the others
            print(f"fused walk {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        fused_equal[name] = bool((ids == cand).all())
        # As it comes: a run cut off by its time limit keeps the configs it timed.
        same = "same lists" if fused_equal[name] else "LISTS DIFFER"
        print(f"fused walk {name}: {fused_ms[name]:.2f} ms ({same})", flush=True)
    slope = (cut_ms[WALK_CAPS[-1]] - cut_ms[WALK_CAPS[0]]) / (WALK_CAPS[-1] - WALK_CAPS[0])
    report = {
        "L": candidates,
        "width": width,
        "batch": batch,
        "iterations": cfg.iterations(),
        "seed_ms": seed_ms,
        "walk_ms": walk_ms,
        "walk_cut_ms": {str(c): t for c, t in cut_ms.items()},
        "walk_ms_per_iteration": slope,
        "rerank_ms": rerank_ms,
        "walk_fused_ms": fused_ms,
        "walk_fused_equal": fused_equal,
    }
    print(phases_line(report), flush=True)
    return report


def phases_line(ph: dict) -> str:
    cuts = ", ".join(f"{c}: {t:.2f}" for c, t in ph["walk_cut_ms"].items())
    line = (
        f"one batch of {ph['batch']} at L={ph['L']} width={ph['width']}: seed "
        f"{ph['seed_ms']:.2f} ms, walk {ph['walk_ms']:.2f} ms ({ph['iterations']} iterations at "
        f"most; cut at {cuts}; {ph['walk_ms_per_iteration']:.3f} ms an iteration), rerank "
        f"{ph['rerank_ms']:.2f} ms"
    )
    fused = ph.get("walk_fused_ms") or {}
    if fused:
        line += "; fused walk (merge/queries a program/warps/gather) " + ", ".join(
            f"{name}: {ms:.2f} ms ({ph['walk_ms'] / ms:.2f}x"
            + ("" if ph["walk_fused_equal"][name] else ", LISTS DIFFER")
            + ")"
            for name, ms in fused.items()
        )
    return line


def _write(path: str, report: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def _summary(report: dict) -> list[str]:
    rows, exact_qps = report["rows"], report["exact_qps"]
    ok = [r["qps"] for r in rows if r["recall@10"] >= 0.95]
    best = max(ok) if ok else None
    lines = [
        f"ann on {report['device']}, N={report['n']}, Q={report['nq']}, {report['date'][:10]}",
        f"build: first {report['build_first_s']:.1f} s (with compilation), second "
        f"{report['build_warm_s']:.1f} s (target <= 10 s at 1M)",
        f"exact float brute force (alijax.ann.exact, float32): {exact_qps:.0f} QPS; run 3's "
        f"baseline (default precision, a top_k over each chunk): "
        f"{report.get('exact_topk_per_chunk_qps', float('nan')):.0f} QPS",
        "| mode | L | batch | width | cap | recall@10 | QPS | x brute force |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.get('mode', 'graph')} | {r['L']} | {r['batch']} | {r['width'] or '-'} "
        f"| {r.get('cap') or '-'} | {r['recall@10']:.4f} | {r['qps']:.0f} "
        f"| {r['qps'] / exact_qps:.1f} |"
        for r in rows
    ]
    lines.append(
        "best QPS at recall@10 >= 0.95: "
        + ("none" if best is None else f"{best:.0f} = {best / exact_qps:.1f}x brute force")
        + " (target >= 10x)"
    )
    if report.get("phases"):
        lines.append(phases_line(report["phases"]))
    added = report["add"]
    if added:
        lines.append(
            f"add: first {ADD_FIRST} points {added['first_s']:.2f} s (with compilation), then "
            f"{added['points_per_s']:.0f} points/s in calls of {ADD_FIRST}"
        )
    return lines


if __name__ == "__main__":
    main()
