"""INT8 conv products by lowering, side by side: conv vs im2col GEMM vs "auto", one run.

  python benchmarks/conv_lowering.py                 # ResNet-like layers at batch 32 (CPU)
  python benchmarks/conv_lowering.py --preset resnet50   # ResNet-50's 3x3 and 1x1 layers, batch 256
  python benchmarks/conv_lowering.py --batch 8 --out PATH

For each layer, each of the three int8 products of the DA-INT8 conv (forward Y = conv(X, W),
G_X, G_W; alijax.quant.conv.ConvProducts) is jitted under each lowering (Recipe.conv_lowering),
checked equal to the conv lowering's int32 result, and timed (median of --repeats calls after a
warm-up, the three lowerings' calls interleaved). The table gives ms per product and the ratio of im2col and auto to conv, which is
what "auto" is chosen from (conv._lowering_of); on a GPU, "conv" is cuDNN on float32 codes.
Then dense layers' G_W = X^T G_Y: int8_dot (on CPU it copies X^T first) against XLA's
dot_general contracting X's major axis. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from int8_step import write_results  # noqa: E402

conv_lib = importlib.import_module("alijax.quant.conv")

LOWERINGS = ("conv", "im2col", "auto")
PRODUCTS = ("forward", "grad_lhs", "grad_rhs")

# (name, H = W, C_in, C_out, kernel, stride)
PRESETS = {
    "tiny": [("tiny 3x3", 6, 8, 24, 3, 1), ("tiny 3x3 s2", 6, 24, 8, 3, 2)],  # the test's
    "small": [
        ("cifar 16 3x3", 32, 16, 16, 3, 1),
        ("cifar 32 3x3", 16, 32, 32, 3, 1),
        ("cifar 16->32 3x3 s2", 32, 16, 32, 3, 2),
        ("56 64 3x3", 56, 64, 64, 3, 1),
        ("28 128 3x3", 28, 128, 128, 3, 1),
        ("14 256 3x3", 14, 256, 256, 3, 1),
        ("56 64->256 1x1", 56, 64, 256, 1, 1),
        ("56 128 3x3 s2", 56, 128, 128, 3, 2),
    ],
    "digits": [  # resnet20 on 8x8 digits (configs/digits_resnet.py), batch 128
        ("digits 8x8 16 3x3", 8, 16, 16, 3, 1),
        ("digits 8x8 16->32 3x3 s2", 8, 16, 32, 3, 2),
        ("digits 4x4 32 3x3", 4, 32, 32, 3, 1),
        ("digits 4x4 32->64 3x3 s2", 4, 32, 64, 3, 2),
        ("digits 2x2 64 3x3", 2, 64, 64, 3, 1),
    ],
    "resnet50": [
        ("r50 l1 3x3", 56, 64, 64, 3, 1),
        ("r50 l2 3x3", 28, 128, 128, 3, 1),
        ("r50 l3 3x3", 14, 256, 256, 3, 1),
        ("r50 l4 3x3", 7, 512, 512, 3, 1),
        ("r50 l1 1x1 64->256", 56, 64, 256, 1, 1),
        ("r50 l2 3x3 s2", 56, 128, 128, 3, 2),
    ],
}


def interleaved_ms(fns: dict, args, repeats: int) -> dict:
    """Median ms per call of each function, their calls interleaved (one of each per round,
    after a warm-up call of each): the first program timed was otherwise slower (its first
    large buffers' page faults), whichever it was."""
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def layer_rows(name, size, c_in, c_out, kernel, stride, batch, repeats):
    geo = conv_lib.conv_geometry(
        (batch, size, size, c_in),
        (kernel, kernel, c_in, c_out),
        (stride, stride),
        "SAME",
        None,
        None,
        ("NHWC", "HWIO", "NHWC"),
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(-127, 128, geo.lhs_shape), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, geo.rhs_shape), jnp.int8)
    y_shape = jax.eval_shape(lambda: conv_lib.conv_forward(geo, x, w, jnp.int32)).shape
    g = jnp.asarray(rng.integers(-127, 128, y_shape), jnp.int8)
    operands = {"forward": (x, w), "grad_lhs": (g, w), "grad_rhs": (x, g)}
    rows = []
    for product in PRODUCTS:
        row = {"layer": name, "product": product, "batch": batch}
        args = (*operands[product], jnp.int32)
        want, working = None, {}
        for lowering in LOWERINGS:
            fn = jax.jit(
                getattr(conv_lib.ConvProducts(geo, lowering=lowering), product), static_argnums=2
            )
            try:
                got = np.asarray(fn(*args))
                if want is None:
                    want = got
                row[f"{lowering}_ok"] = bool(np.array_equal(got, want))
                working[lowering] = fn
            except Exception as err:  # one failing lowering must not hide the others
                row[f"{lowering}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        for lowering, ms in interleaved_ms(working, args, repeats).items():
            row[f"{lowering}_ms"] = ms
        rows.append(row)
        print(row, flush=True)
    return rows


# Dense G_W = X^T G_Y shapes (M = batch rows, K = in features, N = out features), for the
# int8_dot table: int8_dot against the plain lax.dot_general with A's major axis contracted.
DENSE_SHAPES = {"tiny": [(64, 32, 16)]}
DENSE_DEFAULT = [(1024, 512, 1000), (4096, 1024, 1024), (256, 2048, 1000)]


def dense_rows(shapes, repeats):
    """G_W of a dense layer: alijax's int8_dot(x, g, transpose_a=True) against XLA's
    dot_general on the same operands (on CPU int8_dot copies X^T first), checked equal."""
    from alijax.quant.dot_general import int8_dot

    rng = np.random.default_rng(0)
    rows = []
    for m, k, n in shapes:
        x = jnp.asarray(rng.integers(-127, 128, (1, m, k)), jnp.int8)
        g = jnp.asarray(rng.integers(-127, 128, (1, m, n)), jnp.int8)
        dims = (((1,), (1,)), ((0,), (0,)))
        xla = jax.jit(
            lambda x, g: jax.lax.dot_general(x, g, dims, preferred_element_type=jnp.int32)
        )
        ours = jax.jit(lambda x, g: int8_dot(x, g, transpose_a=True, use_kernel=False))
        row = {"M": m, "K": k, "N": n, "ok": bool(np.array_equal(ours(x, g), xla(x, g)))}
        ms = interleaved_ms({"xla": xla, "int8_dot": ours}, (x, g), repeats)
        row["xla_ms"], row["int8_dot_ms"] = ms["xla"], ms["int8_dot"]
        rows.append(row)
        print(row, flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument(
        "--batch", type=int, default=None, help="default: 256 resnet50, 128 digits, else 32"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    batch = args.batch or {"resnet50": 256, "digits": 128}.get(args.preset, 32)
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.device_kind}; preset {args.preset}, batch {batch}")
    rows = []
    for layer in PRESETS[args.preset]:
        rows += layer_rows(*layer, batch, args.repeats)

    def cell(row, lowering):
        if f"{lowering}_error" in row:
            return "error"
        mark = "" if row[f"{lowering}_ok"] else " (differs!)"
        return f"{row[f'{lowering}_ms']:.1f}{mark}"

    def ratio(row, lowering):
        if f"{lowering}_ms" not in row or "conv_ms" not in row:
            return "-"
        return f"{row[f'{lowering}_ms'] / row['conv_ms']:.2f}"

    print("\n| layer | product | conv ms | im2col ms | auto ms | im2col / conv | auto / conv |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['layer']} | {row['product']} | {cell(row, 'conv')} | {cell(row, 'im2col')} "
            f"| {cell(row, 'auto')} | {ratio(row, 'im2col')} | {ratio(row, 'auto')} |"
        )
    dense = dense_rows(DENSE_SHAPES.get(args.preset, DENSE_DEFAULT), args.repeats)
    print("\n| dense G_W M K N | XLA dot_general ms | int8_dot ms | XLA / int8_dot | equal |")
    print("|---|---|---|---|---|")
    for row in dense:
        print(
            f"| {row['M']} {row['K']} {row['N']} | {row['xla_ms']:.2f} | {row['int8_dot_ms']:.2f} "
            f"| {row['xla_ms'] / row['int8_dot_ms']:.1f} | {row['ok']} |"
        )
    rows += [{"layer": "dense G_W", **row} for row in dense]
    write_results(args.out, f"conv_lowering-{device.platform}-{args.preset}.json", args, rows)


if __name__ == "__main__":
    main()
