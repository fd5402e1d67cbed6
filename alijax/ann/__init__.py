"""Binary codes and Hamming-space nearest-neighbour search (Large-scale Visual Search with
Binary Distributed Graph, arXiv 2102.04656)."""
