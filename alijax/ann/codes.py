"""Binarizers: float vectors -> packed binary codes (uint32 words, the hamming.pack_bits layout).

A `Binarizer(mean [D], projection [D, bits])` encodes x as bit i = ((x - mean) @ projection)[i] > 0.
Two fits, both in JAX:

- `fit_lsh`: sign of a random rotation (Charikar's SimHash). For bits <= D the projection has
  orthonormal columns (QR of a Gaussian); for bits > D it stacks independent orthonormal blocks.
  Centred by the data mean when vectors are given (uncentred sign hashes waste bits on data that
  sit off the origin).
- `fit_itq`: PCA to `bits` dimensions, then the iterative quantization rotation of Gong &
  Lazebnik (CVPR 2011): alternate B = sign(V R) and the orthogonal Procrustes step
  R = S Sh^T from the SVD of V^T B, which lowers ||B - V R||_F^2. When bits > D, PCA keeps all D
  dimensions and a random orthonormal expansion E [D, bits] (E E^T = I, a tight frame) lifts
  them to `bits` dimensions before ITQ; the rotation is then fitted in the lifted space (the
  paper only treats bits <= D; this keeps every code length usable).

The fit uses at most `max_fit_points` rows (an evenly spaced subsample), so fitting costs
O(max_fit_points * D^2) however large the data; `encode` runs in fixed-size batches so one
compiled function serves any N.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from alijax.ann.hamming import pack_bits

DEFAULT_MAX_FIT_POINTS = 25_000  # ITQ costs O(points * bits^2) per iteration


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["mean", "projection"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Binarizer:
    """mean float32 [D]; projection float32 [D, bits]; bits (a multiple of 32) = its columns."""

    mean: jax.Array
    projection: jax.Array

    @property
    def dim(self) -> int:
        return int(self.projection.shape[0])

    @property
    def bits(self) -> int:
        return int(self.projection.shape[1])


def check_bits(bits) -> int:
    if not isinstance(bits, (int, np.integer)) or bits <= 0 or bits % 32:
        raise ValueError(f"bits={bits!r} must be a positive multiple of 32")
    return int(bits)


def _orthonormal_columns(key, dim: int, bits: int) -> jax.Array:
    """float32 [dim, bits]: orthonormal columns when bits <= dim, else stacked orthonormal blocks
    (rows orthonormal: E E^T = I when bits is a multiple of dim; otherwise near-tight)."""
    blocks = []
    for i in range(-(-bits // dim)):
        g = jax.random.normal(jax.random.fold_in(key, i), (dim, dim), jnp.float32)
        q, r = jnp.linalg.qr(g)
        blocks.append(q * jnp.sign(jnp.diagonal(r)))  # sign fix: Haar-distributed
    return jnp.concatenate(blocks, axis=1)[:, :bits]


def _fit_sample(vectors, max_fit_points: int) -> np.ndarray:
    if not isinstance(max_fit_points, (int, np.integer)) or max_fit_points < 1:
        raise ValueError(f"max_fit_points={max_fit_points!r} must be a positive int")
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"vectors.shape={x.shape} must be [N > 0, D > 0]")
    if not np.isfinite(x).all():
        raise ValueError("vectors holds NaN or Inf")
    if x.shape[0] > max_fit_points:
        x = x[np.linspace(0, x.shape[0] - 1, max_fit_points).astype(np.int64)]
    return x


def fit_lsh(dim: int, bits: int, rng, *, vectors=None) -> Binarizer:
    """Random-rotation sign hashing; centred by vectors' mean when given (else the origin)."""
    bits = check_bits(bits)
    if not isinstance(dim, (int, np.integer)) or dim <= 0:
        raise ValueError(f"dim={dim!r} must be a positive int")
    mean = jnp.zeros((dim,), jnp.float32)
    if vectors is not None:
        x = _fit_sample(vectors, DEFAULT_MAX_FIT_POINTS)
        if x.shape[1] != dim:
            raise ValueError(f"vectors.shape[1]={x.shape[1]} must equal dim={dim}")
        mean = jnp.asarray(x.mean(axis=0))
    return Binarizer(mean, _orthonormal_columns(rng, int(dim), bits))


def pca_projection(x_centred: jax.Array, bits: int, rng) -> jax.Array:
    """float32 [D, bits]: top principal directions (descending variance); for bits > D all D
    directions followed by a random orthonormal expansion to `bits` columns."""
    dim = x_centred.shape[1]
    cov = x_centred.T @ x_centred / x_centred.shape[0]
    _, vecs = jnp.linalg.eigh(cov)  # ascending eigenvalues
    vecs = vecs[:, ::-1]
    if bits <= dim:
        return vecs[:, :bits]
    return vecs @ _orthonormal_columns(rng, bits, bits)[:dim, :]


@functools.partial(jax.jit, static_argnames=("iterations",))
def itq_rotation(v: jax.Array, rotation: jax.Array, iterations: int) -> jax.Array:
    """ITQ (Gong & Lazebnik 2011, Sec. 2.3): v f32 [N, b], rotation [b, b] -> rotation [b, b]."""

    def step(_, r):
        b = jnp.where(v @ r >= 0, 1.0, -1.0)
        s, _, sh_t = jnp.linalg.svd(v.T @ b)
        return s @ sh_t

    return jax.lax.fori_loop(0, iterations, step, rotation)


