"""ANN benchmark vector files, read memory-mapped.

Two families, both little-endian:

- *vecs (TEXMEX: SIFT1M, GIST1M, BIGANN): every row is an int32 dimension d, then d values;
  .fvecs float32, .ivecs int32, .bvecs uint8. A row is 4 + d * itemsize bytes.
- *bin (big-ann-benchmarks): an 8-byte header (int32 n, int32 d), then n*d values row-major;
  .fbin float32, .ibin int32, .u8bin uint8, .i8bin int8.

With mmap=True a *vecs read is a zero-copy strided view of the file (the dimension column is
skipped by the stride) and a *bin read is the memmap itself, so a billion-row file costs no memory
until rows are touched. `offset` / `count` read a slice of rows without reading the rest.
"""

from __future__ import annotations

import os

import numpy as np

from alijax.data.files import FormatError, atomic_write

VECS_DTYPES = {".fvecs": np.dtype("<f4"), ".ivecs": np.dtype("<i4"), ".bvecs": np.dtype("u1")}
BIN_DTYPES = {
    ".fbin": np.dtype("<f4"),
    ".ibin": np.dtype("<i4"),
    ".u8bin": np.dtype("u1"),
    ".i8bin": np.dtype("i1"),
}
_BIN_HEADER_BYTES = 8
_INT32_MAX = 2**31 - 1
_WRITE_CHUNK_BYTES = 64 << 20  # bounds the writers' temporary copies


# --- reading -------------------------------------------------------------------------------------


def read_vecs(
    path: str | os.PathLike,
    mmap: bool = True,
    *,
    count: int | None = None,
    offset: int = 0,
    check_all: bool = False,
) -> np.ndarray:
    """Rows [offset, offset + count) of a vector file as [count, d], the format chosen by extension.

    `check_all` (*vecs only) checks the dimension word of every row, not only of the file's first
    and last rows and of up to 1024 rows spread over the slice (a page each, when memory-mapped).
    """
    ext = _extension(path)
    if ext in VECS_DTYPES:
        return _read_vecs(path, VECS_DTYPES[ext], mmap, count, offset, check_all)
    return _read_bin(path, BIN_DTYPES[ext], mmap, count, offset)


def read_fvecs(path, mmap=True, *, count=None, offset=0, check_all=False) -> np.ndarray:
    """An .fvecs file as float32 [n, d] (or rows [offset, offset + count))."""
    return _read_vecs(path, VECS_DTYPES[".fvecs"], mmap, count, offset, check_all)


def read_ivecs(path, mmap=True, *, count=None, offset=0, check_all=False) -> np.ndarray:
    """An .ivecs file as int32 [n, d] (or rows [offset, offset + count))."""
    return _read_vecs(path, VECS_DTYPES[".ivecs"], mmap, count, offset, check_all)


def read_bvecs(path, mmap=True, *, count=None, offset=0, check_all=False) -> np.ndarray:
    """A .bvecs file as uint8 [n, d] (or rows [offset, offset + count))."""
    return _read_vecs(path, VECS_DTYPES[".bvecs"], mmap, count, offset, check_all)


def read_fbin(path, mmap=True, *, count=None, offset=0) -> np.ndarray:
    """An .fbin file as float32 [n, d] (or rows [offset, offset + count))."""
    return _read_bin(path, BIN_DTYPES[".fbin"], mmap, count, offset)


def read_ibin(path, mmap=True, *, count=None, offset=0) -> np.ndarray:
    """An .ibin file as int32 [n, d] (or rows [offset, offset + count))."""
    return _read_bin(path, BIN_DTYPES[".ibin"], mmap, count, offset)


def read_u8bin(path, mmap=True, *, count=None, offset=0) -> np.ndarray:
    """A .u8bin file as uint8 [n, d] (or rows [offset, offset + count))."""
    return _read_bin(path, BIN_DTYPES[".u8bin"], mmap, count, offset)


_SAMPLED_ROWS = 1024


def _spread(n: int, most: int) -> np.ndarray:
    """Up to `most` row indices spread evenly over 0..n - 1, both ends included."""
    return np.unique(np.linspace(0, n - 1, min(n, most)).astype(np.int64))


