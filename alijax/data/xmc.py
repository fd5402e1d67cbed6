"""The Extreme Classification Repository's sparse text format (Bibtex, Eurlex-4K, Amazon-670K, ...).

    num_points num_features num_labels
    l1,l2,... f1:v1 f2:v2 ...

One line per point after the header; indices are 0-based. The label list may be empty, in which case
the line starts with a space or directly with a feature; an empty line is a point with neither.
Blank lines after the last point are ignored. Lines are parsed in chunks and the numbers converted
by numpy in bulk, so that a file of millions of points loads in seconds, not minutes.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import scipy.sparse as sp

from alijax.data.files import FormatError, atomic_write

_LABELS = re.compile(r"\d+(?:,\d+)*")
_FEATURES = re.compile(r"(?:\d+:[^\s:]+(?:\s+|$))*")
_CHUNK_LINES = 1 << 16


@dataclasses.dataclass(frozen=True)
class XMCData:
    """features float32 CSR [num_points, num_features]; labels float32 CSR 0/1 indicator
    [num_points, num_labels]; the header's three numbers."""

    features: sp.csr_matrix
    labels: sp.csr_matrix
    num_points: int
    num_features: int
    num_labels: int


def load_xmc(path: str | os.PathLike) -> XMCData:
    """Reads an XMC repository text file. Repeated feature indices on a line are summed, repeated
    labels count once; column indices come out sorted."""
    path = os.fspath(path)
    with open(path, encoding="utf-8") as f:
        num_points, num_features, num_labels = _parse_header(path, f.readline())
        chunk, chunks, row = _Chunk(), [], 0
        for lineno, line in enumerate(f, start=2):
            line = line.rstrip("\r\n")
            if row == num_points:
                if line.strip():
                    raise FormatError(
                        f"{path}, line {lineno}: more data lines than the header's "
                        f"num_points={num_points} (line 1)"
                    )
                continue
            chunk.add(path, lineno, line)
            row += 1
            if len(chunk.linenos) == _CHUNK_LINES:
                chunks.append(chunk.convert(path, num_features, num_labels))
                chunk = _Chunk()
        chunks.append(chunk.convert(path, num_features, num_labels))
    if row < num_points:
        raise FormatError(
            f"{path}: the header (line 1) says num_points={num_points}, found {row} data lines"
        )
    features = _csr(chunks, 0, (num_points, num_features))
    labels = _csr(chunks, 1, (num_points, num_labels))
    labels.data[:] = 1.0
    return XMCData(features, labels, num_points, num_features, num_labels)


def write_xmc(path: str | os.PathLike, features, labels) -> None:
    """Writes features [n, num_features] and a label indicator [n, num_labels] (dense or scipy
    sparse; a label is present where the entry is non-zero) as an XMC text file, atomically."""
    features = sp.csr_matrix(features, dtype=np.float32)
    labels = sp.csr_matrix(labels)
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape=} and {labels.shape=} must have the same number of rows")
    features.sort_indices()
    labels.eliminate_zeros()
    labels.sort_indices()
    n, num_features = features.shape
    with atomic_write(path, text=True) as f:
        f.write(f"{n} {num_features} {labels.shape[1]}\n")
        for i in range(n):
            fs, fe = features.indptr[i], features.indptr[i + 1]
            ls, le = labels.indptr[i], labels.indptr[i + 1]
            # astype(str) on float32 gives the shortest text that reads back to the same float32.
            values = features.data[fs:fe].astype(str)
            feats = " ".join(f"{j}:{v}" for j, v in zip(features.indices[fs:fe], values))
            label_list = ",".join(map(str, labels.indices[ls:le]))
            if label_list:
                f.write(f"{label_list} {feats}\n" if feats else f"{label_list}\n")
            else:
                # The repository's own files start a label-less line with a space.
                f.write(f" {feats}\n" if feats else "\n")


def _parse_header(path: str, line: str) -> tuple[int, int, int]:
    parts = line.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise FormatError(
            f"{path}, line 1: expected the header 'num_points num_features num_labels' "
            f"(three non-negative ints), found {line.rstrip(chr(10))!r}"
        )
    return int(parts[0]), int(parts[1]), int(parts[2])


