"""Binary codes and Hamming-space nearest-neighbour search (Large-scale Visual Search with
Binary Distributed Graph, arXiv 2102.04656)."""

from alijax.ann.codes import Binarizer, encode, fit_itq, fit_lsh, fit_pca  # noqa: E402
from alijax.ann.exact import exact_search  # noqa: E402
from alijax.ann.graph import GraphConfig, build_graph, graph_recall, knn_graph  # noqa: E402
from alijax.ann.index import BinaryGraphIndex  # noqa: E402
from alijax.ann.search import SearchConfig  # noqa: E402

__all__ = [
    "Binarizer",
    "BinaryGraphIndex",
    "GraphConfig",
    "SearchConfig",
    "build_graph",
    "encode",
    "exact_search",
    "fit_itq",
    "fit_lsh",
    "fit_pca",
    "graph_recall",
    "knn_graph",
]
