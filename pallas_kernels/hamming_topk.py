"""Binary (Hamming) distance and fused Hamming top-k over packed uint32 codes (Pallas, Triton).

Codes are packed little-endian into uint32 words: bit i of a code is bit (i % 32) of word i // 32
(see alijax.ann.hamming.pack_bits). queries: [Q, W], codes: [N, W], W = bits / 32.

``hamming_topk`` never writes the Q x N distance matrix. Grid = (query blocks, N splits); each
program walks its split in tiles of block_n codes and keeps a running top-k per query as packed
int32 keys ``dist << index_bits | index_within_split``: one ``min`` yields distance and index
together, the lower index wins ties, and every key is distinct. A tile enters the running list
by repeated min-extraction only while some row of the block still has a key below its current
k-th best, so after the first tiles most tiles cost one row-min. A small jnp stage then merges
the per-split lists (Q x splits*k) to the final k, sorting by (distance, global index).

Codes may be given as [N, W] ("nw", the packed layout) or pre-transposed [W, N] ("wn", store it
once in an index: each word row is contiguous so tile loads are coalesced). Neither layout is
copied or padded by the wrappers: the N edge is handled by masked loads.

The tensor-core formulation (``hamming_distance_tensorcore``): with each bit as +1 (0) or -1
(1), the dot product of two codes is bits - 2 d, so d = (bits - q . c) / 2, an int8 GEMM
(int8_matmul_mosaic, Hopper wgmma) over codes unpacked to signs once (``code_signs``, 8x the
packed size). Its ceiling is the int8 tensor-core rate (~1400 TOPS measured, 2 * bits ops a pair)
against popcount's ~0.5 T pairs/s for 256-bit codes; it writes the full matrix.
``hamming_topk_tensorcore`` fuses it with the same running top-k (Pallas-Triton, one int8 ``dot``
per tile), so only the tie-broken keys leave the kernel, as with ``hamming_topk``. It reads the
signs, bits bytes a code, once per query block: wider query blocks than popcount's pay off.

Public API:
  hamming_distance(queries, codes, *, codes_layout, config, interpret) -> int32 [Q, N]
  hamming_distance_tensorcore(queries, code_signs, *, config, interpret) -> int32 [Q, N]
  code_signs(codes, *, codes_layout) -> int8 [N, bits]
  hamming_topk(queries, codes, k, *, codes_layout, config, interpret)
      -> (distances int32 [Q, k], indices int32 [Q, k]), ascending (distance, index)
  hamming_topk_tensorcore(queries, signs, k, *, config, interpret) -> the same
  hamming_distance_reference, hamming_topk_reference, HammingTopkConfig, default_config,
  default_tensorcore_config
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._shared import (
    TritonCompilerParams,
    caller_independent_locations,
    is_pow2,
    next_pow2,
    triton_dot,
)
from pallas_kernels.int8_matmul_mosaic import MosaicInt8Config, int8_matmul_nt

_INT32_MAX = 2**31 - 1
# Programs to aim for when choosing the number of N splits: a few waves on a 132-SM H100/H200.
_TARGET_PROGRAMS = 4 * 132


@dataclasses.dataclass(frozen=True)
class HammingTopkConfig:
    """Tiles for the Hamming kernels. block_q, block_n: powers of two (Triton tensor shapes);
    num_splits: how many programs share the N axis per query block (None: chosen from the shape
    so about _TARGET_PROGRAMS programs run)."""

    block_q: int = 64
    block_n: int = 128
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 1

    def validate(self) -> None:
        for name in ("block_q", "block_n", "num_warps"):
            v = getattr(self, name)
            if not is_pow2(v):
                raise ValueError(f"config.{name}={v} must be a power of two")
        if self.block_n < 16:
            raise ValueError(f"config.block_n={self.block_n} must be >= 16")
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"config.num_splits={self.num_splits} must be >= 1")
        if self.num_stages < 1:
            raise ValueError(f"config.num_stages={self.num_stages} must be >= 1")


def default_config(q: int, n: int, n_words: int, k: int = 10) -> HammingTopkConfig:
    """Per-shape default, from the sweep on an H200 (benchmarks/RESULTS.md, 2026-11-26): 32
    queries a block beat 64 and 128 by 3x at Q = 64 and 512 (the [block_q, block_n] int32 tile and
    the running top-k stay in registers), and one query needs a wider code tile."""
    del n, n_words, k
    if q <= 16:
        return HammingTopkConfig(block_q=16, block_n=512, num_splits=None, num_warps=4)
    return HammingTopkConfig(block_q=32, block_n=256, num_splits=None, num_warps=4)


def _check(queries, codes, codes_layout):
    """Validates inputs and returns (q, n, w)."""
    if codes_layout not in ("nw", "wn"):
        raise ValueError(f"codes_layout={codes_layout!r} must be 'nw' ([N, W]) or 'wn' ([W, N])")
    for name, x in (("queries", queries), ("codes", codes)):
        if x.dtype != jnp.uint32:
            raise ValueError(f"{name}.dtype={x.dtype} must be uint32 (packed bit words)")
        if x.ndim != 2:
            raise ValueError(f"{name}.shape={x.shape} must be 2-D")
    q, wq = queries.shape
    n, wc = codes.shape if codes_layout == "nw" else codes.shape[::-1]
    if wq != wc:
        raise ValueError(
            f"queries has {wq} words per code but codes has {wc} "
            f"({queries.shape=}, {codes.shape=}, {codes_layout=})"
        )
    if wq < 1:
        raise ValueError(f"queries.shape={queries.shape}: need at least one word per code")
    return q, n, wq


def _key_bits(n_words: int) -> tuple[int, int]:
    """(index_bits, pad_distance) of the packed key ``dist << index_bits | index``.

    Real distances are 0..bits, padding gets bits + 1. Reserving (bits + 2).bit_length() bits for
    the distance keeps every real or padded key below 2**31 - 2**index_bits, so the initial
    sentinels 2**31 - 1 - slot (distinct, so one slot is replaced at a time) sort after them.
    """
    bits = 32 * n_words
    dist_bits = (bits + 2).bit_length()
    return 31 - dist_bits, bits + 1


# ----------------------------------------------------------------------------- references


def hamming_distance_reference(queries, codes, *, codes_layout="nw"):
    """Plain jnp: int32 [Q, N] Hamming distances between queries [Q, W] and codes [N, W]."""
    _check(queries, codes, codes_layout)
    if codes_layout == "wn":
        codes = codes.T
    x = lax.bitwise_xor(queries[:, None, :], codes[None, :, :])
    return lax.population_count(x).astype(jnp.int32).sum(axis=-1, dtype=jnp.int32)


def hamming_topk_reference(queries, codes, k, *, codes_layout="nw"):
    """Plain jnp: the k nearest codes per query, ascending by (distance, index).

    lax.top_k returns the lower index first among equal values, so on negated distances it
    breaks ties towards the lower code index. Returns (int32 [Q, k], int32 [Q, k])."""
    _, n, _ = _check(queries, codes, codes_layout)
    k = _check_k(k, n)
    d = hamming_distance_reference(queries, codes, codes_layout=codes_layout)
    neg, idx = lax.top_k(-d, k)
    return -neg, idx.astype(jnp.int32)


def _check_k(k, n) -> int:
    """k as an int (numpy integers too), 1 <= k <= n."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k={k!r} must be an int >= 1") from None
    if k < 1:
        raise ValueError(f"k={k} must be an int >= 1")
    if k > n:
        raise ValueError(f"k={k} must be <= N={n} (number of codes)")
    return k


