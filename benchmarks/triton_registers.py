"""Registers and spills of the fused graph walk's configs, on a machine without a GPU.

  python -m venv /tmp/tv && /tmp/tv/bin/pip install triton      # any triton; needs no GPU
  .venv/bin/python benchmarks/triton_registers.py --triton-python /tmp/tv/bin/python \
      [--configs 128:1:scatter:rows:1:2,128:1:select:words:1:4]

Each config is L:width:merge:gather:block_q:warps (pallas_kernels.graph_walk.GraphWalkConfig;
1M codes of 256 bits, degree 32, 10000 queries). The script lowers the kernel for CUDA here,
keeps the Triton IR that Pallas emits, compiles it to PTX for sm_90a with the given Python's
triton, and runs that triton's ptxas on it, which prints the registers a thread and any spills.
The registers bound how many programs an SM holds (65536 a Hopper SM), which is what a walk
of dependent gathers hides its latency with. XLA's own Triton may allocate differently: a guide
for choosing configs (graph_walk.default_config), not a GPU measurement.
"""

from __future__ import annotations

import argparse
import functools
import glob
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pallas_kernels import graph_walk as gw  # noqa: E402

DEFAULT_CONFIGS = (
    "64:1:scatter:rows:1:2,128:1:scatter:rows:1:2,128:1:scatter:words:1:4,"
    "128:1:select:words:1:4,128:2:scatter:rows:1:4,256:2:scatter:rows:1:8"
)

# Run by the triton Python: TTIR file, warps -> the PTX beside it.
_COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
path, warps = sys.argv[1], int(sys.argv[2])
kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
open(path[:-5] + ".ptx", "w").write(kernel.asm["ptx"])
"""


def triton_ir(size: int, width: int, config: gw.GraphWalkConfig) -> str:
    """The Triton IR (text) that Pallas lowers graph_walk to for this list and config."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    captured = []
    lower = registration.lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    try:
        spec = jax.ShapeDtypeStruct
        fn = functools.partial(gw.graph_walk, width=width, iterations=36, id_bits=20, config=config)
        operands = (
            spec((10_000, 8), jnp.uint32),
            spec((1 << 20, 8), jnp.uint32),
            spec((1 << 20, 32), jnp.int32),
            spec((10_000, size), jnp.uint32),
        )
        jax.jit(fn).trace(*operands).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
    return captured[-1]


def ptxas_of(triton_python: str) -> list[str]:
    """The ptxas binaries that the given Python's triton ships, newest first (its plain
    ptxas may be older than the PTX version its compiler writes)."""
    site = subprocess.run(
        [triton_python, "-c", "import triton, os; print(os.path.dirname(triton.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    found = sorted(glob.glob(os.path.join(site, "backends", "nvidia", "bin", "ptxas*")))
    if not found:
        raise SystemExit(f"no ptxas under {site}/backends/nvidia/bin")
    return sorted(found, key=lambda path: os.path.basename(path) == "ptxas")


def registers(ttir_path: str, warps: int, triton_python: str, ptxas: list[str]) -> str:
    """'N registers, S bytes spilled' (or the error) for one TTIR file."""
    compiled = subprocess.run(
        [triton_python, "-c", _COMPILE, ttir_path, str(warps)], capture_output=True, text=True
    )
    if compiled.returncode:
        return "triton failed: " + compiled.stderr.strip().splitlines()[-1][:200]
    ptx = ttir_path[:-5] + ".ptx"
    for binary in ptxas:
        info = subprocess.run(
            [binary, "-arch=sm_90a", "-v", ptx, "-o", ptx + ".cubin"],
            capture_output=True,
            text=True,
        )
        text = info.stdout + info.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        if regs:
            return f"{regs.group(1)} registers, {spill.group(1) if spill else '?'} bytes spilled"
    return "ptxas failed: " + text.strip()[-200:]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton-python", required=True, help="a Python with triton installed")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS)
    args = parser.parse_args(argv)
    ptxas = ptxas_of(args.triton_python)
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.configs.split(","):
            size, width, merge, gather, block_q, warps = spec.split(":")
            config = gw.GraphWalkConfig(
                block_q=int(block_q), num_warps=int(warps), merge=merge, gather=gather
            )
            path = os.path.join(tmp, spec.replace(":", "_") + ".ttir")
            with open(path, "w") as f:
                f.write(triton_ir(int(size), int(width), config))
            print(f"{spec}: {registers(path, int(warps), args.triton_python, ptxas)}", flush=True)


if __name__ == "__main__":
    main()
