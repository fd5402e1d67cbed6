"""Binary Distributed Graph index vs the libraries people use, one run, same data, same machine.

  python benchmarks/ann.py [--quick] [--n 100000] [--nq 1000] [--fvecs BASE.fvecs
                            --queries Q.fvecs] [--no-digits] [--out-dir benchmarks/results]
                            [--methods ours,hnswlib] [--vector-dtype float16] [--widths auto,1,4]
                            [--refines auto,0,8] [--caps 1,2] [--sweep 16,32,64,128,256,512]

Methods: ours (BinaryGraphIndex, 256-bit ITQ codes, degree 32, Hamming beam search + float
rerank), faiss IndexHNSWFlat (M=16, efConstruction=200), faiss IndexBinaryHNSW (M=16) on our
codes + float rerank, faiss IndexBinaryFlat (exact Hamming) + float rerank, hnswlib (M=16,
ef_construction=200). Every library gets the same thread count (all cores). Build time is wall
time including our JIT compilation. Recall@1/10/100 against exact float L2 ground truth (faiss
IndexFlatL2); QPS with all queries in one batch call, over a sweep of each method's search
parameter. Every method runs in its own spawned process; peak memory is the resident memory it
adds at its peak (build and searches) over its process with the data loaded (Linux VmHWM after a
reset). Writes <out-dir>/ann-<dataset>.json, a recall@10-vs-QPS PNG per data set, and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from alijax.ann import codes as codes_lib  # noqa: E402
from alijax.ann import search as search_lib  # noqa: E402
from alijax.ann.index import BinaryGraphIndex  # noqa: E402

T0 = time.perf_counter()
THREADS = os.cpu_count() or 1


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def synthetic(n, nq, dim=128, clusters=1000, latent=16, seed=0):
    """SIFT-like: clusters over random low-dimensional subspaces, non-negative, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 2
    basis = rng.normal(size=(clusters, latent, dim)).astype(np.float32) * (2 / np.sqrt(latent))
    total = n + nq
    out = np.empty((total, dim), np.float32)
    for s in range(0, total, 100_000):
        m = min(100_000, total - s)
        lab = rng.integers(0, clusters, m)
        z = rng.normal(size=(m, latent)).astype(np.float32)
        out[s : s + m] = (
            centres[lab] + np.einsum("nl,nld->nd", z, basis[lab]) + 0.1 * rng.normal(size=(m, dim))
        )
    out = np.maximum(out - out.min(), 0)  # descriptors are non-negative
    return out[:n], out[n:]


def digits():
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    return x[perm[200:]], x[perm[:200]]


def ground_truth(x, q, k):
    import faiss

    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    return index.search(q, k)[1]


def recalls(found, truth):
    out = {}
    for k in (1, 10, 100):
        if found.shape[1] >= k and truth.shape[1] >= k:
            hit = (found[:, :k, None] == truth[:, None, :k]).any(axis=2)
            out[f"recall@{k}"] = float(hit.mean())
    return out


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _method(name, x, q, truth, sweep, codes=None, qcodes=None):
    if name == "ours":
        build, rows, index = run_ours(x, q, truth, sweep, OURS_OPTIONS)
        return build, rows, (index.codes, codes_lib.encode(index.binarizer, q))
    if name == "hnswlib":
        return (*run_hnswlib(x, q, truth, sweep), None)
    if name == "faiss-hnsw":
        return (*run_faiss_hnsw(x, q, truth, sweep), None)
    kind = {"faiss-binary-hnsw": "hnsw", "faiss-binary-flat": "flat"}[name]
    return (*run_faiss_binary(x, q, truth, sweep, codes, qcodes, kind), None)


def _isolated(name, data_dir, sweep, ours_options):
    """Runs in a fresh process: loads the data, resets the peak-memory mark, runs one method.
    Returns (build s, rows, extra, peak MiB added over the loaded data)."""
    OURS_OPTIONS.update(ours_options)  # a spawned process starts from the module's defaults
    load = lambda f: (
        np.load(os.path.join(data_dir, f)) if os.path.exists(os.path.join(data_dir, f)) else None
    )  # noqa: E731
    x, q, truth = load("x.npy"), load("q.npy"), load("truth.npy")
    codes, qcodes = load("codes.npy"), load("qcodes.npy")
    import faiss

    faiss.omp_set_num_threads(THREADS)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    before = _status_mib("VmRSS")
    build, rows, extra = _method(name, x, q, truth, sweep, codes, qcodes)
    return build, rows, extra, _status_mib("VmHWM") - before


