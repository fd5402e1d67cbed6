"""Vector files: hand-written bytes, round trips, memory-mapped slices and the format errors."""

import os
import struct

import numpy as np
import pytest

from alijax.data.files import FormatError, atomic_write
from alijax.data.vecs import (
    read_bvecs,
    read_fbin,
    read_fvecs,
    read_ibin,
    read_ivecs,
    read_u8bin,
    read_vecs,
    write_bvecs,
    write_fbin,
    write_fvecs,
    write_ibin,
    write_ivecs,
    write_u8bin,
    write_vecs,
)

FORMATS = {
    # extension: (reader, writer, dtype)
    ".fvecs": (read_fvecs, write_fvecs, np.float32),
    ".ivecs": (read_ivecs, write_ivecs, np.int32),
    ".bvecs": (read_bvecs, write_bvecs, np.uint8),
    ".fbin": (read_fbin, write_fbin, np.float32),
    ".ibin": (read_ibin, write_ibin, np.int32),
    ".u8bin": (read_u8bin, write_u8bin, np.uint8),
}


def _matrix(dtype, n=7, d=5, seed=0):
    rng = np.random.default_rng(seed)
    if dtype == np.float32:
        return rng.standard_normal((n, d)).astype(np.float32)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=(n, d), endpoint=True, dtype=dtype)


# --- bytes written by hand, independently of the library's writers ------------------------------


def test_fvecs_hand_written(tmp_path):
    path = tmp_path / "x.fvecs"
    path.write_bytes(
        struct.pack("<i3f", 3, 1.0, 2.5, -3.0) + struct.pack("<i3f", 3, 4.0, 0.0, 1e-3)
    )
    for mmap in (True, False):
        x = read_fvecs(path, mmap=mmap)
        assert x.dtype == np.float32 and x.shape == (2, 3)
        np.testing.assert_array_equal(x, np.float32([[1.0, 2.5, -3.0], [4.0, 0.0, 1e-3]]))


def test_ivecs_hand_written(tmp_path):
    path = tmp_path / "gt.ivecs"
    path.write_bytes(struct.pack("<i2i", 2, 7, -1) + struct.pack("<i2i", 2, 2**31 - 1, 0))
    np.testing.assert_array_equal(read_ivecs(path), [[7, -1], [2**31 - 1, 0]])
    assert read_ivecs(path).dtype == np.int32


def test_bvecs_hand_written(tmp_path):
    path = tmp_path / "x.bvecs"
    path.write_bytes(struct.pack("<i4B", 4, 0, 1, 128, 255) + struct.pack("<i4B", 4, 9, 8, 7, 6))
    x = read_bvecs(path)
    assert x.dtype == np.uint8
    np.testing.assert_array_equal(x, [[0, 1, 128, 255], [9, 8, 7, 6]])


@pytest.mark.parametrize(
    "ext, fmt, dtype",
    [(".fbin", "<f4", np.float32), (".ibin", "<i4", np.int32), (".u8bin", "u1", np.uint8)],
)
def test_bin_hand_written(tmp_path, ext, fmt, dtype):
    values = np.arange(12).reshape(3, 4)
    path = tmp_path / f"x{ext}"
    path.write_bytes(struct.pack("<ii", 3, 4) + values.astype(fmt).tobytes())
    x = read_vecs(path)
    assert x.dtype == dtype and x.shape == (3, 4)
    np.testing.assert_array_equal(x, values)


def test_writers_produce_the_documented_bytes(tmp_path):
    x = np.float32([[1.0, 2.0], [3.0, 4.0]])
    write_fvecs(tmp_path / "x.fvecs", x)
    assert (tmp_path / "x.fvecs").read_bytes() == struct.pack("<i2fi2f", 2, 1, 2, 2, 3, 4)
    write_fbin(tmp_path / "x.fbin", x)
    assert (tmp_path / "x.fbin").read_bytes() == struct.pack("<ii4f", 2, 2, 1, 2, 3, 4)
    write_bvecs(tmp_path / "x.bvecs", np.uint8([[5, 6, 7]]))
    assert (tmp_path / "x.bvecs").read_bytes() == struct.pack("<i3B", 3, 5, 6, 7)


# --- round trips and slices ---------------------------------------------------------------------


@pytest.mark.parametrize("ext", sorted(FORMATS))
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path, ext, mmap):
    reader, writer, dtype = FORMATS[ext]
    x = _matrix(dtype)
    path = tmp_path / f"data{ext}"
    writer(path, x)
    y = reader(path, mmap=mmap)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(read_vecs(path, mmap=mmap), x)
    assert os.listdir(tmp_path) == [path.name]  # no temporary left behind


def test_write_vecs_dispatches_on_extension(tmp_path):
    x = _matrix(np.int32)
    write_vecs(tmp_path / "a.ivecs", x)
    write_vecs(tmp_path / "a.ibin", x)
    np.testing.assert_array_equal(read_ivecs(tmp_path / "a.ivecs"), x)
    np.testing.assert_array_equal(read_ibin(tmp_path / "a.ibin"), x)


