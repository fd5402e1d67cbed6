"""Lowers the GPU suite's programs for a Hopper GPU on any machine, CPU included.

  python benchmarks/gpu_lowering.py                     # ResNet-50 train steps, batch 256, 224x224
  python benchmarks/gpu_lowering.py --quick             # resnet_tiny, batch 8, 32x32
  python benchmarks/gpu_lowering.py --recipes da_int8+im2col --model resnet18 --image 112

Device time is scarce (a GPU is lent to some sessions only, 15 minutes each), and a program that
fails to lower, or compiles a hundred kernels, is found there too late. Pallas lowers its
kernels in Python (Triton IR, Mosaic GPU MLIR) before any GPU is involved, so this script traces
each recipe's full train step (as benchmarks/int8_step.py builds it) with alijax's GPU choices in
force (``as_if_on_hopper``: jax.default_backend() says "gpu", int8_matmul picks its Hopper
configs for 132 SMs) and lowers it with ``lowering_platforms=("cuda",)``. It prints, per recipe,
the seconds to trace and lower and the Pallas kernels the program holds (calls, distinct
kernels, by backend), and exits non-zero if any recipe fails to lower. What it cannot see: the
PTX / cubin compilation XLA does on the GPU machine, and anything about speed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
from int8_step import add_model_arguments, model_config

from alijax import train
from pallas_kernels import int8_matmul, int8_matmul_mosaic

HOPPER_SMS = 132  # H100 SXM / H200


@contextlib.contextmanager
def as_if_on_hopper():
    """alijax and pallas_kernels decide their GPU paths as on a Hopper GPU while this is open.
    Only for tracing and lowering: nothing may run on the (CPU) devices in between."""
    with (
        mock.patch.object(jax, "default_backend", lambda: "gpu"),
        mock.patch.object(int8_matmul, "on_hopper", lambda: True),
        mock.patch.object(int8_matmul_mosaic, "_num_sms", lambda: HOPPER_SMS),
    ):
        yield


# A Pallas kernel in lowered StableHLO: Mosaic GPU's custom call and Triton's. The kernel's name
# (pallas_call's `name`) is kept in its backend config, so distinct kernels are told apart by
# their whole serialized body.
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w$.]+)\(.*?backend_config\s*=\s*(.+)")
_BACKENDS = {"mosaic_gpu": "mosaic", "__gpu$xla.gpu.triton": "triton"}


_SIGNATURE = re.compile(r":\s*(\([^()]*\)\s*->\s*.+)$")


def _pallas_calls(hlo_text: str):
    """(backend, backend config, operand and result types) of each Pallas custom call."""
    for line in hlo_text.splitlines():
        match = _CUSTOM_CALL.search(line)
        if not match:
            continue
        target, config = match.groups()
        backend = next((b for t, b in _BACKENDS.items() if target.startswith(t)), None)
        if backend is not None:
            signature = _SIGNATURE.search(line)
            yield backend, config, signature.group(1) if signature else "?"


def pallas_kernels_in(hlo_text: str) -> dict:
    """{backend: (calls, distinct kernels, distinct shapes)} of the Pallas custom calls in
    lowered StableHLO. Calls: one per place in the program text (a function called twice with
    the same shapes is lowered once). Kernels: distinct serialized bodies, what XLA compiles
    (one by kernel hash); they embed source locations, so the same GEMM traced from two call
    paths can count twice. Shapes: distinct operand and result types."""
    calls = collections.Counter()
    bodies, shapes = collections.defaultdict(set), collections.defaultdict(set)
    for backend, config, signature in _pallas_calls(hlo_text):
        calls[backend] += 1
        bodies[backend].add(hash(config))
        shapes[backend].add(signature)
    return {b: (calls[b], len(bodies[b]), len(shapes[b])) for b in sorted(calls)}


def pallas_kernel_list(hlo_text: str) -> list[str]:
    """'backend (operand types) -> result type', one line per distinct kernel, sorted."""
    return sorted({f"{b} {sig}" for b, _, sig in _pallas_calls(hlo_text)})


def abstract_step_inputs(model, optimizer, batch_size: int, image: int, classes: int):
    """Shapes of (state, batch, rng) for the train step; no parameter is computed."""
    example = jnp.zeros((image, image, 3), jnp.float32)
    state = jax.eval_shape(
        lambda key: train.create_train_state(model, optimizer, example, key), jax.random.key(0)
    )
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image, image, 3), jnp.float32),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
    }
    del classes
    return state, batch, jax.random.key(1)


def lower_recipe(recipe: str, args) -> dict:
    """Traces and lowers one recipe's train step for CUDA; the row printed and returned."""
    dtype = "bfloat16" if recipe == "bf16" else "float32"
    with as_if_on_hopper():
        model = train.build_model(model_config(args.model, recipe, args.classes, dtype))
        optimizer = train.make_optimizer({"name": "sgd", "learning_rate": 0.1}, 1000)
        inputs = abstract_step_inputs(model, optimizer, args.batch, args.image, args.classes)
        step = jax.jit(train.make_train_step(model, optimizer), donate_argnums=0)
        start = time.perf_counter()
        traced = step.trace(*inputs)
        trace_s = time.perf_counter() - start
        start = time.perf_counter()
        lowered = traced.lower(lowering_platforms=("cuda",))
        lower_s = time.perf_counter() - start
    text = lowered.as_text()
    return {
        "recipe": recipe,
        "trace_s": trace_s,
        "lower_s": lower_s,
        "kernels": pallas_kernels_in(text),
        "kernel_list": pallas_kernel_list(text),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--recipes", default="bf16,da_int8+im2col,da_int8+bf16conv,da_int8")
    parser.add_argument("--list", action="store_true", help="print each distinct kernel's types")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.image, args.classes = "resnet_tiny", 8, 32, 10
    print(
        f"jax {jax.__version__}; lowering for cuda (Hopper, {HOPPER_SMS} SMs) on {jax.devices()[0].platform}"
    )
    print(f"{args.model} batch {args.batch} {args.image}x{args.image}", flush=True)
    rows = []
    for recipe in args.recipes.split(","):
        try:
            row = lower_recipe(recipe, args)
        except Exception as err:  # one failing recipe must not hide the others
            row = {"recipe": recipe, "error": f"{type(err).__name__}: {str(err)[:2000]}"}
        rows.append(row)
        kernel_list = row.pop("kernel_list", [])
        print(row, flush=True)
        if args.list:
            print("\n".join(f"  {line}" for line in kernel_list), flush=True)
    print(
        f"\n{'recipe':20s} {'trace s':>8s} {'lower s':>8s}  "
        "pallas kernels (calls / distinct kernels / distinct shapes)"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['recipe']:20s} {'-':>8s} {'-':>8s}  FAILED {row['error'][:200]}")
            continue
        kernels = ", ".join(f"{b} {c} / {d} / {e}" for b, (c, d, e) in row["kernels"].items())
        print(
            f"{row['recipe']:20s} {row['trace_s']:8.1f} {row['lower_s']:8.1f}  {kernels or 'none'}"
        )
    return int(any("error" in row for row in rows))


if __name__ == "__main__":
    sys.exit(main())
