"""Training-step time of INT8 recipes vs bf16, side by side in one run.

  python benchmarks/int8_step.py                       # ResNet-50, batch 256, 224x224 (GPU)
  python benchmarks/int8_step.py --quick               # resnet_tiny, batch 32, 32x32 (CPU smoke)
  python benchmarks/int8_step.py --recipes bf16,da_int8,per_tensor_int8 --steps 20
  python benchmarks/int8_step.py --recipes bf16,da_int8+bf16conv   # GPU convs on bf16 codes
  python benchmarks/int8_step.py --recipes bf16,da_int8+im2col     # convs as int8 GEMMs

A recipe "NAME+bf16conv" is NAME with Recipe.gpu_conv_operands="bfloat16" (on GPU the integer
convs then run on the tensor cores; see alijax/quant/conv.py); "NAME+im2col" is NAME with
Recipe.conv_lowering="im2col" (each conv product one int8 GEMM, the Pallas kernel on GPU), and
"NAME+conv" with conv_lowering="conv" (every product a conv: on CPU the default "auto" runs the
backward as GEMMs).

Each recipe's full train step (forward, backward with quantized gradients, SGD update, the
quant_state threading) is jitted with the state donated, compiled and warmed up, then timed step
by step with block_until_ready; the table gives the median step time and its ratio to the first
recipe (bf16 by default). Writes JSON to --out.
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

import jax
import jax.numpy as jnp
import numpy as np

from alijax import train

VARIANTS = {
    "bf16conv": {"gpu_conv_operands": "bfloat16"},
    "im2col": {"conv_lowering": "im2col"},
    "conv": {"conv_lowering": "conv"},
}


def model_config(name: str, recipe: str, num_classes: int, dtype: str) -> dict:
    """recipe: a name in alijax.quant.RECIPES, optionally "+VARIANT" (VARIANTS)."""
    base, *variants = recipe.split("+")
    overrides = {}
    for variant in variants:
        if variant not in VARIANTS:
            raise ValueError(
                f"recipe variant {variant!r} in {recipe!r} is not one of {sorted(VARIANTS)}"
            )
        overrides.update(VARIANTS[variant])
    return {
        "name": name,
        "num_classes": num_classes,
        "dtype": dtype,
        "recipe": base,
        "recipe_overrides": overrides,
    }


def time_recipe(recipe: str, args) -> dict:
    """Median seconds per train step of `recipe`, after compile and warm-up."""
    # bf16 compute is the baseline; INT8 recipes keep float32 outside their integer products.
    dtype = "bfloat16" if recipe == "bf16" else "float32"
    model = train.build_model(model_config(args.model, recipe, args.classes, dtype))
    optimizer = train.make_optimizer({"name": "sgd", "learning_rate": 0.1}, 1000)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.image, args.image, 3)).astype(np.float32)
    batch = {
        "image": jnp.asarray(images),
        "label": jnp.asarray(rng.integers(0, args.classes, args.batch).astype(np.int32)),
    }
    state = train.create_train_state(model, optimizer, images[0], jax.random.key(0))
    step = jax.jit(train.make_train_step(model, optimizer), donate_argnums=0)
    # Compilation and the first step are timed and printed apart, as each ends: a run cut
    # off by the suite's timeout then still says which of the two it was in.
    start = time.perf_counter()
    step = step.lower(state, batch, jax.random.key(1)).compile()
    compile_s = time.perf_counter() - start
    print(f"  {recipe}: compiled in {compile_s:.1f} s", flush=True)
    start = time.perf_counter()
    state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(metrics["loss"])
    print(f"  {recipe}: first step {time.perf_counter() - start:.2f} s", flush=True)
    for _ in range(2):
        state, metrics = step(state, batch, jax.random.key(1))
    jax.block_until_ready(state)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, batch, jax.random.key(1))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    return {
        "recipe": recipe,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "compile_s": compile_s,
        "loss": loss,
        "finite": bool(np.isfinite(loss)),
    }


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The train step's model and input: ResNet-50, batch 256, 224x224 by default (--quick: a
    tiny model); shared with gpu_lowering.py."""
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--image", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser)
    parser.add_argument("--recipes", default="bf16,da_int8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.image, args.classes, args.steps = "resnet_tiny", 32, 32, 10, 5
    device = jax.devices()[0]
    print(
        f"jax {jax.__version__}, {device.device_kind}; {args.model} batch {args.batch} "
        f"{args.image}x{args.image}",
        flush=True,
    )
    rows = []
    for recipe in args.recipes.split(","):
        try:
            row = time_recipe(recipe, args)
        except Exception as err:  # one failing recipe must not hide the others' numbers
            row = {
                "recipe": recipe,
                "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
            }
        print(row, flush=True)
        rows.append(row)
    base = rows[0].get("median_s")
    print(
        f"\n{'recipe':18s} {'step ms':>9s} {'compile s':>10s} {'vs ' + rows[0]['recipe']:>10s}  loss"
    )
    for row in rows:
        if "error" in row:
            print(f"{row['recipe']:18s} {'-':>9s} {'-':>10s} {'-':>10s}  {row['error']}")
            continue
        ratio = row["median_s"] / base if base else float("nan")
        print(
            f"{row['recipe']:18s} {1e3 * row['median_s']:9.2f} {row['compile_s']:10.1f} "
            f"{ratio:10.3f}  {row['loss']:.4f}"
        )
    write_results(args.out, f"int8_step-{device.platform}.json", args, rows)


def write_results(out: str | None, default_name: str, args, rows) -> None:
    """The run's rows as JSON, with the device, jax version, arguments and time, to `out` (None:
    benchmarks/results/default_name)."""
    here = os.path.dirname(os.path.abspath(__file__))
    out = out or os.path.join(here, "results", default_name)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(
            {
                "device": jax.devices()[0].device_kind,
                "jax": jax.__version__,
                "args": vars(args),
                "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "rows": rows,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