def run_method(name, data_dir, sweep):
    """One method in its own process (spawned: fresh interpreter, nothing inherited), so its
    peak memory is its own and no allocator reuse between methods hides any."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_isolated, (name, data_dir, sweep, OURS_OPTIONS))


def timed(fn, *args, repeat=5):
    """Best wall time of `repeat` calls after a warm-up. Best of 2 swung 2x between runs on a
    shared 2-core machine (another process's load comes and goes within a second); best of 5
    costs each method a few seconds at 1M."""
    fn(*args)  # warm-up (compilation, caches)
    best, result = np.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, result


def rerank(x, q, cand, k):
    d = ((x[np.maximum(cand, 0)] - q[:, None, :]) ** 2).sum(-1)
    d = np.where(cand < 0, np.inf, d)
    order = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(cand, order, axis=1)


def run_ours(x, q, truth, sweep, options=None):
    options = dict(options or {})
    widths = options.pop("search_widths", (None,))  # --widths: parents expanded per iteration
    caps = options.pop("search_caps", (1,))  # --caps: multiples of the default iteration cap
    refines = options.pop("search_refines", (None,))  # --refines: the rerank's float hop
    t = time.perf_counter()
    index = BinaryGraphIndex(bits=256, degree=32, **options).build(x)
    build = time.perf_counter() - t
    rows = []
    config = index.search_config
    # width / refine None: automatic
    for width, refine, times, cand in itertools.product(widths, refines, caps, sweep):
        if (width or 1) > cand or (refine or 0) > cand:
            continue
        # What the search resolves (automatic: by the index's size and L), and the cap.
        resolved = search_lib.SearchConfig(cand, width=width, refine=refine)
        resolved = resolved.for_codes(index.codes.shape[0])
        cap = times * resolved.iterations()
        index.search_config = dataclasses.replace(config, max_iterations=cap)
        k = min(100, cand)
        secs, (_, ids) = timed(index.search, q, k, cand, width, refine)
        param = f"L={cand}" + (f" w={width}" if width else "")
        param += (f" refine={refine}" if refine is not None else "") + (
            f" cap={cap}" if times > 1 else ""
        )
        row = {"param": param, "width": resolved.width, "auto": width is None, "cap": cap}
        row.update(refine=resolved.refine, refine_auto=refine is None)
        row.update(cap_times=times, qps=len(q) / secs)
        rows.append({**row, **recalls(ids, truth)})
    index.search_config = config
    return build, rows, index


def run_hnswlib(x, q, truth, sweep):
    import hnswlib

    t = time.perf_counter()
    index = hnswlib.Index(space="l2", dim=x.shape[1])
    index.init_index(max_elements=len(x), M=16, ef_construction=200, random_seed=0)
    index.add_items(x, np.arange(len(x)), num_threads=THREADS)
    build = time.perf_counter() - t
    rows = []
    for ef in sweep:
        k = min(100, ef)
        index.set_ef(ef)
        secs, (ids, _) = timed(lambda: index.knn_query(q, k=k, num_threads=THREADS))
        rows.append({"param": f"ef={ef}", "qps": len(q) / secs, **recalls(ids, truth)})
    return build, rows


def run_faiss_hnsw(x, q, truth, sweep):
    import faiss

    t = time.perf_counter()
    index = faiss.IndexHNSWFlat(x.shape[1], 16)
    index.hnsw.efConstruction = 200
    index.add(x)
    build = time.perf_counter() - t
    rows = []
    for ef in sweep:
        k = min(100, ef)
        index.hnsw.efSearch = ef
        secs, (_, ids) = timed(lambda: index.search(q, k))
        rows.append({"param": f"ef={ef}", "qps": len(q) / secs, **recalls(ids, truth)})
    return build, rows


def run_faiss_binary(x, q, truth, sweep, codes, qcodes, kind):
    import faiss

    bits = codes.shape[1] * 32
    xb, qb = codes.view(np.uint8), qcodes.view(np.uint8)  # little-endian words = bit order
    t = time.perf_counter()
    if kind == "hnsw":
        index = faiss.IndexBinaryHNSW(bits, 16)
        index.hnsw.efConstruction = 200
    else:
        index = faiss.IndexBinaryFlat(bits)
    index.add(xb)
    build = time.perf_counter() - t
    rows = []
    for cand in sweep:
        k = min(100, cand)
        if kind == "hnsw":
            index.hnsw.efSearch = cand

        def go():
            _, c = index.search(qb, cand)
            return rerank(x, q, c, k)

        secs, ids = timed(go)
        rows.append({"param": f"L={cand}", "qps": len(q) / secs, **recalls(ids, truth)})
    return build, rows


OURS_OPTIONS: dict = {}  # BinaryGraphIndex keyword arguments from the command line
SELECTED: set = set()  # --methods (empty: all)

METHODS = [
    ("ours", "ours (BDG, 256-bit ITQ, deg 32)"),
    ("hnswlib", "hnswlib (M=16, efC=200)"),
    ("faiss-hnsw", "faiss IndexHNSWFlat (M=16, efC=200)"),
    ("faiss-binary-hnsw", "faiss IndexBinaryHNSW + rerank"),
    ("faiss-binary-flat", "faiss IndexBinaryFlat + rerank"),
]


def best_at(rows, target=0.95, recall="recall@10"):
    ok = [r["qps"] for r in rows if r.get(recall, 0) >= target]
    return max(ok) if ok else None


# L (ours, the faiss binary indexes) and ef (the HNSWs) swept. 512: recall@100 >= 0.95 needs
# more binary candidates than 256 (1M synthetic: 0.948 at L=256), and the HNSWs' ef as many.
SWEEP = (16, 24, 32, 48, 64, 96, 128, 256, 512)
QUICK_SWEEP = (16, 32, 64, 128)


def bench(name, x, q, out_dir, quick, sweep=None):
    import faiss

    faiss.omp_set_num_threads(THREADS)
    log(f"{name}: {x.shape} base, {q.shape} queries")
    truth = ground_truth(x, q, min(100, len(x)))
    sweep = list(sweep or (QUICK_SWEEP if quick else SWEEP))
    results = {}
    with tempfile.TemporaryDirectory() as data_dir:
        for part, arr in (("x", x), ("q", q), ("truth", truth)):
            np.save(os.path.join(data_dir, f"{part}.npy"), arr)
        for method, label in METHODS:
            if SELECTED and method not in SELECTED:
                continue
            build, rows, extra, peak = run_method(method, data_dir, sweep)
            if extra is not None:  # our codes, for the faiss binary indexes
                np.save(os.path.join(data_dir, "codes.npy"), extra[0])
                np.save(os.path.join(data_dir, "qcodes.npy"), np.asarray(extra[1]))
            results[label] = {"build_s": build, "peak_mib": peak, "rows": rows}
            log(f"{label} built in {build:.1f} s, peak +{peak:.0f} MiB")
    report = {
        "dataset": name,
        "n": len(x),
        "nq": len(q),
        "dim": x.shape[1],
        "threads": THREADS,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "results": results,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"ann-{name}.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = markdown(report)
    with open(os.path.join(out_dir, f"ann-{name}.md"), "w") as f:
        f.write(table)
    print(table, flush=True)
    plot(report, os.path.join(out_dir, f"ann-{name}.png"))
    return report


def markdown(report):
    lines = [
        f"### {report['dataset']}: N={report['n']}, Q={report['nq']}, d={report['dim']}, "
        f"{report['threads']} threads",
        "",
        "| method | build s | peak MiB | param | recall@1 | recall@10 | recall@100 | QPS |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for method, res in report["results"].items():
        for i, r in enumerate(res["rows"]):
            build = f"{res['build_s']:.1f}" if i == 0 else ""
            peak = f"{res.get('peak_mib', float('nan')):.0f}" if i == 0 else ""
            lines.append(
                f"| {method if i == 0 else ''} | {build} | {peak} | {r['param']} | "
                f"{fmt(r.get('recall@1'))} | {fmt(r.get('recall@10'))} | "
                f"{fmt(r.get('recall@100'))} | {r['qps']:.0f} |"
            )
    lines.append("")
    for method, res in report["results"].items():
        best10, best100 = best_at(res["rows"]), best_at(res["rows"], recall="recall@100")
        lines.append(
            f"- {method}: best QPS at recall@10 >= 0.95: {best10}; at recall@100 >= 0.95: {best100}"
        )
    return "\n".join(lines) + "\n"


def _plot_line(row):
    """A line per chosen beam width and float hop (the automatic ones, which vary with L, are
    one line each) and cap multiple of ours; the others' one."""
    auto = row.get("auto", False)
    refine = "auto" if row.get("refine_auto", True) else str(row["refine"])
    return 0 if auto else row.get("width", 0), auto, row.get("cap_times", 1), refine


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for method, res in report["results"].items():
        line = _plot_line
        for width, auto, times, refine in sorted({line(r) for r in res["rows"]}):
            pts = [
                (r["recall@10"], r["qps"])
                for r in res["rows"]
                if "recall@10" in r and line(r) == (width, auto, times, refine)
            ]
            label = f"{method}, width {'auto' if auto else width}" if width or auto else method
            label += f", refine {refine}" if refine != "auto" else ""
            label += f", cap x{times}" if times > 1 else ""
            ax.plot(*zip(*pts), marker="o", label=f"{label} (build {res['build_s']:.0f} s)")
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_ylabel("queries per second")
    ax.set_title(f"{report['dataset']}: N={report['n']}, {report['threads']} threads")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k synthetic points, 500 queries")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--nq", type=int, default=1000)
    parser.add_argument("--fvecs", default=None, help="base vectors (.fvecs/.bvecs/.fbin)")
    parser.add_argument("--queries", default=None, help="queries for --fvecs")
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    names = ",".join(m for m, _ in METHODS)
    parser.add_argument("--methods", default=None, help=f"a subset of {names} (default: all)")
    parser.add_argument("--vector-dtype", default=None, help="ours: stored rerank vectors")
    parser.add_argument(
        "--widths",
        default="auto",
        help="ours: beam widths to sweep, e.g. auto,1,4 (default auto: search.auto_width)",
    )
    parser.add_argument(
        "--refines",
        default="auto",
        help="ours: float hops to sweep (best reranked candidates whose graph neighbours are "
        "scored too), e.g. auto,0,8 (default auto: 4 from L=256)",
    )
    parser.add_argument(
        "--caps",
        default="1",
        help="ours: multiples of the default iteration cap (L // (4 width) + 4) to sweep, e.g. 1,2",
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help=f"L / ef values to sweep (default {','.join(map(str, SWEEP))}; --quick "
        f"{','.join(map(str, QUICK_SWEEP))})",
    )
    args = parser.parse_args(argv)
    sweep = tuple(int(v) for v in args.sweep.split(",")) if args.sweep else None
    if sweep and min(sweep) < 1:
        raise ValueError(f"--sweep={args.sweep}: each L / ef must be >= 1")
    if args.methods:
        unknown = set(args.methods.split(",")) - {m for m, _ in METHODS}
        if unknown:
            raise ValueError(f"--methods: unknown {sorted(unknown)}; choose from {names}")
        SELECTED.update(args.methods.split(","))
        if any(m.startswith("faiss-binary") for m in SELECTED) and "ours" not in SELECTED:
            raise ValueError("--methods: the faiss binary indexes use ours' codes; add ours")
    if args.vector_dtype:
        OURS_OPTIONS["vector_dtype"] = args.vector_dtype
    widths = tuple(None if w == "auto" else int(w) for w in args.widths.split(","))
    if any(w is not None and w < 1 for w in widths):
        raise ValueError(f"--widths={args.widths}: each width must be 'auto' or >= 1")
    OURS_OPTIONS["search_widths"] = widths
    refines = tuple(None if r == "auto" else int(r) for r in args.refines.split(","))
    if any(r is not None and r < 0 for r in refines):
        raise ValueError(f"--refines={args.refines}: each must be 'auto' or >= 0")
    OURS_OPTIONS["search_refines"] = refines
    caps = tuple(int(c) for c in args.caps.split(","))
    if min(caps) < 1:
        raise ValueError(f"--caps={args.caps}: each multiple must be >= 1")
    OURS_OPTIONS["search_caps"] = caps
    if args.queries and not args.fvecs:
        raise ValueError("--queries: the queries of --fvecs's base; give --fvecs too")
    n, nq = (20_000, 500) if args.quick else (args.n, args.nq)
    # The user's files first: a bad one stops the run before the built-in data sets' minutes.
    user = user_data(args.fvecs, args.queries, nq) if args.fvecs else None
    x, q = synthetic(n, nq)
    bench(f"synthetic{n // 1000}k", x, q, args.out_dir, args.quick, sweep)
    if not args.no_digits:
        bench("digits", *digits(), args.out_dir, args.quick, sweep)
    if user is not None:
        name = os.path.splitext(os.path.basename(args.fvecs))[0]
        bench(name, *user, args.out_dir, args.quick, sweep)


def user_data(base_path, queries_path, nq: int) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries) float32 from --fvecs and --queries (without --queries, the base's last
    nq rows are the queries), checked: rows in both, one dimension."""
    from alijax.data.vecs import read_vecs

    x = np.asarray(read_vecs(base_path), np.float32)
    if queries_path:
        q = np.asarray(read_vecs(queries_path), np.float32)
    else:
        if x.shape[0] <= nq:
            raise ValueError(
                f"--fvecs {base_path}: {x.shape[0]} rows, not more than --nq {nq} (without "
                "--queries its last nq rows are the queries)"
            )
        x, q = x[:-nq], x[-nq:]
    if x.shape[0] < 2 or q.shape[0] < 1:
        raise ValueError(f"--fvecs / --queries: {x.shape[0]} base rows and {q.shape[0]} queries")
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"--queries {queries_path}: dimension {q.shape[1]}, --fvecs has {x.shape[1]}"
        )
    return x, q


if __name__ == "__main__":
    main()
