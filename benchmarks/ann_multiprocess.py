"""The graph build across processes (jax.distributed) vs the same mesh in one process, one run.

  python benchmarks/ann_multiprocess.py [--n 1000000] [--layouts 1x1,1x8,2x4,4x2]
                                        [--out benchmarks/results/ann-multiprocess.json]

A layout PxD is P processes of D simulated CPU devices each, all on this machine: the build's
rings then cross process boundaries through JAX's CPU collectives (gloo over TCP), which is
what a multi-host build pays and a one-process mesh does not. Every layout builds the graph
over the same codes (synthetic 128-d, 256-bit LSH codes, degree 32); the table gives the
build time of a second build (compiled) and of the first (with compilation), and checks that
every layout made the same graph as 1x1 (a digest of it). Machines here have 2 cores, so every
layout shares them: the ratios price the collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(args) -> None:
    """One process of a layout: builds twice, process 0 prints a JSON line of its times."""
    sys.path[:0] = [ROOT, HERE]
    import jax
    import numpy as np
    from ann import synthetic

    from alijax import parallel
    from alijax.ann import codes, graph

    parallel.maybe_initialize_distributed()
    x = synthetic(args.n, 1)[0]
    codes_ = codes.encode(codes.fit_lsh(x.shape[1], 256, jax.random.key(0), vectors=x), x)
    del x
    mesh = parallel.make_mesh()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        g = graph.build_graph(codes_, 32, mesh=mesh)
        times.append(time.perf_counter() - t)
    if jax.process_index() == 0:
        digest = hashlib.sha256(np.ascontiguousarray(g).tobytes()).hexdigest()[:16]
        record = {"first_s": times[0], "second_s": times[1], "graph_sha256": digest}
        print("RESULT " + json.dumps(record), flush=True)


def run_layout(n: int, processes: int, devices: int, timeout: int) -> dict:
    from alijax.parallel import run_local_processes

    command = [sys.executable, os.path.abspath(__file__), "--child", "--n", str(n)]
    runs = run_local_processes(command, processes, devices, timeout)
    _, log = runs[0]
    lines = [line for line in log.splitlines() if line.startswith("RESULT ")]
    if any(code for code, _ in runs) or not lines:
        raise SystemExit(f"layout {processes}x{devices} failed:\n{log[-3000:]}")
    return {"processes": processes, "devices": devices, **json.loads(lines[-1][7:])}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--layouts", default="1x1,1x8,2x4,4x2", help="PxD: processes x devices")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per layout")
    parser.add_argument("--out", default="benchmarks/results/ann-multiprocess.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    rows = []
    for layout in args.layouts.split(","):
        processes, devices = (int(v) for v in layout.split("x"))
        rows.append(run_layout(args.n, processes, devices, args.timeout))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    lines = [
        f"graph build over {args.n} codes (256-bit, degree 32), {os.cpu_count()} cores, "
        f"{datetime.date.today()}",
        f"| processes x devices | build s | first build s | vs {base['processes']}x"
        f"{base['devices']} | same graph |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['processes']}x{r['devices']} | {r['second_s']:.1f} | {r['first_s']:.1f} "
            f"| {r['second_s'] / base['second_s']:.2f} "
            f"| {'yes' if r['graph_sha256'] == base['graph_sha256'] else 'NO'} |"
        )
    print("\n".join(lines), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "n": args.n,
                "cores": os.cpu_count(),
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
