"""CIFAR binary files: bytes laid out by hand, round trips through the writers, and the errors."""

import numpy as np
import pytest

from alijax.data.cifar import load_cifar10, load_cifar100, write_cifar10, write_cifar100
from alijax.data.files import FormatError

TRAIN10 = [f"data_batch_{i}.bin" for i in range(1, 6)]


def _planes(n, seed):
    """Pixel planes uint8 [n, 3, 32, 32] (channel, row, column), all different."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def _records(label_columns, planes):
    """Records as the CIFAR page describes them: label byte(s), then R, G, B planes, row-major."""
    out = b""
    for i in range(planes.shape[0]):
        out += bytes(int(col[i]) for col in label_columns)
        out += planes[i, 0].tobytes() + planes[i, 1].tobytes() + planes[i, 2].tobytes()
    return out


def _write_cifar10_by_hand(folder, per_file=2):
    """Writes the six CIFAR-10 files; returns {split: (planes [N, 3, 32, 32], labels [N])}."""
    folder.mkdir(parents=True)
    expected = {"train": ([], []), "test": ([], [])}
    for k, name in enumerate(TRAIN10 + ["test_batch.bin"]):
        planes = _planes(per_file, seed=k)
        labels = (np.arange(per_file) + 3 * k) % 10
        (folder / name).write_bytes(_records([labels], planes))
        split = "test" if name == "test_batch.bin" else "train"
        expected[split][0].append(planes)
        expected[split][1].append(labels)
    return {s: (np.concatenate(p), np.concatenate(lab)) for s, (p, lab) in expected.items()}


def test_cifar10_hand_written_bytes(tmp_path):
    expected = _write_cifar10_by_hand(tmp_path / "cifar-10-batches-bin")
    for split, n in (("train", 10), ("test", 2)):
        images, labels = load_cifar10(tmp_path, split)
        planes, want_labels = expected[split]
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, want_labels)  # batches 1..5 in order
        # NHWC: pixel (row h, column w) of channel c is byte 1 + c*1024 + h*32 + w of a record.
        assert images[0, 0, 1, 0] == planes[0, 0, 0, 1]
        assert images[1, 5, 7, 2] == planes[1, 2, 5, 7]
        np.testing.assert_array_equal(images, planes.transpose(0, 2, 3, 1))


def test_cifar10_root_may_be_the_batches_folder(tmp_path):
    expected = _write_cifar10_by_hand(tmp_path / "cifar-10-batches-bin")
    images, labels = load_cifar10(tmp_path / "cifar-10-batches-bin", "test")
    np.testing.assert_array_equal(labels, expected["test"][1])
    np.testing.assert_array_equal(images, expected["test"][0].transpose(0, 2, 3, 1))


def test_cifar100_coarse_and_fine(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    coarse, fine = np.array([19, 0, 7]), np.array([3, 99, 42])
    planes = _planes(3, seed=1)
    (folder / "train.bin").write_bytes(_records([coarse, fine], planes))
    (folder / "test.bin").write_bytes(_records([coarse[:1], fine[:1]], planes[:1]))
    images, fine_labels = load_cifar100(tmp_path, "train")
    _, coarse_labels = load_cifar100(tmp_path, "train", label="coarse")
    np.testing.assert_array_equal(fine_labels, fine)
    np.testing.assert_array_equal(coarse_labels, coarse)
    assert fine_labels.dtype == coarse_labels.dtype == np.int32
    np.testing.assert_array_equal(images, planes.transpose(0, 2, 3, 1))
    _, test_labels = load_cifar100(folder, "test", label="coarse")
    np.testing.assert_array_equal(test_labels, [19])


def test_cifar10_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    written = []
    for name in TRAIN10 + ["test_batch.bin"]:
        images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, size=3)
        write_cifar10(folder / name, images, labels)
        written.append((images, labels))
    images, labels = load_cifar10(tmp_path, "train")
    np.testing.assert_array_equal(images, np.concatenate([w[0] for w in written[:5]]))
    np.testing.assert_array_equal(labels, np.concatenate([w[1] for w in written[:5]]))
    assert (folder / "test_batch.bin").stat().st_size == 3 * 3073


def test_cifar100_round_trip_and_byte_order(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    coarse, fine = np.array([1, 2, 3, 4]), np.array([50, 60, 70, 80])
    for name in ("train.bin", "test.bin"):
        write_cifar100(tmp_path / name, images, coarse_labels=coarse, fine_labels=fine)
    raw = (tmp_path / "train.bin").read_bytes()
    assert len(raw) == 4 * 3074 and raw[0] == 1 and raw[1] == 50  # coarse byte first
    # Then the R plane row-major (pixel (0,0), (0,1), ...), then the G plane.
    assert raw[2] == images[0, 0, 0, 0] and raw[3] == images[0, 0, 1, 0]
    assert raw[2 + 1024] == images[0, 0, 0, 1]
    loaded, loaded_fine = load_cifar100(tmp_path, "test")
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(loaded_fine, fine)
    np.testing.assert_array_equal(load_cifar100(tmp_path, "train", label="coarse")[1], coarse)


def test_missing_file_names_path_and_expected_files(tmp_path):
    _write_cifar10_by_hand(tmp_path / "cifar-10-batches-bin")
    (tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_cifar10(tmp_path)
    message = str(e.value)
    assert str(tmp_path / "cifar-10-batches-bin" / "data_batch_3.bin") in message
    assert "test_batch.bin" in message and "binary version" in message
    load_cifar10(tmp_path, "test")  # the test split does not need the missing batch


def test_missing_cifar100_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.bin not found: CIFAR-100"):
        load_cifar100(tmp_path)


def test_truncated_file(tmp_path):
    _write_cifar10_by_hand(tmp_path / "cifar-10-batches-bin")
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.write_bytes(path.read_bytes()[:-10])  # 2 records of 3073 bytes, less 10
    with pytest.raises(FormatError) as e:
        load_cifar10(tmp_path, "test")
    message = str(e.value)
    assert str(path) in message and "record size 3073 bytes" in message and "6136 bytes" in message


def test_label_out_of_range(tmp_path):
    # A label byte of 15 in a CIFAR-10 file: a CIFAR-100 coarse label, or a corrupt file.
    (tmp_path / "test_batch.bin").write_bytes(_records([np.array([3, 15])], _planes(2, seed=0)))
    with pytest.raises(
        FormatError, match=r"test_batch\.bin: record 1 has label 15 .* expected < 10"
    ):
        load_cifar10(tmp_path, "test")


def test_empty_file(tmp_path):
    (tmp_path / "test.bin").write_bytes(b"")
    with pytest.raises(FormatError, match=r"test\.bin: file size 0 bytes .* 3074 bytes"):
        load_cifar100(tmp_path, "test")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split='val'"):
        load_cifar10(tmp_path, "val")
    with pytest.raises(ValueError, match="label='medium'"):
        load_cifar100(tmp_path, "train", label="medium")


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (
            np.zeros((2, 32, 32, 3), np.float32),
            np.zeros(2, int),
            r"images\.dtype=dtype\('float32'\)",
        ),
        (np.zeros((2, 3, 32, 32), np.uint8), np.zeros(2, int), r"images\.shape=\(2, 3, 32, 32\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, int), r"labels\.shape=\(3,\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 10]), r"labels must lie in \[0, 10\)"),
        (np.zeros((2, 32, 32, 3), np.uint8), np.zeros(2, np.float32), r"labels\.dtype=float32"),
    ],
)
def test_writer_rejects_bad_input(tmp_path, images, labels, match):
    with pytest.raises(ValueError, match=match):
        write_cifar10(tmp_path / "x.bin", images, labels)
    assert not (tmp_path / "x.bin").exists()


def test_cifar100_writer_checks_each_label_range(tmp_path):
    images = np.zeros((1, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match=r"coarse_labels must lie in \[0, 20\)"):
        write_cifar100(tmp_path / "x.bin", images, [20], [0])
    with pytest.raises(ValueError, match=r"fine_labels must lie in \[0, 100\)"):
        write_cifar100(tmp_path / "x.bin", images, [0], [100])
