"""Probe: does XLA compute int8 dot + per-row/column scales correctly on this device?

On an H200 (jax 0.11.2, 2026-11-26) `int8_matmul_reference` returned exactly twice the float64
answer at M=37, N=70, K=45 while the Pallas kernel matched float64. This prints, per shape and
variant, the median ratio of XLA's result to float64 numpy (1.0 is right).

  python benchmarks/probe_int8_reference.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DIMS = (((1,), (0,)), ((), ()))


def dot_i32(a, b):
    return lax.dot_general(a, b, DIMS, preferred_element_type=jnp.int32)


VARIANTS = {
    "int32 dot": lambda a, b, sa, sb: dot_i32(a, b).astype(jnp.float32),
    "dot*sa*sb": lambda a, b, sa, sb: dot_i32(a, b).astype(jnp.float32) * sa[:, None] * sb[None, :],
    "dot*sa": lambda a, b, sa, sb: dot_i32(a, b).astype(jnp.float32) * sa[:, None],
    "dot*sb": lambda a, b, sa, sb: dot_i32(a, b).astype(jnp.float32) * sb[None, :],
    "barrier": lambda a, b, sa, sb: (
        lax.optimization_barrier(dot_i32(a, b)).astype(jnp.float32) * sa[:, None] * sb[None, :]
    ),
    "outer scale": lambda a, b, sa, sb: dot_i32(a, b).astype(jnp.float32) * (sa[:, None] * sb),
}


def main():
    print("jax", jax.__version__, jax.devices()[0].device_kind)
    rng = np.random.default_rng(7)
    for m, n, k in [(37, 70, 45), (37, 70, 48), (64, 64, 64), (128, 256, 512), (1024, 1024, 1024)]:
        a = rng.integers(-128, 128, (m, k), dtype=np.int8)
        b = rng.integers(-128, 128, (k, n), dtype=np.int8)
        sa = rng.uniform(0.01, 2.0, m).astype(np.float32)
        sb = rng.uniform(0.01, 2.0, n).astype(np.float32)
        exact = a.astype(np.int64) @ b.astype(np.int64)
        for name, fn in VARIANTS.items():
            want = exact.astype(np.float64)
            if "sa" in name or name in ("barrier", "outer scale"):
                want = want * sa[:, None]
            if "sb" in name or name in ("barrier", "outer scale"):
                want = want * sb[None, :]
            for mode, f in (("jit", jax.jit(fn)), ("eager", fn)):
                got = np.asarray(f(a, b, sa, sb), np.float64)
                ok = np.allclose(got, want, rtol=1e-5, atol=1e-3)
                ratio = np.median(got[want != 0] / want[want != 0])
                print(
                    f"{m:5d}x{n:5d}x{k:5d} {name:12s} {mode:5s} ratio {ratio:.6f} {'ok' if ok else 'WRONG'}"
                )


if __name__ == "__main__":
    main()