class _Chunk:
    """The raw text of up to _CHUNK_LINES points, validated per line, converted to numbers at once."""

    def __init__(self):
        self.linenos, self.features, self.num_features, self.labels, self.num_labels = (
            [],
            [],
            [],
            [],
            [],
        )

    def add(self, path: str, lineno: int, line: str) -> None:
        label_part, feature_part = "", line
        if line and not line[0].isspace():
            head, *rest = line.split(None, 1)
            if ":" not in head:
                label_part, feature_part = head, "".join(rest)
        if label_part and not _LABELS.fullmatch(label_part):
            raise FormatError(
                f"{path}, line {lineno}: malformed label list {label_part!r}; "
                "expected comma-separated non-negative ints like 3,17,42"
            )
        feature_part = feature_part.strip()
        if not _FEATURES.fullmatch(feature_part):
            bad = next(
                (t for t in feature_part.split() if not _FEATURES.fullmatch(t)), feature_part
            )
            raise FormatError(
                f"{path}, line {lineno}: malformed feature {bad!r}; expected index:value like 12:0.5"
            )
        self.linenos.append(lineno)
        self.features.append(feature_part)
        self.num_features.append(feature_part.count(":"))
        self.labels.append(label_part)
        self.num_labels.append(label_part.count(",") + 1 if label_part else 0)

    def convert(self, path: str, num_features: int, num_labels: int):
        """-> ((feature counts, indices, values), (label counts, indices, values)) for the chunk."""
        tokens = " ".join(self.features).replace(":", " ").split()
        try:
            values = np.array(tokens[1::2], dtype=np.float64).astype(np.float32)
        except ValueError:
            row, bad = self._first_bad_value()
            raise FormatError(
                f"{path}, line {self.linenos[row]}: malformed feature value {bad!r}; expected a float"
            ) from None
        feature_idx = np.array(tokens[0::2], dtype=np.int64)
        label_text = ",".join(filter(None, self.labels))
        label_idx = np.array(label_text.split(",") if label_text else [], dtype=np.int64)
        feature_counts = np.array(self.num_features, dtype=np.int64)
        label_counts = np.array(self.num_labels, dtype=np.int64)
        self._check_range(path, "feature", feature_idx, feature_counts, num_features)
        self._check_range(path, "label", label_idx, label_counts, num_labels)
        return (
            (feature_counts, feature_idx, values),
            (label_counts, label_idx, np.ones(label_idx.shape, np.float32)),
        )

    def _check_range(self, path, what: str, idx: np.ndarray, counts: np.ndarray, size: int) -> None:
        bad = np.flatnonzero(idx >= size)
        if bad.size:
            row = int(np.searchsorted(np.cumsum(counts), bad[0], side="right"))
            raise FormatError(
                f"{path}, line {self.linenos[row]}: {what} index {idx[bad[0]]} is out of range; "
                f"the header (line 1) has num_{what}s={size}, so indices must be < {size}"
            )

    def _first_bad_value(self) -> tuple[int, str]:
        for row, text in enumerate(self.features):
            for token in text.split():
                value = token.partition(":")[2]
                try:
                    float(value)
                except ValueError:
                    return row, value
        raise AssertionError("unreachable: numpy rejected a value that float() accepts")


def _csr(chunks, which: int, shape: tuple[int, int]) -> sp.csr_matrix:
    counts = np.concatenate([c[which][0] for c in chunks])
    indptr = np.concatenate([[0], np.cumsum(counts)])
    indices = np.concatenate([c[which][1] for c in chunks])
    data = np.concatenate([c[which][2] for c in chunks])
    index_dtype = np.int32 if max(shape[1], indices.size) < 2**31 else np.int64
    matrix = sp.csr_matrix(
        (data, indices.astype(index_dtype), indptr.astype(index_dtype)), shape=shape
    )
    matrix.sum_duplicates()
    return matrix
