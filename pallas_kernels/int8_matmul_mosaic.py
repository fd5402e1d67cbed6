"""INT8 x INT8 -> INT32 matmul on Hopper tensor cores through Pallas Mosaic GPU (wgmma).

Why a second backend: Pallas-Triton's int8 ``dot`` peaked at ~460 TOPS on an H200 (2026-11-26,
benchmarks/RESULTS.md), a quarter of the dense int8 peak, while XLA (cuBLASLt) reached 832.
Hopper's int8 rate needs ``wgmma`` fed by the bulk tensor copy engine (TMA) through swizzled
shared memory, with the copies issued by a warpgroup of their own so the tensor cores never wait:
Mosaic GPU exposes exactly those pieces.

Layout: int8 ``wgmma`` reads both operands K-major from shared memory (PTX ISA, wgmma: the
transpose bits exist only for 16-bit types). So this kernel takes ``a`` as [M, K] and ``b_t`` as
[N, K], both row-major: the "NT" product a @ b_t^T. That is G_X = G_Y W^T as stored; the forward
Y = X W needs W^T (a copy of the small weight), and G_W = X^T G_Y needs both big operands
transposed (see ``int8_matmul_nt``'s callers in int8_matmul.py).

Structure of one CTA (persistent: one CTA per multiprocessor walks over output tiles):
  - warpgroup 2 (the memory thread) streams [cta_m, tile_k] slices of a and [cta_n, tile_k]
    slices of b_t into a ring of ``stages`` shared-memory buffers with TMA;
  - warpgroups 0 and 1 each own a [tile_m, tile_n] int32 accumulator in registers (the CTA
    tile is two of them side by side along ``wg_dim``) and issue ``wgmma`` on each slice;
  - the epilogue converts, applies the per-row / per-column scales in float32, and writes the
    tile back through shared memory with TMA in [epi_m, epi_n] pieces, ``epi_slots`` deep so
    the next pieces are converted while the last ones are stored.

Shapes must divide the tiles; ``int8_matmul_nt`` zero-pads otherwise (exact, as zero rows and
columns add nothing to the int32 sums) and slices the result.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._shared import caller_independent_locations, pad_to, scale_accumulator

try:  # Mosaic GPU is importable on CPU too (its lowering and interpreter run there).
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - jax without Mosaic GPU
    plgpu = None

# Shared memory a CTA may use on Hopper (227 KiB), less room for the pipeline's barriers.
_SMEM_BYTES = 227 * 1024 - 1024
_HOPPER_SMS = 132


@dataclasses.dataclass(frozen=True)
class MosaicInt8Config:
    """Tiles of the Mosaic GPU int8 kernel.

    tile_m x tile_n is one compute warpgroup's accumulator (int32 in registers: tile_m * tile_n
    / 128 per thread, so at most 128 x 128 or 64 x 256). The CTA tile is two of them along
    ``wg_dim`` ("m" or "n"). tile_k is the K slice per pipeline step: 128 int8 = one 128-byte
    swizzle row. ``stages`` slices are in flight. The output is written in [epi_m, epi_n]
    pieces. Tiles are visited in a snake over ``grid_minor`` in strips of ``grid_width`` so
    neighbouring CTAs share operand panels in L2. ``split_k`` > 1 gives each output tile that
    many work items over slices of K (for outputs of too few tiles to fill 132 multiprocessors,
    the weight gradients); their int32 partials are summed and scaled by XLA, exactly."""

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 128
    stages: int = 4
    wg_dim: str = "n"
    epi_m: int = 64
    epi_n: int = 32
    grid_minor: str = "n"
    grid_width: int = 8
    split_k: int = 1  # work items per output tile, each summing a slice of K into int32 partials
    # Output pieces in flight per warpgroup. 2 ran on the H200; more may help the output-bound
    # small-K GEMMs, whose stores ran at ~1.1 TB/s with 2 (not yet timed).
    epi_slots: int = 2

    def cta_tile(self) -> tuple[int, int]:
        return (
            self.tile_m * (2 if self.wg_dim == "m" else 1),
            self.tile_n * (2 if self.wg_dim == "n" else 1),
        )

    def smem_bytes(self, out_itemsize: int) -> int:
        cta_m, cta_n = self.cta_tile()
        operands = self.stages * (cta_m + cta_n) * self.tile_k
        out = 2 * self.epi_slots * self.epi_m * self.epi_n * out_itemsize
        scales = 2 * (self.tile_m + self.tile_n) * 4
        return operands + out + scales

    def validate(self, out_itemsize: int = 4) -> None:
        if self.wg_dim not in ("m", "n") or self.grid_minor not in ("m", "n"):
            raise ValueError(
                f"config.wg_dim={self.wg_dim!r} and config.grid_minor={self.grid_minor!r} "
                "must each be 'm' or 'n'"
            )
        if self.tile_m % 64:
            raise ValueError(f"config.tile_m={self.tile_m} must be a multiple of 64 (wgmma M)")
        if self.tile_n not in (32, 64, 128, 256):
            # wgmma takes any multiple of 8 up to 256, but only these ran on the H200; 192 did
            # not finish (see _wide).
            raise ValueError(f"config.tile_n={self.tile_n} must be 32, 64, 128 or 256")
        if self.tile_m * self.tile_n > 128 * 128:
            raise ValueError(
                f"config.tile_m * tile_n = {self.tile_m * self.tile_n} must be <= 16384 "
                "(the int32 accumulator lives in 128 threads' registers)"
            )
        if self.tile_k not in (32, 64, 128):
            raise ValueError(f"config.tile_k={self.tile_k} must be 32, 64 or 128 (a swizzle)")
        if self.tile_m % self.epi_m or self.tile_n % self.epi_n or self.epi_m % 64:
            # The accumulator's register layout (wgmma's) comes in 64-row slabs: slicing it
            # finer failed Mosaic GPU's layout inference on the H200 (2026-11-26).
            raise ValueError(
                f"config.epi_m={self.epi_m}, epi_n={self.epi_n} must divide tile_m={self.tile_m}, "
                f"tile_n={self.tile_n} (epi_m a multiple of 64)"
            )
        if self.epi_n * out_itemsize % 16:
            raise ValueError(f"config.epi_n={self.epi_n} rows must be a multiple of 16 bytes")
        if self.stages < 2 or self.grid_width < 1 or self.split_k < 1 or self.epi_slots < 2:
            raise ValueError(
                f"config.stages={self.stages} must be >= 2, grid_width={self.grid_width} >= 1, "
                f"split_k={self.split_k} >= 1, epi_slots={self.epi_slots} >= 2"
            )
        if self.smem_bytes(out_itemsize) > _SMEM_BYTES:
            raise ValueError(
                f"config needs {self.smem_bytes(out_itemsize)} bytes of shared memory, "
                f"more than the {_SMEM_BYTES} a Hopper CTA has; lower stages or tiles"
            )


def _fits(dim: int, block: int) -> bool:
    return dim % block == 0


def _wide(m: int, n: int, tile_k: int) -> MosaicInt8Config:
    """Two warpgroup tiles per CTA: the pair (wg_dim, tile_n) whose CTA tile divides N (no
    padded output columns, whose writes and slicing cost as much as the product when K is
    small), preferring the 1-byte-per-op cheapest operand traffic, 128x256 or 256x128."""
    # (tile_m, tile_n, wg_dim): CTA 128x256, 256x128, 256x64, 128x128. Only power-of-two
    # tile_n: the one 64 x 192 tile tried on the H200 (2026-11-26) did not finish its test in 30 s
    # (a hang or a very slow compile, not yet diagnosed) while 32, 64, 128 and 256 ran correctly.
    options = (
        (128, 128, "n"),
        (128, 128, "m"),
        (128, 64, "m"),
        (64, 128, "m"),
    )
    for tile_m, tile_n, wg_dim in options:
        cfg = MosaicInt8Config(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, wg_dim=wg_dim)
        cta_m, cta_n = cfg.cta_tile()
        if _fits(n, cta_n) and _fits(m, cta_m):
            return cfg
    for tile_m, tile_n, wg_dim in options:  # M ragged: pad M only
        cfg = MosaicInt8Config(tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, wg_dim=wg_dim)
        if _fits(n, cfg.cta_tile()[1]):
            return cfg
    return MosaicInt8Config(tile_k=tile_k, wg_dim="m" if n <= 128 else "n")


def default_mosaic_config(m: int, n: int, k: int) -> MosaicInt8Config:
    """Per-shape default (H200 sweep of 2026-11-26, benchmarks/RESULTS.md): CTA tiles that divide
    N; a tile_k that divides K (no padded copy of the operands); K split when the output has
    too few tiles for the 132 multiprocessors."""
    tile_k = next((t for t in (128, 64) if k % t == 0), 128)
    cfg = _wide(m, n, tile_k)
    cta_m, cta_n = cfg.cta_tile()
    tiles = -(-m // cta_m) * -(-n // cta_n)
    k_steps = -(-k // tile_k)
    split = 1
    if tiles < _HOPPER_SMS and k_steps >= 16:
        # Enough splits for ~2 work items per multiprocessor, each >= 8 K steps; a divisor of
        # the K steps, so K is not padded further.
        want = min(-(-2 * _HOPPER_SMS // tiles), k_steps // 8)
        split = max(d for d in range(1, want + 1) if k_steps % d == 0)
    return dataclasses.replace(cfg, split_k=split)


def _interpret_params():
    """Mosaic GPU's interpreter is chosen by passing its params object (jax >= 0.11 exports it
    as plgpu.InterpretGPUParams; 0.10 keeps it private)."""
    params = getattr(plgpu, "InterpretGPUParams", None)
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _num_sms() -> int:
    device = jax.devices()[0]
    cores = getattr(device, "core_count", None) if device.platform == "gpu" else None
    return cores or _HOPPER_SMS


def _kernel(a_gmem, b_gmem, sa_gmem, sb_gmem, out_gmem, *, cfg: MosaicInt8Config, b_k_major: bool):
    """One persistent CTA: loops over its share of output tiles (see the module docstring).

    b_gmem is [N, K] when b_k_major (the hardware path), else [K, N]: Mosaic GPU's interpreter
    (jax 0.10) cannot apply wgmma to a transposed ref, and int8 wgmma on the chip cannot read an
    N-major B, so interpret mode runs the same kernel on the [K, N] layout."""
    m, k = a_gmem.shape
    n = b_gmem.shape[0] if b_k_major else b_gmem.shape[1]
    out_dtype = out_gmem.dtype
    tile_m, tile_n, tile_k = cfg.tile_m, cfg.tile_n, cfg.tile_k
    cta_m, cta_n = cfg.cta_tile()
    splits = cfg.split_k
    m_tiles, n_tiles, k_steps = m // cta_m, n // cta_n, k // tile_k // splits
    k_span = k_steps * tile_k  # K columns per work item
    scaled = sa_gmem is not None

    # K-major operands: each smem row is tile_k int8 = one swizzle span; wgmma wants 8-row tiles.
    swizzle = plgpu.find_swizzle(tile_k * 8)
    operand_transforms = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    if not b_k_major:  # the interpreter's [tile_k, cta_n] B tile: rows of cta_n bytes
        b_swizzle = plgpu.find_swizzle(min(cta_n, 128) * 8)
        b_transforms = (plgpu.TilingTransform((8, b_swizzle)), plgpu.SwizzleTransform(b_swizzle))
    else:
        b_transforms = operand_transforms
    out_swizzle = plgpu.find_swizzle(cfg.epi_n * jnp.dtype(out_dtype).itemsize * 8)
    out_transforms = (
        plgpu.TilingTransform((8, out_swizzle // jnp.dtype(out_dtype).itemsize)),
        plgpu.SwizzleTransform(out_swizzle),
    )

    def pipeline(step_fn, compute_context):
        return plgpu.emit_pipeline_warp_specialized(
            step_fn,
            grid=(k_steps,),
            memory_registers=40,
            in_specs=[
                plgpu.BlockSpec(
                    (cta_m, tile_k),
                    lambda s: (0, s),
                    transforms=operand_transforms,
                    memory_space=plgpu.SMEM,
                ),
                plgpu.BlockSpec(
                    (cta_n, tile_k) if b_k_major else (tile_k, cta_n),
                    lambda s: (0, s) if b_k_major else (s, 0),
                    transforms=b_transforms,
                    memory_space=plgpu.SMEM,
                ),
            ],
            wg_axis="wg",
            num_compute_wgs=2,
            max_concurrent_steps=cfg.stages,
            compute_context=compute_context,
        )

    def unused(*_, **__):
        return None

    scoped = dict(
        pipeline_allocs=pipeline(unused, unused).get_allocations(a_gmem, b_gmem),
        out_smem=plgpu.SMEM(
            (2, cfg.epi_slots, cfg.epi_m, cfg.epi_n), out_dtype, transforms=out_transforms
        ),
    )
    if scaled:
        scoped.update(
            sa_smem=plgpu.SMEM((2, tile_m), jnp.float32),
            sb_smem=plgpu.SMEM((2, tile_n), jnp.float32),
            scale_barrier=plgpu.Barrier(num_barriers=4),
        )

    @functools.partial(pl.run_scoped, collective_axes="wg", **scoped)
    def _scope(pipeline_allocs, out_smem, sa_smem=None, sb_smem=None, scale_barrier=None):
        wg = lax.axis_index("wg")
        minor = 1 if cfg.grid_minor == "n" else 0

        @plgpu.nd_loop((m_tiles * n_tiles * splits,), collective_axes="sm")
        def _tile_loop(info):
            (item,) = info.index
            tile, split = item // splits, item % splits
            mi, ni = plgpu.planar_snake(tile, (m_tiles, n_tiles), minor, cfg.grid_width)
            k_cols = pl.ds(split * k_span, k_span)
            out_tile = out_gmem if splits == 1 else out_gmem.at[split]
            cta_rows = pl.ds(mi * cta_m, cta_m)
            cta_cols = pl.ds(ni * cta_n, cta_n)
            if cfg.wg_dim == "m":
                wg_rows, wg_cols = pl.ds(wg * tile_m, tile_m), slice(None)
            else:
                wg_rows, wg_cols = slice(None), pl.ds(wg * tile_n, tile_n)

            def epilogue(run_pipeline):
                @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.int32))
                def _acc(acc_ref):
                    if scaled:  # fetch this warpgroup's scales while the K loop runs
                        plgpu.copy_gmem_to_smem(
                            sa_gmem.at[cta_rows].at[wg_rows],
                            sa_smem.at[wg],
                            scale_barrier.at[2 * wg],
                        )
                        plgpu.copy_gmem_to_smem(
                            sb_gmem.at[cta_cols].at[wg_cols],
                            sb_smem.at[wg],
                            scale_barrier.at[2 * wg + 1],
                        )
                    run_pipeline(acc_ref)
                    acc = acc_ref[...]
                    if scaled:
                        plgpu.barrier_wait(scale_barrier.at[2 * wg])
                        plgpu.barrier_wait(scale_barrier.at[2 * wg + 1])
                        rows = lax.broadcast_in_dim(sa_smem[wg], (tile_m, tile_n), (0,))
                        cols = lax.broadcast_in_dim(sb_smem[wg], (tile_m, tile_n), (1,))
                        result = (acc.astype(jnp.float32) * rows * cols).astype(out_dtype)
                    else:
                        result = acc.astype(out_dtype)
                    # The previous tile's stores must have read out_smem before it is reused.
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                    pieces_n = tile_n // cfg.epi_n
                    for pm in range(tile_m // cfg.epi_m):
                        for pn in range(pieces_n):
                            rows_p = slice(pm * cfg.epi_m, (pm + 1) * cfg.epi_m)
                            cols_p = slice(pn * cfg.epi_n, (pn + 1) * cfg.epi_n)
                            slot = (pm * pieces_n + pn) % cfg.epi_slots
                            # the store that last used this slot must have read it
                            plgpu.wait_smem_to_gmem(cfg.epi_slots - 1, wait_read_only=True)
                            out_smem[wg, slot] = result[rows_p, cols_p]
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(
                                out_smem.at[wg, slot],
                                out_tile.at[cta_rows, cta_cols]
                                .at[wg_rows, wg_cols]
                                .at[rows_p, cols_p],
                            )

            def step(_, a_smem, b_smem, acc_ref):
                # b_smem holds [cta_n, tile_k] K-major; .T is the [tile_k, n] view wgmma takes.
                b_view = b_smem.at[wg_cols].T if b_k_major else b_smem.at[:, wg_cols]
                plgpu.wgmma(acc_ref, a_smem.at[wg_rows], b_view)
                plgpu.wgmma_wait(0)
                return acc_ref

            pipeline(step, epilogue)(
                a_gmem.at[cta_rows, k_cols],
                b_gmem.at[cta_cols, k_cols] if b_k_major else b_gmem.at[k_cols, cta_cols],
                allocations=pipeline_allocs,
            )

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "interpret"))
def int8_matmul_nt(
    a, b_t, a_scale=None, b_scale=None, *, out_dtype=jnp.float32, config=None, interpret=False
):
    """a [M, K] int8 @ b_t [N, K]^T int8 -> int32 sums -> optional scales -> [M, N] out_dtype.

    Inputs are validated by the caller (int8_matmul.int8_matmul). ``interpret`` runs Mosaic GPU's
    interpreter (CPU tests); it simulates each warpgroup and is slow, so use small shapes.
    """
    m, k = a.shape
    n = b_t.shape[0]
    out_dtype = jnp.dtype(out_dtype)
    cfg = default_mosaic_config(m, n, k) if config is None else config
    splits = cfg.split_k
    scaled = splits == 1 and (a_scale is not None or b_scale is not None)  # else XLA scales
    # The kernel writes out_dtype only through its scale epilogue; otherwise the raw int32 sums.
    kernel_dtype = out_dtype if scaled else jnp.dtype(jnp.int32)
    cfg.validate(kernel_dtype.itemsize)
    cta_m, cta_n = cfg.cta_tile()
    a_p = pad_to(a, (cta_m, cfg.tile_k * splits))
    b_p = pad_to(b_t, (cta_n, cfg.tile_k * splits))
    mp, np_ = a_p.shape[0], b_p.shape[0]
    operands = [a_p, b_p.T if interpret else b_p]  # see _kernel: the interpreter's layout
    if scaled:  # one fused epilogue for both; a missing scale is 1
        sa = jnp.ones((m,), jnp.float32) if a_scale is None else a_scale.astype(jnp.float32)
        sb = jnp.ones((n,), jnp.float32) if b_scale is None else b_scale.astype(jnp.float32)
        operands += [pad_to(sa, (cta_m,)), pad_to(sb, (cta_n,))]
    out_shape = (mp, np_) if splits == 1 else (splits, mp, np_)

    def body(*refs):
        if scaled:
            a_ref, b_ref, sa_ref, sb_ref, o_ref = refs
        else:
            (a_ref, b_ref, o_ref), sa_ref, sb_ref = refs, None, None
        _kernel(a_ref, b_ref, sa_ref, sb_ref, o_ref, cfg=cfg, b_k_major=not interpret)

    num_sms = _num_sms()
    items = (mp // cta_m) * (np_ // cta_n) * splits
    call = plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct(out_shape, kernel_dtype),
        grid=(min(num_sms, items),),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params() if interpret else None,
    )
    with caller_independent_locations():
        out = call(*operands)
    if splits > 1:
        return scale_accumulator(out.sum(axis=0)[:m, :n], a_scale, b_scale, out_dtype)
    if (mp, np_) != (m, n):
        out = out[:m, :n]
    return out.astype(out_dtype) if out.dtype != out_dtype else out