def fit_pca(vectors, bits: int, rng, *, max_fit_points: int = DEFAULT_MAX_FIT_POINTS):
    """PCA-sign hashing (the ITQ paper's baseline): ITQ with no rotation."""
    return fit_itq(
        vectors, bits, iterations=0, rng=rng, max_fit_points=max_fit_points, random_start=False
    )


def fit_itq(
    vectors,
    bits: int,
    iterations: int = 50,
    rng=None,
    *,
    max_fit_points: int = DEFAULT_MAX_FIT_POINTS,
    random_start: bool = True,
) -> Binarizer:
    """PCA + ITQ rotation fitted on vectors float [N, D] -> Binarizer with projection [D, bits]."""
    bits = check_bits(bits)
    if not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"iterations={iterations!r} must be a non-negative int")
    rng = jax.random.key(0) if rng is None else rng
    x = jnp.asarray(_fit_sample(vectors, max_fit_points))
    # Full float32 (as project): a GPU's default TF32 would fit the PCA and the rotation to
    # 10-bit products, a TPU's bfloat16 to 8. The fit is one program over at most
    # max_fit_points rows; its precision costs little. On CPU nothing changes.
    with jax.default_matmul_precision("float32"):
        mean, projection = _fit_itq(x, rng, bits, int(iterations), bool(random_start))
    return Binarizer(mean, projection)


@functools.partial(jax.jit, static_argnames=("bits", "iterations", "random_start"))
def _fit_itq(x, rng, bits: int, iterations: int, random_start: bool):
    """fit_itq's computation as one program: op by op, each of its dozens of ops kept a
    compiled program of its own, 60 MB of the process after the fit (VmRSS after malloc_trim,
    measured on 2 cores)."""
    mean = x.mean(axis=0)
    xc = x - mean
    # Data past 2^32 in magnitude are scaled down by a power of two (exact; the directions
    # do not change): x^T x overflowed float32 from |x| ~ 1e15 at 1k points, and the fit was
    # NaN. Other data are multiplied by 1, bit for bit as before.
    amax = jnp.max(jnp.abs(xc))
    xc = xc * jnp.exp2(-jnp.where(amax > 2.0**32, jnp.floor(jnp.log2(amax)), 0.0))
    k_pca, k_rot = jax.random.split(rng)
    w = pca_projection(xc, bits, k_pca)
    r0 = _orthonormal_columns(k_rot, bits, bits) if random_start else jnp.eye(bits)
    r = itq_rotation(xc @ w, r0, iterations) if iterations else r0
    return mean, w @ r


def release_fit_programs():
    """Frees fit_itq's compiled program (used again only by a fit of the same sample shape)."""
    _fit_itq.clear_cache()


def project(binarizer: Binarizer, vectors) -> jax.Array:
    """float32 [N, bits]: (x - mean) @ projection; the code is its sign.

    In full float32 (HIGHEST): by default a GPU may multiply float32 in TF32 (a TPU in
    bfloat16), and then a projection near 0 could take either sign depending on the program
    it was computed in, so one vector's code from encode (the build), from the search's program
    and from a small add's could differ. On CPU this changes nothing."""
    centred = jnp.asarray(vectors, jnp.float32) - binarizer.mean
    return jnp.matmul(centred, binarizer.projection, precision=lax.Precision.HIGHEST)


def quantization_loss(binarizer: Binarizer, vectors) -> float:
    """Mean over rows of ||sign(v) - v||^2 with v = project(x): the ITQ objective per point."""
    v = project(binarizer, vectors)
    b = jnp.where(v >= 0, 1.0, -1.0)
    return float(jnp.mean(jnp.sum((b - v) ** 2, axis=1)))


def codes_of(binarizer: Binarizer, x: jax.Array) -> jax.Array:
    """float [N, D] -> uint32 [N, bits // 32] (traceable: encode inside another program)."""
    return pack_bits(project(binarizer, x) > 0)


_encode_batch = jax.jit(codes_of)


def encode(binarizer: Binarizer, vectors, batch_size: int = 65536) -> np.ndarray:
    """float [N, D] -> uint32 [N, bits // 32] (numpy), computed in batches of batch_size rows
    (the last batch is padded, so one compiled function serves every N)."""
    x = np.asarray(vectors, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != binarizer.dim:
        raise ValueError(f"vectors.shape={x.shape} must be [N, {binarizer.dim}]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive int")
    n = x.shape[0]
    out = np.empty((n, binarizer.bits // 32), np.uint32)
    bs = min(batch_size, max(n, 1))
    for start in range(0, n, bs):
        chunk = x[start : start + bs]
        m = chunk.shape[0]
        if m < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - m, x.shape[1]), np.float32)])
        out[start : start + m] = np.asarray(_encode_batch(binarizer, jnp.asarray(chunk)))[:m]
    return out
