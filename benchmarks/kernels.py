"""Pallas kernels vs their baselines, side by side, on whatever device is present.

  python benchmarks/kernels.py [--quick] [--with-10m] [--budget-s 240] [--out PATH]

Rows: int8_matmul vs XLA int8 dot (int32 accumulate, same scale epilogue) and XLA bf16 dot, at
4096^3, 8192^3 and ResNet-50 (batch 256, 224x224) im2col GEMMs as alijax.quant.conv runs them:
forward Y = P(X) W; G_X of a stride-1 conv as the forward GEMM of G_Y with the flipped kernel,
P(G_Y) [M, taps C_out] W' (no row where that is the forward's shape, as for the square 3x3
layers), and for the stride-2 3x3 convs that open stages 2-4 G_Y W^T then col2im ("G_X s2",
M the output rows); G_W = P^T G_Y (as P^T [K, M] times (G_Y^T [N, M])^T, the layout
alijax.quant.conv builds). A handful of
Int8MatmulConfig candidates is swept and the best is reported with its config. hamming_topk (fused) vs XLA popcount distance matrix + lax.top_k, 256-bit codes,
k = 10. On CPU: a reduced set, the Pallas kernels only in interpret mode at toy sizes (to prove
the path), and alijax.ann.hamming.hamming_topk (chunked jnp) vs faiss IndexBinaryFlat.

Timing: warm-up (compiles), then the median of several samples, each a batch of back-to-back
calls ended by block_until_ready; inputs are random (never zero) and rotated between calls
when they fit in L2. A kernel that fails to lower or compile becomes a row with the first line
of its error, so one run gives the most information. Each fused/ours result is checked for
exact agreement with its baseline (column ``check``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from alijax.ann import hamming as ann_hamming  # noqa: E402
from pallas_kernels import hamming_topk as hk  # noqa: E402
from pallas_kernels import int8_matmul as im  # noqa: E402
from pallas_kernels import int8_matmul_mosaic as mk  # noqa: E402

L2_BYTES = 50 << 20


T0 = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def first_line(e: BaseException) -> str:
    for line in str(e).splitlines():
        if line.strip():
            return f"{type(e).__name__}: {line.strip()[:300]}"
    return type(e).__name__


def bench(fn, arg_sets, samples=5, target_s=0.02, max_calls=200):
    """Median seconds per call of fn(*args), rotating through arg_sets."""
    out = fn(*arg_sets[0])
    jax.block_until_ready(out)
    t = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[-1]))
    one = max(time.perf_counter() - t, 1e-7)
    calls = int(min(max_calls, max(1, target_s / one)))
    times = []
    for _ in range(samples):
        t = time.perf_counter()
        for c in range(calls):
            out = fn(*arg_sets[c % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def n_sets(nbytes):
    return 3 if nbytes * 3 <= L2_BYTES else 1


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    ours: str
    baseline: str
    unit: str
    ours_rate: float | None = None
    base_rate: float | None = None
    ratio: float | None = None
    config: str = ""
    check: str = ""
    error: str = ""


ROWS: list[Row] = []


def add(row: Row):
    if row.ours_rate and row.base_rate:
        row.ratio = row.ours_rate / row.base_rate
    ROWS.append(row)
    r = row
    log(
        f"{r.op:14s} {r.shape:34s} {r.ours:18s} {fmt(r.ours_rate):>9s} | {r.baseline:18s} "
        f"{fmt(r.base_rate):>9s} {r.unit:9s} x{fmt(r.ratio)} {r.check} {r.config} {r.error}"
    )


def fmt(x):
    return "-" if x is None else f"{x:.3g}"


def timed(fn, arg_sets):
    """(seconds, result, error-line)."""
    try:
        res = jax.block_until_ready(fn(*arg_sets[0]))
        return bench(fn, arg_sets), res, ""
    except Exception as e:  # noqa: BLE001 -- any lowering/compile failure becomes a row
        return None, None, first_line(e)


# ----------------------------------------------------------------------------- int8 matmul


def matmul_operands(rng_key, m, n, k, ta, tb, count):
    sets = []
    for i in range(count):
        ka, kb, ks1, ks2 = jax.random.split(jax.random.fold_in(rng_key, i), 4)
        a = jax.random.randint(ka, (k, m) if ta else (m, k), -127, 128, jnp.int8)
        b = jax.random.randint(kb, (n, k) if tb else (k, n), -127, 128, jnp.int8)
        sa = jax.random.uniform(ks1, (m,), jnp.float32, 0.5, 1.5)
        sb = jax.random.uniform(ks2, (n,), jnp.float32, 0.5, 1.5)
        sets.append((a, b, sa, sb))
    return sets


def xla_int8(a, b, sa, sb, *, ta, tb):
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sa[:, None] * sb[None, :]


def xla_bf16(a, b, *, ta, tb):
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# Pallas-Triton tiles, ordered by the 2026-11-26 H200 sweep (256x64x128, 4 warps, 3 stages led at
# 4096^3 and 8192^3 with 421 and 458 TOPS; it is now the default, tried first as None).
TRITON_CANDIDATES = [
    im.Int8MatmulConfig(256, 128, 128, num_warps=8, num_stages=3),
    im.Int8MatmulConfig(128, 64, 128, num_warps=4, num_stages=4),
    im.Int8MatmulConfig(128, 128, 64, num_warps=4, num_stages=4),
]
# Mosaic GPU (wgmma) tiles: per-warpgroup accumulator tile_m x tile_n, two warpgroups per CTA.
MOSAIC_CANDIDATES = [
    mk.MosaicInt8Config(),  # CTA 128x256, 4 stages of 128-deep K
    mk.MosaicInt8Config(wg_dim="m"),  # CTA 256x128
    mk.MosaicInt8Config(tile_m=64, tile_n=256, wg_dim="m", stages=3),  # CTA 128x256, wide wgmma
    mk.MosaicInt8Config(tile_k=64, stages=6),
    mk.MosaicInt8Config(grid_minor="m", grid_width=16),
    mk.MosaicInt8Config(stages=3),
]


def mosaic_variants(m, n, k):
    """The default Mosaic config for a shape, then the same with larger epilogue pieces (the
    output-bound small-K shapes: on 2026-11-26 their 64x32 stores ran at ~1.1 TB/s), then the
    other warpgroup split."""
    d = mk.default_mosaic_config(m, n, k)
    out = [d]
    if d.tile_n % 64 == 0:
        out.append(dataclasses.replace(d, epi_n=64, stages=2 if k <= 256 else d.stages))
        out.append(dataclasses.replace(d, epi_m=d.tile_m, epi_n=64, stages=2 if k <= 256 else 3))
    if k <= 256:  # output-bound: more stores in flight
        out.append(dataclasses.replace(d, stages=2, epi_slots=4))
    out.append(dataclasses.replace(d, wg_dim="n" if d.wg_dim == "m" else "m"))
    valid = []
    for cfg in out:
        try:
            cfg.validate()
            valid.append(cfg)
        except ValueError:
            pass
    return list(dict.fromkeys(valid))


def cfg_str(c):
    if c is None:
        return "default"
    return ",".join(f"{f.name}={getattr(c, f.name)}" for f in dataclasses.fields(c))


def backend_of(cfg):
    return "mosaic" if isinstance(cfg, mk.MosaicInt8Config) else "triton"


def sweep(shape, ops, sets, want, candidates, *, ta, tb, interpret, deadline):
    """Best (seconds, config, check, errors) over candidates; after the deadline, stops at the
    first success."""
    best, errors = None, []
    for cfg in candidates:
        if time.perf_counter() > deadline and best is not None:
            errors.append("sweep cut by --budget-s")
            break
        if isinstance(cfg, im.Int8MatmulConfig):  # the tiles, with the split of K that suits them
            split = im.default_split_k(*shape, cfg.block_m, cfg.block_n, cfg.block_k)
            cfg = dataclasses.replace(cfg, split_k=split)
        fn = functools.partial(
            im.int8_matmul, transpose_a=ta, transpose_b=tb, config=cfg, interpret=interpret
        )
        t, got, err = timed(fn, sets)
        name = f"{backend_of(cfg)} {cfg_str(cfg)}"
        if err:
            errors.append(f"[{name}] {err}")
            log(f"  {shape} {name} failed: {err}")
            continue
        ok = want is None or bool(jnp.allclose(got, want, rtol=1e-6, atol=0))
        log(f"  {shape} {name}: {ops / t / 1e12:.3g} TOPS {'ok' if ok else 'MISMATCH'}")
        if best is None or t < best[0]:
            best = (
                t,
                cfg if cfg is not None else im.default_config(*shape),
                "ok" if ok else "MISMATCH",
            )
    return best, errors


def run_matmul(name, m, n, k, ta, tb, *, interpret, backends, deadline):
    """backends: {"triton": [configs], "mosaic": [configs]}; a row per backend against XLA int8,
    and the best of all against XLA bf16."""
    ops = 2.0 * m * n * k
    count = n_sets(m * k + k * n + 4 * m * n)
    sets = matmul_operands(jax.random.key(m * 7 + n * 3 + k), m, n, k, ta, tb, count)
    shape = f"{name} M={m} N={n} K={k}" + (" tA" if ta else "") + (" tB" if tb else "")
    base_fn = jax.jit(functools.partial(xla_int8, ta=ta, tb=tb))
    t_int8, want, err_i8 = timed(base_fn, sets)
    bf_sets = [(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)) for a, b, _, _ in sets]
    t_bf16, _, err_bf = timed(jax.jit(functools.partial(xla_bf16, ta=ta, tb=tb)), bf_sets)
    del bf_sets
    rate = lambda t: None if t is None else ops / t / 1e12  # noqa: E731
    overall = None
    for backend, candidates in backends.items():
        best, errors = sweep(
            (m, n, k),
            ops,
            sets,
            want,
            candidates,
            ta=ta,
            tb=tb,
            interpret=interpret,
            deadline=deadline,
        )
        add(
            Row(
                "int8_matmul",
                shape,
                f"pallas {backend}" + (" (interp)" if interpret else ""),
                "xla int8",
                "TOPS",
                rate(best[0]) if best else None,
                rate(t_int8),
                config=cfg_str(best[1]) if best else "",
                check=best[2] if best else "",
                error="; ".join(errors + [e for e in (err_i8,) if e]),
            )
        )
        if best and (overall is None or best[0] < overall[0]):
            overall = (best[0], f"{backend} {cfg_str(best[1])}")
    add(
        Row(
            "int8_matmul",
            shape,
            "pallas best" + (" (interp)" if interpret else ""),
            "xla bf16",
            "TOPS",
            rate(overall[0]) if overall else None,
            rate(t_bf16),
            config=overall[1] if overall else "",
            error=err_bf,
        )
    )


def resnet50_gemms():
    """(name, M, N, K, transpose_a, transpose_b) of the im2col GEMMs of ResNet-50 layers at batch
    256, 224x224, as alijax.quant.conv runs them (M = batch * H * W of the output)."""
    b = 256
    layers = [  # (name, output rows, taps, C_in, C_out, opens a stage with stride 2)
        ("r50 l1 3x3", b * 56 * 56, 9, 64, 64, False),
        ("r50 l2 3x3", b * 28 * 28, 9, 128, 128, True),
        ("r50 l3 3x3", b * 14 * 14, 9, 256, 256, True),
        ("r50 l4 1x1", b * 7 * 7, 1, 512, 2048, False),
    ]
    gemms = []
    for name, m, taps, c_in, c_out, strided in layers:
        fwd = (m, c_out, taps * c_in, False, False)
        gemms.append((name + " fwd", *fwd))
        if strided:  # G_Y W^T, then col2im: the stride-2 conv of the same output size
            gemms.append((name + " G_X s2", m, taps * c_in, c_out, False, True))
        elif (m, c_in, taps * c_out) != fwd[:3]:
            gemms.append((name + " G_X", m, c_in, taps * c_out, False, False))
        # G_W = P^T G_Y with both operands built K-major ([K, M] patches and G_Y^T, the NT
        # form): no transposing copy.
        gemms.append((name + " G_W", taps * c_in, c_out, m, False, True))
    return gemms


def matmul_suite(args, on_gpu, deadline):
    def with_mosaic(backends):
        return {b: c for b, c in backends.items() if b != "mosaic" or not args.no_mosaic}

    if not on_gpu:
        # Interpret mode is a correctness path, not a fast one: toy sizes, Triton only (Mosaic
        # GPU's interpreter simulates each warpgroup: its tests cover it).
        for ta, tb in ((False, False), (False, True), (True, False)):
            run_matmul(
                "toy",
                128,
                96,
                160,
                ta,
                tb,
                interpret=True,
                backends={"triton": [None]},
                deadline=deadline,
            )
        return
    squares = [4096] if args.quick else [4096, 8192]
    for s in squares:
        backends = {
            "triton": [im.default_config(s, s, s)],
            "mosaic": MOSAIC_CANDIDATES[:4] if args.quick_sweep else MOSAIC_CANDIDATES,
        }
        run_matmul(
            f"{s}^3",
            s,
            s,
            s,
            False,
            False,
            interpret=False,
            backends=with_mosaic(backends),
            deadline=deadline,
        )
    gemms = resnet50_gemms()
    if args.quick:  # stages 1-2
        gemms = [g for g in gemms if g[0].startswith(("r50 l1", "r50 l2"))]
    for name, m, n, k, ta, tb in gemms:
        backends = {
            "triton": [im.default_config(m, n, k), TRITON_CANDIDATES[1]],
            "mosaic": mosaic_variants(m, n, k),
        }
        run_matmul(
            name,
            m,
            n,
            k,
            ta,
            tb,
            interpret=False,
            backends=with_mosaic(backends),
            deadline=deadline,
        )


# ----------------------------------------------------------------------------- hamming


def xla_hamming_topk(q, c, *, k):
    """The unfused baseline: full [Q, N] distance matrix, then lax.top_k. top_k runs on float32
    (exact for distances < 2**24; XLA:CPU's int32 top_k is ~100x slower than its f32 one)."""
    d = hk.hamming_distance_reference(q, c)
    neg, idx = lax.top_k(-d.astype(jnp.float32), k)
    return (-neg).astype(jnp.int32), idx


def hamming_inputs(q, n, w, seed):
    kq, kc = jax.random.split(jax.random.key(seed))
    queries = jax.random.bits(kq, (q, w), jnp.uint32)
    codes = jax.random.bits(kc, (n, w), jnp.uint32)
    return queries, codes


def same(a, b):
    return all(bool(jnp.array_equal(x, y)) for x, y in zip(a, b))


def hamming_candidates(q):
    """The default plus neighbours of the best configs of the 2026-11-26 H200 sweep."""
    if q <= 16:
        return [
            None,
            hk.HammingTopkConfig(block_q=16, block_n=1024, num_warps=4),
            hk.HammingTopkConfig(block_q=16, block_n=512, num_splits=132, num_warps=4),
            hk.HammingTopkConfig(block_q=16, block_n=256, num_splits=1056, num_warps=2),
        ]
    return [
        None,
        hk.HammingTopkConfig(block_q=32, block_n=128, num_warps=4),
        hk.HammingTopkConfig(block_q=32, block_n=512, num_warps=4),
        hk.HammingTopkConfig(block_q=16, block_n=256, num_warps=4),
        hk.HammingTopkConfig(block_q=32, block_n=256, num_warps=8),
        hk.HammingTopkConfig(block_q=32, block_n=256, num_splits=264, num_warps=4),
    ]


def tensorcore_candidates(q, *, interpret):
    """Tiles for the fused tensor-core top-k (never yet run on a GPU: a spread around the
    default, wider query blocks than popcount's since each block reads the 8x larger signs)."""
    if interpret:
        return [None]
    if q <= 16:
        return [
            None,
            hk.HammingTopkConfig(block_q=16, block_n=256, num_warps=4),
            hk.HammingTopkConfig(block_q=16, block_n=64, num_splits=528, num_warps=4),
        ]
    return [
        None,
        hk.HammingTopkConfig(block_q=32, block_n=128, num_warps=4),
        hk.HammingTopkConfig(block_q=64, block_n=64, num_warps=4),
        hk.HammingTopkConfig(block_q=64, block_n=256, num_warps=8),
        hk.HammingTopkConfig(block_q=128, block_n=128, num_warps=8),
        hk.HammingTopkConfig(block_q=128, block_n=64, num_warps=4),
    ]


def run_hamming(q, n, k, *, interpret, candidates, deadline, w=8, mosaic=False):
    queries, codes = hamming_inputs(q, n, w, q + n)
    codes_t = codes.T.copy() if not interpret else jnp.asarray(np.asarray(codes).T.copy())
    pairs = float(q) * n
    rate = lambda t: None if t is None else pairs / t / 1e9  # noqa: E731
    shape = f"Q={q} N={n} bits={32 * w} k={k}"
    t_base, want, err_b = timed(
        jax.jit(functools.partial(xla_hamming_topk, k=k)), [(queries, codes)]
    )
    # Three fused variants: popcount over codes stored word-major ("wn", swept) and packed
    # ("nw", default config only), and the int8 tensor-core top-k over the codes' signs (made
    # once, as an index would keep them; swept).
    variants = [
        ("wn", functools.partial(hk.hamming_topk, codes_layout="wn"), codes_t, candidates),
        ("nw", functools.partial(hk.hamming_topk, codes_layout="nw"), codes, candidates[:1]),
    ]
    signs = jax.block_until_ready(hk.code_signs(codes))
    variants.append(
        ("tc", hk.hamming_topk_tensorcore, signs, tensorcore_candidates(q, interpret=interpret))
    )
    for name, topk_fn, operand, configs in variants:
        best, errors = None, []
        for cfg in configs:
            if time.perf_counter() > deadline and best is not None:
                errors.append("sweep cut by --budget-s")
                break
            fn = functools.partial(topk_fn, k=k, config=cfg, interpret=interpret)
            t, got, err = timed(fn, [(queries, operand)])
            if err:
                errors.append(f"[{cfg_str(cfg)}] {err}")
                log(f"  {shape} {name} config {cfg_str(cfg)} failed: {err}")
                continue
            ok = want is None or same(got, want)
            log(
                f"  {shape} {name} {cfg_str(cfg)}: {rate(t):.3g} Gpairs/s {'ok' if ok else 'MISMATCH'}"
            )
            if best is None or t < best[0]:
                default = (
                    hk.default_tensorcore_config(q, n, 32 * w, k)
                    if name == "tc"
                    else hk.default_config(q, n, w, k)
                )
                best = (t, cfg or default, "ok" if ok else "MISMATCH")
        add(
            Row(
                "hamming_topk",
                shape,
                f"fused {name}" + (" (interp)" if interpret else ""),
                "xla popc+top_k",
                "Gpairs/s",
                rate(best[0]) if best else None,
                rate(t_base),
                config=cfg_str(best[1]) if best else "",
                check=best[2] if best else "",
                error="; ".join(errors + ([err_b] if err_b else [])),
            )
        )
    # The full distance matrix kernel vs XLA's (bandwidth of the [Q, N] int32 write dominates).
    if not interpret and q >= 64:
        t_xd, want_d, err_x = timed(jax.jit(hk.hamming_distance_reference), [(queries, codes)])
        dist_shape = shape.replace(f" k={k}", "")

        def dist_row(name, fn, args):
            t, got, err = timed(fn, [args])
            if got is None or want_d is None:
                check = ""
            else:
                check = "ok" if same((got,), (want_d,)) else "MISMATCH"
            add(
                Row(
                    "hamming_dist",
                    dist_shape,
                    name,
                    "xla popc",
                    "Gpairs/s",
                    rate(t),
                    rate(t_xd),
                    check=check,
                    error=err or err_x,
                )
            )

        dist_row(
            "pallas wn",
            functools.partial(hk.hamming_distance, codes_layout="wn"),
            (queries, codes_t),
        )
        if mosaic:
            # The int8 tensor-core formulation (Hopper, Mosaic): the full matrix.
            dist_row("int8 tensor cores", hk.hamming_distance_tensorcore, (queries, signs))
    return queries, codes, want


def run_hamming_cpu_peers(q, n, k, queries, codes, want, t_xla=None):
    """alijax.ann chunked jnp path vs faiss IndexBinaryFlat (and vs XLA full matrix)."""
    pairs = float(q) * n
    rate = lambda t: None if t is None else pairs / t / 1e9  # noqa: E731
    shape = f"Q={q} N={n} bits={32 * codes.shape[1]} k={k}"
    chunk = ann_hamming.default_chunk_size(q, n)
    fn = functools.partial(ann_hamming.hamming_topk_chunked, k=k, chunk_size=chunk)
    t_ours, got, err = timed(fn, [(queries, codes)])
    check = "" if got is None or want is None else ("ok" if same(got, want) else "MISMATCH")
    try:
        import faiss
    except ImportError:
        faiss = None
    t_f, err_f, fcheck = None, "faiss not installed", ""
    if faiss is not None:
        qn, cn = np.asarray(queries), np.asarray(codes)
        index = faiss.IndexBinaryFlat(cn.shape[1] * 32)
        index.add(cn.view(np.uint8))  # little-endian words: same bits, as bytes
        qb = qn.view(np.uint8)
        t_f = bench(lambda: index.search(qb, k), [()], samples=3, target_s=0.0)
        fd, _ = index.search(qb, k)
        err_f = ""
        if got is not None:
            fcheck = (
                "faiss dist ok" if np.array_equal(fd, np.asarray(got[0])) else "faiss dist MISMATCH"
            )
    add(
        Row(
            "hamming_topk",
            shape,
            f"ann chunked({chunk})",
            "faiss BinaryFlat",
            "Gpairs/s",
            rate(t_ours),
            rate(t_f),
            check=" ".join(x for x in (check, fcheck) if x),
            error=err or err_f,
        )
    )
    if t_xla is not None:
        add(
            Row(
                "hamming_topk",
                shape,
                f"ann chunked({chunk})",
                "xla popc+top_k",
                "Gpairs/s",
                rate(t_ours),
                rate(t_xla),
                check=check,
                error=err,
            )
        )


def hamming_suite(args, on_gpu, deadline):
    k = 10
    if not on_gpu:
        for q in (1, 16):
            run_hamming(q, 4096, k, interpret=True, candidates=[None], deadline=deadline)
        n = 1 << 18 if args.quick else 1 << 20
        for q in (1, 64) if args.quick else (1, 64, 512):
            queries, codes = hamming_inputs(q, n, 8, q + n)
            t, want, err = timed(
                jax.jit(functools.partial(xla_hamming_topk, k=k)), [(queries, codes)]
            )
            run_hamming_cpu_peers(q, n, k, queries, codes, want, t_xla=t)
        return
    sizes = [1 << 20] + ([10_000_000] if args.with_10m else [])
    for n in sizes:
        for q in (1, 64, 512):
            queries, codes, want = run_hamming(
                q,
                n,
                k,
                interpret=False,
                candidates=hamming_candidates(q),
                deadline=deadline,
                mosaic=not args.no_mosaic,
            )
            if q == 64 and n == sizes[0]:
                run_hamming_cpu_peers(q, n, k, queries, codes, want)
            del queries, codes, want


# ----------------------------------------------------------------------------- main


def print_table():
    hdr = (
        f"{'op':14s} {'shape':38s} {'ours':22s} {'ours':>9s} {'baseline':18s} {'base':>9s} "
        f"{'unit':9s} {'ratio':>6s} check / config / error"
    )
    print("\n" + hdr + "\n" + "-" * len(hdr))
    for r in ROWS:
        tail = " ".join(x for x in (r.check, r.config, r.error) if x)
        print(
            f"{r.op:14s} {r.shape:38s} {r.ours:22s} {fmt(r.ours_rate):>9s} {r.baseline:18s} "
            f"{fmt(r.base_rate):>9s} {r.unit:9s} {fmt(r.ratio):>6s} {tail}"
        )


class Stopped(Exception):
    """A SIGTERM (gpu_suite.sh's `timeout`) arrived: the rows so far are still printed and written."""


def _stop_on_sigterm() -> None:
    def stop(signum, frame):
        raise Stopped(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="reduced sizes (CPU smoke run)")
    p.add_argument("--with-10m", action="store_true", help="also N=10M codes for hamming_topk")
    p.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="after this many seconds, config sweeps stop at the first success",
    )
    p.add_argument("--only", choices=["matmul", "hamming"], default=None)
    p.add_argument(
        "--quick-sweep", action="store_true", help="fewer Mosaic candidates at 4096^3 and 8192^3"
    )
    p.add_argument(
        "--no-mosaic", action="store_true", help="leave the Mosaic GPU int8 kernel out of the sweep"
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    device = "gpu" if on_gpu else dev.platform
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"kernels-{device}.json"
    )
    log(f"jax {jax.__version__}, device {dev.device_kind} ({dev.platform}), quick={args.quick}")
    deadline = T0 + args.budget_s

    # A timeout's SIGTERM ends the suites, not the run: the table and the JSON were written only
    # at the end, so a run past BENCH_TIMEOUT on the GPU left neither (the log keeps each row).
    _stop_on_sigterm()
    stopped = None
    try:
        # Hamming first: its sweep is the smaller one, so the matmul sweep absorbs any budget cut.
        if args.only in (None, "hamming"):
            hamming_suite(args, on_gpu, deadline)
        if args.only in (None, "matmul"):
            matmul_suite(args, on_gpu, deadline)
    except Stopped as err:
        stopped = f"stopped by {err} after {time.perf_counter() - T0:.0f} s: the rows before it"
        log(stopped)
    print_table()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "device": dev.device_kind,
                "platform": dev.platform,
                "jax": jax.__version__,
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "args": vars(args),
                "stopped": stopped,
                "rows": [dataclasses.asdict(r) for r in ROWS],
            },
            f,
            indent=1,
        )
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