def test_non_contiguous_and_big_endian_input_written_correctly(tmp_path):
    x = _matrix(np.float32, n=6, d=8)
    write_fvecs(tmp_path / "a.fvecs", x[::2, ::3])
    np.testing.assert_array_equal(read_fvecs(tmp_path / "a.fvecs"), x[::2, ::3])
    write_fbin(tmp_path / "a.fbin", x.astype(">f4"))
    np.testing.assert_array_equal(read_fbin(tmp_path / "a.fbin"), x)


@pytest.mark.parametrize("ext", [".fvecs", ".ivecs", ".bvecs"])
def test_vecs_mmap_is_a_zero_copy_strided_view(tmp_path, ext):
    reader, writer, dtype = FORMATS[ext]
    x = _matrix(dtype, n=5, d=6)
    writer(tmp_path / f"a{ext}", x)
    y = reader(tmp_path / f"a{ext}", mmap=True)
    row_bytes = 4 + 6 * np.dtype(dtype).itemsize
    assert isinstance(y, np.memmap)
    assert y.strides == (row_bytes, np.dtype(dtype).itemsize)
    assert not y.flags.writeable
    assert read_vecs(tmp_path / f"a{ext}", mmap=False).flags.c_contiguous


@pytest.mark.parametrize("ext", sorted(FORMATS))
@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("offset, count", [(0, 3), (2, 4), (4, None), (9, 1), (10, 0), (0, 0)])
def test_slice_reads(tmp_path, ext, mmap, offset, count):
    reader, writer, dtype = FORMATS[ext]
    x = _matrix(dtype, n=10, d=3)
    writer(tmp_path / f"a{ext}", x)
    y = reader(tmp_path / f"a{ext}", mmap=mmap, offset=offset, count=count)
    stop = 10 if count is None else offset + count
    assert y.shape == (stop - offset, 3) and y.dtype == dtype
    np.testing.assert_array_equal(y, x[offset:stop])


@pytest.mark.parametrize("ext", [".fvecs", ".fbin"])
def test_slice_out_of_range_names_the_argument(tmp_path, ext):
    reader, writer, _ = FORMATS[ext]
    writer(tmp_path / f"a{ext}", _matrix(np.float32, n=4, d=2))
    with pytest.raises(ValueError, match=r"offset=5"):
        reader(tmp_path / f"a{ext}", offset=5)
    with pytest.raises(ValueError, match=r"count=3 .*\[0, 2\]"):
        reader(tmp_path / f"a{ext}", offset=2, count=3)


def test_empty_vecs_file_has_no_rows(tmp_path):
    (tmp_path / "e.fvecs").write_bytes(b"")
    assert read_fvecs(tmp_path / "e.fvecs").shape == (0, 0)
    write_fbin(tmp_path / "e.fbin", np.zeros((0, 4), np.float32))
    assert read_fbin(tmp_path / "e.fbin").shape == (0, 4)


# --- format errors ------------------------------------------------------------------------------


def test_truncated_fvecs(tmp_path):
    path = tmp_path / "sift_base.fvecs"
    write_fvecs(path, _matrix(np.float32, n=3, d=4))  # rows of 4 + 16 = 20 bytes
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(FormatError) as e:
        read_fvecs(path)
    message = str(e.value)
    assert str(path) in message
    assert "row size 20 bytes" in message and "file size 57 bytes" in message
    assert "expected 40 or 60 bytes" in message


def test_truncated_bvecs(tmp_path):
    path = tmp_path / "bigann.bvecs"
    write_bvecs(path, _matrix(np.uint8, n=2, d=128))  # rows of 132 bytes
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(FormatError, match=r"bigann\.bvecs.*200 bytes.*row size 132 bytes"):
        read_bvecs(path)


def test_truncated_fbin(tmp_path):
    path = tmp_path / "base.fbin"
    write_fbin(path, _matrix(np.float32, n=3, d=4))  # 8 + 48 bytes
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(FormatError) as e:
        read_fbin(path)
    message = str(e.value)
    assert str(path) in message
    assert "n=3, d=4" in message and "56 bytes" in message and "found 50 bytes" in message


def test_wrong_bin_header(tmp_path):
    path = tmp_path / "gt.ibin"
    path.write_bytes(struct.pack("<ii", 5, 2) + np.arange(6, dtype="<i4").tobytes())  # 3 rows
    with pytest.raises(FormatError) as e:
        read_ibin(path)
    assert str(path) in str(e.value)
    assert (
        "n=5, d=2" in str(e.value)
        and "48 bytes" in str(e.value)
        and "found 32 bytes" in str(e.value)
    )


def test_bin_shorter_than_header(tmp_path):
    (tmp_path / "x.fbin").write_bytes(b"\x01\x00")
    with pytest.raises(FormatError, match=r"x\.fbin: file size 2 bytes .*8-byte header"):
        read_fbin(tmp_path / "x.fbin")


def test_negative_bin_header(tmp_path):
    (tmp_path / "x.fbin").write_bytes(struct.pack("<ii", -1, 4))
    with pytest.raises(FormatError, match="n=-1"):
        read_fbin(tmp_path / "x.fbin")