# ----------------------------------------------------------------------------- kernels


def _as_i32(x):
    # Triton's popcount takes int32; the bits are unchanged by the bitcast.
    return lax.bitcast_convert_type(x, jnp.int32)


def _load_code_word(c_ref, w, start, size, valid, codes_layout):
    """Word w of codes start..start+size as an int32 [size] vector (zeros where not valid).
    The ref is indexed per word (never slicing a loaded block, which Pallas-Triton can't lower)."""
    w = np.int32(w)  # a numpy scalar: the interpreter's load rule needs .shape on indices
    view = (
        c_ref.at[pl.ds(start, size), w] if codes_layout == "nw" else c_ref.at[w, pl.ds(start, size)]
    )
    return plgpu.load(view, mask=valid, other=0)


def _tile_distances(q_words, c_ref, start, size, valid, codes_layout):
    """int32 [block_q, size] distances of the query words (list of W int32 [block_q]) to codes
    start..start+size."""
    d = None
    for w, qw in enumerate(q_words):
        cw = _load_code_word(c_ref, w, start, size, valid, codes_layout)
        pc = lax.population_count(lax.bitwise_xor(qw[:, None], cw[None, :]))
        d = pc if d is None else d + pc
    return d


def hamming_distance_kernel(
    q_ref, c_ref, o_ref, *, n_queries, n_codes, n_words, block_q, block_n, codes_layout
):
    """One [block_q, block_n] tile of the distance matrix. All refs are whole arrays: the Q and N
    edges are masked loads/stores, so nothing is padded or written out of bounds."""
    q0 = pl.program_id(0) * block_q
    n0 = pl.program_id(1) * block_n
    row_ok = q0 + jnp.arange(block_q) < n_queries
    col_ok = n0 + jnp.arange(block_n) < n_codes
    q_words = [
        plgpu.load(q_ref.at[pl.ds(q0, block_q), np.int32(w)], mask=row_ok, other=0)
        for w in range(n_words)
    ]
    d = _tile_distances(q_words, c_ref, n0, block_n, col_ok, codes_layout)
    plgpu.store(
        o_ref.at[pl.ds(q0, block_q), pl.ds(n0, block_n)], d, mask=row_ok[:, None] & col_ok[None, :]
    )