def _read_vecs(path, dtype: np.dtype, mmap: bool, count, offset, check_all: bool) -> np.ndarray:
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size == 0:  # no rows, and no dimension word to read one from
        _row_slice(0, count, offset)  # (a count or offset past 0 rows is refused, as below)
        return np.empty((0, 0), dtype)
    d = _int32_at(path, 0, size)
    if d <= 0:
        raise FormatError(f"{path}: row 0 has dimension {d}, expected a positive int32")
    row = 4 + d * dtype.itemsize
    if size % row:
        n = size // row
        raise FormatError(
            f"{path}: file size {size} bytes is not a multiple of the row size {row} bytes "
            f"(int32 dimension + {d} x {dtype.itemsize}-byte values, d={d} read from row 0); "
            f"expected {n * row} or {(n + 1) * row} bytes: truncated file or wrong format?"
        )
    n = size // row
    start, count = _row_slice(n, count, offset)
    # The size test cannot see rows whose dimension word is wrong but whose length is right
    # (a concatenation of files of other dimensions usually breaks it); the ends are cheap to read.
    ends = {0, n - 1} | ({start, start + count - 1} if count else set())
    for r in sorted(ends):
        if (dr := _int32_at(path, r * row, size)) != d:
            raise _dim_error(path, r, dr, d)
    if count == 0:
        return np.empty((0, d), dtype)
    # 4-byte values: a row is d + 1 int32 words; 1-byte values: a row is 4 + d bytes.
    word = np.dtype("<i4") if dtype.itemsize == 4 else np.dtype("u1")
    shape = (count, row // word.itemsize)
    if mmap:
        words = np.memmap(path, dtype=word, mode="r", offset=start * row, shape=shape)
    else:
        words = np.fromfile(path, dtype=word, count=shape[0] * shape[1], offset=start * row)
        words = words.reshape(shape)
    # Without check_all, the dimension words of up to _SAMPLED_ROWS rows spread over the slice
    # (a page each): a file whose rows differ in dimension but whose size fits one dimension
    # is then refused unless it differs only between them.
    checked = np.arange(count) if check_all else _spread(count, _SAMPLED_ROWS)
    sampled = words[checked]
    dims = sampled[:, 0] if word.itemsize == 4 else sampled[:, :4].copy().view("<i4")[:, 0]
    if (bad := np.flatnonzero(dims != d)).size:
        raise _dim_error(path, start + checked[bad[0]], dims[bad[0]], d)
    values = words[:, 4 // word.itemsize :].view(dtype)
    return values if mmap else np.ascontiguousarray(values)


def _read_bin(path, dtype: np.dtype, mmap: bool, count, offset) -> np.ndarray:
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < _BIN_HEADER_BYTES:
        raise FormatError(
            f"{path}: file size {size} bytes is smaller than the {_BIN_HEADER_BYTES}-byte header "
            "(int32 n, int32 d)"
        )
    n, d = (int(v) for v in np.fromfile(path, dtype="<i4", count=2))
    if n < 0 or d < 0:
        raise FormatError(f"{path}: header has n={n}, d={d}; expected non-negative int32 values")
    expected = _BIN_HEADER_BYTES + n * d * dtype.itemsize
    if size != expected:
        raise FormatError(
            f"{path}: header says n={n}, d={d}, so the file should be {_BIN_HEADER_BYTES} + "
            f"n*d*{dtype.itemsize} = {expected} bytes, found {size} bytes: truncated file or wrong header?"
        )
    start, count = _row_slice(n, count, offset)
    if count == 0 or d == 0:
        return np.empty((count, d), dtype)
    at = _BIN_HEADER_BYTES + start * d * dtype.itemsize
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=at, shape=(count, d))
    return np.fromfile(path, dtype=dtype, count=count * d, offset=at).reshape(count, d)


def _row_slice(n: int, count: int | None, offset: int) -> tuple[int, int]:
    if not 0 <= offset <= n:
        raise ValueError(f"{offset=} must lie in [0, {n}], the file has {n} rows")
    if count is None:
        count = n - offset
    if count < 0 or offset + count > n:
        raise ValueError(
            f"{count=} must lie in [0, {n - offset}]: the file has {n} rows and {offset=}"
        )
    return offset, count


def _int32_at(path: str, at: int, size: int) -> int:
    if at + 4 > size:
        raise FormatError(f"{path}: expected an int32 at byte {at}, but the file has {size} bytes")
    return int(np.fromfile(path, dtype="<i4", count=1, offset=at)[0])


def _dim_error(path: str, row: int, found: int, d: int) -> FormatError:
    return FormatError(
        f"{path}: row {row} has dimension {found}, expected {d} like row 0: "
        "rows of different dimensions, or a corrupt file"
    )


def _extension(path) -> str:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in VECS_DTYPES and ext not in BIN_DTYPES:
        known = sorted(VECS_DTYPES) + sorted(BIN_DTYPES)
        raise ValueError(f"{path=} has extension {ext!r}; expected one of {known}")
    return ext


# --- writing -------------------------------------------------------------------------------------


def write_vecs(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes x [n, d] in the format chosen by the extension of `path` (x's dtype must match it)."""
    ext = _extension(path)
    if ext in VECS_DTYPES:
        _write_vecs(path, x, VECS_DTYPES[ext])
    else:
        _write_bin(path, x, BIN_DTYPES[ext])


def write_fvecs(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes float32 x [n, d] as .fvecs, atomically."""
    _write_vecs(path, x, VECS_DTYPES[".fvecs"])


def write_ivecs(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes int32 x [n, d] as .ivecs, atomically."""
    _write_vecs(path, x, VECS_DTYPES[".ivecs"])


def write_bvecs(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes uint8 x [n, d] as .bvecs, atomically."""
    _write_vecs(path, x, VECS_DTYPES[".bvecs"])


def write_fbin(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes float32 x [n, d] as .fbin, atomically."""
    _write_bin(path, x, BIN_DTYPES[".fbin"])


def write_ibin(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes int32 x [n, d] as .ibin, atomically."""
    _write_bin(path, x, BIN_DTYPES[".ibin"])


def write_u8bin(path: str | os.PathLike, x: np.ndarray) -> None:
    """Writes uint8 x [n, d] as .u8bin, atomically."""
    _write_bin(path, x, BIN_DTYPES[".u8bin"])


def _check_matrix(x, dtype: np.dtype, path) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(
            f"x must be a numpy array of {dtype.name} for {path}, got {type(x).__name__}"
        )
    # Any byte order is accepted (it is fixed on write); the kind and width must match exactly.
    if x.dtype.kind != dtype.kind or x.dtype.itemsize != dtype.itemsize:
        raise ValueError(f"{x.dtype=} must be {dtype.name} for {os.fspath(path)}; cast x first")
    if x.ndim != 2:
        raise ValueError(f"{x.shape=} must be 2-D [n, d]")
    if max(x.shape) > _INT32_MAX:
        raise ValueError(f"{x.shape=}: n and d must fit in an int32 header")
    return x


def _write_vecs(path, x: np.ndarray, dtype: np.dtype) -> None:
    x = _check_matrix(x, dtype, path)
    n, d = x.shape
    if n and d == 0:
        raise ValueError(f"{x.shape=}: *vecs rows need d >= 1")
    word = np.dtype("<i4") if dtype.itemsize == 4 else np.dtype("u1")
    per = 4 // word.itemsize  # words taken by the dimension
    rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // (4 + d * dtype.itemsize))
    with atomic_write(path) as f:
        for i in range(0, n, rows_per_chunk):
            block = x[i : i + rows_per_chunk].astype(dtype, copy=False)
            words = np.empty((block.shape[0], per + d * dtype.itemsize // word.itemsize), word)
            words[:, :per] = np.array([d], "<i4").view(word)
            words[:, per:] = block.view(word) if word.itemsize == 4 else block
            f.write(words.tobytes())


def _write_bin(path, x: np.ndarray, dtype: np.dtype) -> None:
    x = _check_matrix(x, dtype, path)
    rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // max(1, x.shape[1] * dtype.itemsize))
    with atomic_write(path) as f:
        f.write(np.array(x.shape, dtype="<i4").tobytes())
        for i in range(0, x.shape[0], rows_per_chunk):
            f.write(np.ascontiguousarray(x[i : i + rows_per_chunk], dtype=dtype).tobytes())