def test_non_positive_first_dimension(tmp_path):
    (tmp_path / "x.ivecs").write_bytes(struct.pack("<ii", 0, 0))
    with pytest.raises(FormatError, match=r"x\.ivecs: row 0 has dimension 0"):
        read_ivecs(tmp_path / "x.ivecs")


def _fvecs_with_dims(path, dims):
    """Rows of two floats each whose dimension words are `dims`: the size stays consistent."""
    path.write_bytes(b"".join(struct.pack("<i2f", d, 1.0, 2.0) for d in dims))


def test_wrong_dimension_in_last_row_caught_cheaply(tmp_path):
    _fvecs_with_dims(tmp_path / "x.fvecs", [2, 2, 2, 7])
    with pytest.raises(FormatError, match=r"x\.fvecs: row 3 has dimension 7, expected 2"):
        read_fvecs(tmp_path / "x.fvecs")


def test_wrong_dimension_at_slice_end_caught(tmp_path):
    _fvecs_with_dims(tmp_path / "x.fvecs", [2, 2, 9, 2, 2])
    read_fvecs(tmp_path / "x.fvecs", count=2)  # the slice does not reach row 2
    with pytest.raises(FormatError, match="row 2 has dimension 9"):
        read_fvecs(tmp_path / "x.fvecs", offset=1, count=2)


@pytest.mark.parametrize("mmap", [True, False])
def test_wrong_dimension_in_middle_row(tmp_path, mmap):
    # Rows of dimension 2, 5, 1 where the file's size fits dimension 2: up to 1024 rows are
    # checked (was: only the first and last, so this read as garbage).
    _fvecs_with_dims(tmp_path / "x.fvecs", [2, 2, 5, 2, 2])
    with pytest.raises(FormatError, match="row 2 has dimension 5, expected 2"):
        read_fvecs(tmp_path / "x.fvecs", mmap=mmap)
    # Past 1024 rows a row between the checked ones needs check_all.
    dims = [2] * 3000
    dims[1] = 5
    _fvecs_with_dims(tmp_path / "y.fvecs", dims)
    assert read_fvecs(tmp_path / "y.fvecs", mmap=mmap).shape == (3000, 2)  # the cheap check's limit
    with pytest.raises(FormatError, match="row 1 has dimension 5, expected 2"):
        read_fvecs(tmp_path / "y.fvecs", mmap=mmap, check_all=True)


def test_empty_file_refuses_a_slice_past_it(tmp_path):
    (tmp_path / "e.fvecs").write_bytes(b"")
    assert read_fvecs(tmp_path / "e.fvecs").shape == (0, 0)
    with pytest.raises(ValueError, match="count=3"):
        read_fvecs(tmp_path / "e.fvecs", count=3)
    with pytest.raises(ValueError, match="offset=5"):
        read_fvecs(tmp_path / "e.fvecs", offset=5)


def test_wrong_dimension_in_bvecs_middle_row(tmp_path):
    rows = [struct.pack("<i3B", d, 1, 2, 3) for d in (3, 3, 4, 3)]
    (tmp_path / "x.bvecs").write_bytes(b"".join(rows))
    with pytest.raises(FormatError, match="row 2 has dimension 4, expected 3"):
        read_bvecs(tmp_path / "x.bvecs", check_all=True)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fvecs"):
        read_vecs(tmp_path / "nope.fvecs")


def test_unknown_extension(tmp_path):
    with pytest.raises(ValueError, match=r"'\.npy'.*\.fvecs"):
        read_vecs(tmp_path / "x.npy")


# --- writer argument errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "writer, x",
    [
        (write_fvecs, np.zeros((2, 3), np.float64)),
        (write_ivecs, np.zeros((2, 3), np.float32)),
        (write_ivecs, np.zeros((2, 3), np.int64)),
        (write_bvecs, np.zeros((2, 3), np.int8)),
        (write_fbin, np.zeros((2, 3), np.float16)),
        (write_ibin, np.zeros((2, 3), np.uint32)),
        (write_u8bin, np.zeros((2, 3), np.int32)),
    ],
)
def test_writer_rejects_wrong_dtype(tmp_path, writer, x):
    with pytest.raises(ValueError, match=r"x\.dtype=dtype\("):
        writer(tmp_path / "out.bin", x)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_wrong_shape_and_type(tmp_path):
    with pytest.raises(ValueError, match=r"x\.shape=\(3,\) must be 2-D"):
        write_fvecs(tmp_path / "a.fvecs", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="x must be a numpy array"):
        write_fvecs(tmp_path / "a.fvecs", [[1.0, 2.0]])
    with pytest.raises(ValueError, match="d >= 1"):
        write_fvecs(tmp_path / "a.fvecs", np.zeros((2, 0), np.float32))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "x.fvecs"
    write_fvecs(path, np.ones((2, 2), np.float32))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_write(path) as f:
            f.write(b"half a file")
            raise RuntimeError("crash")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.fvecs"]