@functools.partial(jax.jit, static_argnames=("codes_layout", "config", "interpret"))
def hamming_distance(queries, codes, *, codes_layout="nw", config=None, interpret=False):
    """Full Hamming distance matrix as a Pallas kernel.

    Args:
      queries: uint32 [Q, W]; codes: uint32 [N, W] ("nw") or [W, N] ("wn").
    Returns:
      int32 [Q, N].
    """
    q, n, w = _check(queries, codes, codes_layout)
    if q == 0 or n == 0:  # (no grid to launch)
        return jnp.zeros((q, n), jnp.int32)
    cfg = default_config(q, n, w) if config is None else config
    cfg.validate()
    kernel = functools.partial(
        hamming_distance_kernel,
        n_queries=q,
        n_codes=n,
        n_words=w,
        block_q=cfg.block_q,
        block_n=cfg.block_n,
        codes_layout=codes_layout,
    )
    with caller_independent_locations():
        return pl.pallas_call(
            kernel,
            grid=(pl.cdiv(q, cfg.block_q), pl.cdiv(n, cfg.block_n)),
            out_shape=jax.ShapeDtypeStruct((q, n), jnp.int32),
            compiler_params=TritonCompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            ),
            interpret=interpret,
            name="hamming_distance",
        )(_as_i32(queries), _as_i32(codes))


def code_signs(codes, *, codes_layout="nw"):
    """Packed uint32 codes -> int8 [N, 32 W]: +1 where a bit is 0, -1 where it is 1 (bit i of a
    code is bit i % 32 of word i // 32, as everywhere here). The tensor-core operand; compute it
    once per code set, it is 8x the packed size."""
    if codes.dtype != jnp.uint32 or codes.ndim != 2:
        raise ValueError(f"codes must be uint32 [N, W]; got {codes.dtype} {codes.shape}")
    if codes_layout == "wn":
        codes = codes.T
    shifts = jnp.arange(32, dtype=jnp.uint32)
    bits = (codes[:, :, None] >> shifts) & jnp.uint32(1)
    return (1 - 2 * bits.astype(jnp.int8)).reshape(codes.shape[0], -1)


def _check_signs(queries, signs) -> int:
    """Validates the tensor-core operands (packed queries, the codes' signs); returns bits."""
    if queries.dtype != jnp.uint32 or queries.ndim != 2 or queries.shape[1] < 1:
        raise ValueError(
            f"queries must be uint32 [Q, W] with W >= 1; got {queries.dtype} {queries.shape}"
        )
    bits = 32 * queries.shape[1]
    if signs.dtype != jnp.int8 or signs.ndim != 2 or signs.shape[1] != bits:
        raise ValueError(
            f"signs must be int8 [N, {bits}] (code_signs of codes with {queries.shape[1]} "
            f"words); got {signs.dtype} {signs.shape}"
        )
    return bits


