"""The XMC repository text format: hand-written files, round trips and line-numbered errors."""

import dataclasses
import os

import numpy as np
import pytest
import scipy.sparse as sp

from alijax.data.files import FormatError
from alijax.data.xmc import XMCData, load_xmc, write_xmc

HAND_WRITTEN = (
    "5 6 4\n"
    "0,3 0:1.5 5:0.25\n"  # labels and features
    " 2:3\n"  # no labels: starts with a space
    "1:-2 4:1e-3\n"  # no labels: starts directly with a feature
    "2,1\n"  # labels, no features
    "3\t1:0.5   3:2\n"  # tab and repeated spaces as separators
)


def test_hand_written_file(tmp_path):
    (tmp_path / "train.txt").write_text(HAND_WRITTEN)
    data = load_xmc(tmp_path / "train.txt")
    assert isinstance(data, XMCData)
    assert (data.num_points, data.num_features, data.num_labels) == (5, 6, 4)
    assert sp.isspmatrix_csr(data.features) and sp.isspmatrix_csr(data.labels)
    assert data.features.dtype == np.float32 and data.features.shape == (5, 6)
    assert data.labels.shape == (5, 4)
    want_features = np.zeros((5, 6), np.float32)
    want_features[0, [0, 5]] = [1.5, 0.25]
    want_features[1, 2] = 3
    want_features[2, [1, 4]] = [-2, 1e-3]
    want_features[4, [1, 3]] = [0.5, 2]
    want_labels = np.zeros((5, 4))
    want_labels[0, [0, 3]] = want_labels[3, [1, 2]] = want_labels[4, 3] = 1
    np.testing.assert_array_equal(data.features.toarray(), want_features)
    np.testing.assert_array_equal(data.labels.toarray(), want_labels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        data.num_points = 3


def test_crlf_trailing_blank_lines_and_empty_points(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"3 2 2\r\n1 0:1\r\n\r\n 1:2\r\n\r\n\r\n")
    data = load_xmc(tmp_path / "a.txt")
    np.testing.assert_array_equal(data.features.toarray(), [[1, 0], [0, 0], [0, 2]])
    np.testing.assert_array_equal(data.labels.toarray(), [[0, 1], [0, 0], [0, 0]])


def test_repeated_indices(tmp_path):
    (tmp_path / "a.txt").write_text("1 3 3\n2,0,2 2:1 0:4 2:0.5\n")
    data = load_xmc(tmp_path / "a.txt")
    np.testing.assert_array_equal(data.features.toarray(), [[4, 0, 1.5]])
    np.testing.assert_array_equal(data.labels.toarray(), [[1, 0, 1]])
    np.testing.assert_array_equal(data.features.indices, [0, 2])  # sorted


@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip(tmp_path, seed):
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.integers(-6, 6, size=(40, 30))
    features = (rng.standard_normal((40, 30)) * scale * (rng.random((40, 30)) < 0.15)).astype(
        np.float32
    )
    labels = rng.random((40, 9)) < 0.2
    features[3] = 0  # a point with labels only, and ...
    labels[5] = False  # ... one with features only
    features[7], labels[7] = 0, False  # ... and one with neither, as the last lines may be
    features[-1], labels[-1] = 0, False
    features, labels = sp.csr_matrix(features), sp.csr_matrix(labels)
    write_xmc(tmp_path / "a.txt", features, labels)
    data = load_xmc(tmp_path / "a.txt")
    np.testing.assert_array_equal(data.features.toarray(), features.toarray())  # exact in float32
    np.testing.assert_array_equal(data.labels.toarray(), labels.toarray())
    assert os.listdir(tmp_path) == ["a.txt"]


def test_writer_text(tmp_path):
    features = np.array([[0, 0.1, 0], [2, 0, 0], [0, 0, 0]], np.float32)
    labels = np.array([[1, 0], [0, 0], [1, 1]])
    write_xmc(tmp_path / "a.txt", features, labels)
    assert (tmp_path / "a.txt").read_text() == "3 3 2\n0 1:0.1\n 0:2.0\n0,1\n"


def test_writer_row_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"features\.shape=\(2, 3\) and labels\.shape=\(3, 2\)"):
        write_xmc(tmp_path / "a.txt", np.zeros((2, 3)), np.zeros((3, 2)))


# --- errors name the file and the line ----------------------------------------------------------


def _load(tmp_path, text):
    path = tmp_path / NAME
    path.write_text(text)
    return load_xmc(path)


NAME = "eurlex_train.txt"
NAME_RE = r"eurlex_train\.txt"


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "3 4 2\n0 1:1\n1 2:1\n",
            NAME_RE + r": the header \(line 1\) says num_points=3, found 2 data lines",
        ),
        (
            "1 4 2\n0 1:1\n1 2:1\n",
            NAME_RE + r", line 3: more data lines than the header's num_points=1",
        ),
        ("2 4 2\n0 1:1\n1 4:1\n", NAME_RE + r", line 3: feature index 4 is out of range.* < 4"),
        (
            "2 4 2\n0 1:1\n1,2 3:1\n",
            NAME_RE + r", line 3: label index 2 is out of range.*num_labels=2",
        ),
        ("2 4 2\n0 1:1\n1 3:abc\n", NAME_RE + r", line 3: malformed feature value 'abc'"),
        ("2 4 2\n0 1:1\n1 3\n", NAME_RE + r", line 3: malformed feature '3'"),
        ("2 4 2\n0 1:1 2\n1 3:1\n", NAME_RE + r", line 2: malformed feature '2'"),
        ("2 4 2\n0 1:2:3\n1 3:1\n", NAME_RE + r", line 2: malformed feature '1:2:3'"),
        ("2 4 2\n0 -1:2\n1 3:1\n", NAME_RE + r", line 2: malformed feature '-1:2'"),
        ("2 4 2\n0 1:1\na,1 3:1\n", NAME_RE + r", line 3: malformed label list 'a,1'"),
        ("2 4 2\n0 1:1\n1,,0 3:1\n", NAME_RE + r", line 3: malformed label list '1,,0'"),
        ("2 4\n0 1:1\n1 3:1\n", NAME_RE + r", line 1: expected the header"),
        ("", NAME_RE + r", line 1: expected the header"),
    ],
)
def test_errors(tmp_path, text, match):
    with pytest.raises(FormatError, match=match):
        _load(tmp_path, text)


def test_error_line_number_past_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("alijax.data.xmc._CHUNK_LINES", 4)
    lines = [f"{i % 3} {i % 5}:1" for i in range(10)]
    lines[8] = "0 7:1"  # line 10 of the file
    with pytest.raises(FormatError, match=r"line 10: feature index 7 is out of range"):
        _load(tmp_path, "10 5 3\n" + "\n".join(lines) + "\n")
    lines[8] = "2 3:1"
    data = _load(tmp_path, "10 5 3\n" + "\n".join(lines) + "\n")
    np.testing.assert_array_equal(data.features.indices, [i % 5 for i in range(10)])
    np.testing.assert_array_equal(data.labels.indices, [i % 3 for i in range(10)])