@functools.partial(jax.jit, static_argnames=("config", "interpret"))
def hamming_distance_tensorcore(queries, signs, *, config=None, interpret=False):
    """Full Hamming distance matrix on the int8 tensor cores (Mosaic GPU wgmma; Hopper).

    Args:
      queries: uint32 [Q, W]; signs: int8 [N, 32 W] from ``code_signs(codes)``.
      config: a MosaicInt8Config (None: int8_matmul_mosaic's default for [Q, N, 32 W]).
    Returns:
      int32 [Q, N], equal to ``hamming_distance(queries, codes)``: the GEMM sums bits products
      of +-1, exactly, in int32.
    """
    bits = _check_signs(queries, signs)
    if config is not None and not isinstance(config, MosaicInt8Config):
        raise ValueError(f"config must be a MosaicInt8Config, got {type(config).__name__}")
    if queries.shape[0] == 0 or signs.shape[0] == 0:  # (no grid to launch)
        return jnp.zeros((queries.shape[0], signs.shape[0]), jnp.int32)
    dots = int8_matmul_nt(
        code_signs(queries), signs, out_dtype=jnp.int32, config=config, interpret=interpret
    )
    return (bits - dots) >> 1


def _running_topk(
    o_ref, tile_distances, *, n_codes, block_n, split_size, k, index_bits, pad_distance
):
    """Walks one split of the codes in tiles of block_n and writes the running top-k keys.

    tile_distances(start, valid) -> int32 [block_q, block_n]: the distances of the block's
    queries to codes start..start+block_n (anything where not valid). o_ref: int32 [block_q, kp]
    packed keys, unsorted; slots >= k hold negative fillers.
    """
    block_q, kp = o_ref.shape
    split_start = pl.program_id(1) * split_size
    lane = jnp.arange(block_n, dtype=jnp.int32)
    slot = lax.broadcasted_iota(jnp.int32, (block_q, kp), 1)
    # Distinct sentinels above every real key in slots < k; fillers below every key (so never
    # the k-th best, never replaced) in the power-of-two padding slots >= k.
    best0 = jnp.where(slot < k, _INT32_MAX - slot, -1 - slot)

    def not_done(state):
        _, _, tile_min, worst = state
        # No reduce_or in Pallas-Triton: test "any row has tile_min < worst" with a min.
        return jnp.min(tile_min - worst) < 0

    def extract(state):
        keys, best, tile_min, worst = state
        take = (tile_min < worst)[:, None]
        best = jnp.where(take & (best == worst[:, None]), tile_min[:, None], best)
        keys = jnp.where(take & (keys == tile_min[:, None]), _INT32_MAX, keys)
        return keys, best, jnp.min(keys, axis=1), jnp.max(best, axis=1)

    def tile(t, carry):
        best, worst = carry
        local = t * block_n + lane
        valid = split_start + local < n_codes
        d = tile_distances(split_start + t * block_n, valid)
        d = jnp.where(valid[None, :], d, pad_distance)
        keys = d * (1 << index_bits) + local[None, :]
        _, best, _, worst = lax.while_loop(
            not_done, extract, (keys, best, jnp.min(keys, axis=1), worst)
        )
        return best, worst

    best, _ = lax.fori_loop(0, split_size // block_n, tile, (best0, jnp.max(best0, axis=1)))
    o_ref[...] = best


def hamming_topk_kernel(q_ref, c_ref, o_ref, *, n_words, block_n, codes_layout, **topk):
    """Running top-k of one query block over one split of the codes, distances by popcount.

    q_ref: int32 [block_q, W] (a block of the padded queries); c_ref: the whole codes array.
    """
    q_words = [q_ref[:, w] for w in range(n_words)]

    def tile_distances(start, valid):
        return _tile_distances(q_words, c_ref, start, block_n, valid, codes_layout)

    _running_topk(o_ref, tile_distances, block_n=block_n, **topk)


def _sign_chunk(bits: int) -> int:
    """The K step of the tensor-core tile: the largest power of two <= 256 dividing bits (>= 32,
    as bits is a multiple of 32; int8 MMA takes K in steps of 32)."""
    return min(256, bits & -bits)


def hamming_topk_tensorcore_kernel(q_ref, s_ref, o_ref, *, bits, block_n, **topk):
    """Running top-k of one query block over one split of the codes, distances on the tensor
    cores: d = (bits - q . c) / 2 over +-1 signs, one int8 dot per tile and K chunk.

    q_ref: int8 [block_q, bits] (signs of a block of the padded queries); s_ref: the whole int8
    [N, bits] signs of the codes, read in [block_n, chunk] pieces by masked loads.
    """
    chunk = _sign_chunk(bits)
    # The query block's signs, loaded once per program (not once per tile), in K chunks.
    q_chunks = [q_ref[:, pl.ds(c * chunk, chunk)] for c in range(bits // chunk)]

    def tile_distances(start, valid):
        rows_ok = jnp.broadcast_to(valid[:, None], (block_n, chunk))
        dots = None
        for c, q_signs in enumerate(q_chunks):
            view = s_ref.at[pl.ds(start, block_n), pl.ds(c * chunk, chunk)]
            signs = plgpu.load(view, mask=rows_ok, other=0)
            dot = triton_dot(q_signs, signs, trans_b=True)
            dots = dot if dots is None else dots + dot
        return (bits - dots) >> 1

    _running_topk(o_ref, tile_distances, block_n=block_n, **topk)


def _split_plan(q, n, n_words, cfg):
    """(num_splits, split_size): split_size a multiple of block_n that fits the key's index bits."""
    index_bits, _ = _key_bits(n_words)
    max_split = (1 << index_bits) // cfg.block_n * cfg.block_n
    if max_split < cfg.block_n:
        raise ValueError(
            f"{n_words=} words leave {index_bits=} index bits, too few for block_n={cfg.block_n}"
        )
    q_blocks = pl.cdiv(q, cfg.block_q)
    tiles = pl.cdiv(n, cfg.block_n)
    splits = cfg.num_splits or max(1, pl.cdiv(_TARGET_PROGRAMS, q_blocks))
    splits = min(splits, tiles)
    split_size = min(pl.cdiv(tiles, splits) * cfg.block_n, max_split)
    return pl.cdiv(n, split_size), split_size


def _merge_candidates(keys, k, split_size, index_bits):
    """int32 [Q, S, kp] per-split keys -> final (distances, indices) [Q, k] by (dist, index)."""
    q, s, kp = keys.shape
    filler = keys < 0
    dist = jnp.where(filler, _INT32_MAX, keys >> index_bits)
    local = keys & ((1 << index_bits) - 1)
    index = jnp.arange(s, dtype=jnp.int32)[None, :, None] * split_size + local
    index = jnp.where(filler, _INT32_MAX, index)
    dist, index = lax.sort(
        (dist.reshape(q, s * kp), index.reshape(q, s * kp)), dimension=1, num_keys=2
    )
    return dist[:, :k], index[:, :k]


def _fused_topk(kernel, query_rows, codes, n, n_words, k, cfg, interpret, name):
    """Launches a running-top-k kernel over (query blocks, N splits) and merges the splits.

    query_rows: [Q, width] per-query operand (packed words or signs), padded here to whole
    blocks (queries are small; codes are never copied); codes: passed whole to the kernel.
    kernel(q_ref, c_ref, o_ref, **topk) must accept the _running_topk keywords.
    """
    q, width = query_rows.shape
    if q == 0:  # (no grid to launch)
        return jnp.zeros((0, k), jnp.int32), jnp.zeros((0, k), jnp.int32)
    kp = next_pow2(k)
    index_bits, pad_distance = _key_bits(n_words)
    num_splits, split_size = _split_plan(q, n, n_words, cfg)
    bq = cfg.block_q
    q_pad = pl.cdiv(q, bq) * bq
    if q_pad != q:
        query_rows = jnp.pad(query_rows, ((0, q_pad - q), (0, 0)))
    kernel = functools.partial(
        kernel,
        n_codes=n,
        block_n=cfg.block_n,
        split_size=split_size,
        k=k,
        index_bits=index_bits,
        pad_distance=pad_distance,
    )
    with caller_independent_locations():
        keys = pl.pallas_call(
            kernel,
            grid=(q_pad // bq, num_splits),
            in_specs=[pl.BlockSpec((bq, width), lambda i, s: (i, 0)), pl.no_block_spec],
            out_specs=pl.BlockSpec((bq, kp), lambda i, s: (i, s)),
            out_shape=jax.ShapeDtypeStruct((q_pad, num_splits * kp), jnp.int32),
            compiler_params=TritonCompilerParams(
                num_warps=cfg.num_warps, num_stages=cfg.num_stages
            ),
            interpret=interpret,
            name=name,
        )(query_rows, codes)
    keys = keys[:q].reshape(q, num_splits, kp)
    return _merge_candidates(keys, k, split_size, index_bits)


@functools.partial(jax.jit, static_argnames=("k", "codes_layout", "config", "interpret"))
def hamming_topk(queries, codes, k, *, codes_layout="nw", config=None, interpret=False):
    """Fused Hamming k-nearest-neighbours: the [Q, N] distance matrix is never materialised.

    Args:
      queries: uint32 [Q, W]; codes: uint32 [N, W] ("nw") or [W, N] ("wn"); 1 <= k <= N.
      config: HammingTopkConfig; default_config(Q, N, W, k) when None.
    Returns:
      (distances int32 [Q, k], indices int32 [Q, k]), ascending by distance, ties by lower index.
    """
    q, n, w = _check(queries, codes, codes_layout)
    k = _check_k(k, n)
    cfg = default_config(q, n, w, k) if config is None else config
    cfg.validate()
    kernel = functools.partial(hamming_topk_kernel, n_words=w, codes_layout=codes_layout)
    return _fused_topk(
        kernel, _as_i32(queries), _as_i32(codes), n, w, k, cfg, interpret, "hamming_topk"
    )


def default_tensorcore_config(q: int, n: int, bits: int, k: int = 10) -> HammingTopkConfig:
    """Tiles of the tensor-core top-k. Not yet measured on a GPU (a guess to sweep from): unlike
    popcount, whose [block_q, block_n] tile of word operations fills the registers at 32 queries,
    the dot moves the work to the tensor cores and the codes' signs (bits bytes a code) are read
    once per query block, so wider query blocks cut the memory traffic."""
    del n, bits, k
    if q <= 16:
        return HammingTopkConfig(block_q=16, block_n=128, num_splits=None, num_warps=4)
    return HammingTopkConfig(block_q=64, block_n=128, num_splits=None, num_warps=4)


@functools.partial(jax.jit, static_argnames=("k", "config", "interpret"))
def hamming_topk_tensorcore(queries, signs, k, *, config=None, interpret=False):
    """hamming_topk with the distances on the int8 tensor cores (Pallas-Triton ``dot``).

    d = (bits - q . c) / 2 over +-1 signs, fused with the same running top-k, so the result is
    hamming_topk's exactly (same keys, same tie order).

    Args:
      queries: uint32 [Q, W]; signs: int8 [N, 32 W] from ``code_signs(codes)`` (made once per
        code set; 8x the packed size); 1 <= k <= N.
      config: HammingTopkConfig with block_q, block_n >= 16 (int8 MMA tiles);
        default_tensorcore_config(Q, N, bits, k) when None.
    Returns:
      (distances int32 [Q, k], indices int32 [Q, k]), ascending by distance, ties by lower index.
    """
    bits = _check_signs(queries, signs)
    q, w = queries.shape
    n = signs.shape[0]
    k = _check_k(k, n)
    cfg = default_tensorcore_config(q, n, bits, k) if config is None else config
    if not isinstance(cfg, HammingTopkConfig):
        raise ValueError(f"config must be a HammingTopkConfig, got {type(cfg).__name__}")
    cfg.validate()
    if cfg.block_q < 16:
        raise ValueError(f"config.block_q={cfg.block_q} must be >= 16 (int8 MMA tile rows)")
    kernel = functools.partial(hamming_topk_tensorcore_kernel, bits=bits)
    return _fused_topk(
        kernel, code_signs(queries), signs, n, w, k, cfg, interpret, "hamming_topk_tensorcore"
    )
