"""rec_engine: compiled, low-latency recommendation inference.

The C++ core (``rec_engine._core``) does the heavy lifting; this package is a thin typed facade:

- :class:`EmbeddingTable`: float32 / float16 / int8 tables, ``gather`` and ``pool`` (embedding_bag)
- :func:`normalized_adjacency`, :func:`spmm`, :func:`propagate`: graph propagation (LightGCN)
- :func:`topk`: exact top-k with exclusion and candidate subsets
- :func:`simd_level`, :func:`set_simd_level`: the instruction set in use
"""
from ._core import RecEngineError
from .embedding import EmbeddingTable
from .graph import CsrMatrix, normalized_adjacency, propagate, spmm
from .runtime import (default_num_threads, openmp_enabled, set_simd_level, simd_level,
                      supported_simd_levels)
from .topk import IdLists, ItemIndex, TopK, topk

__version__ = "0.1.0"

__all__ = [
    "CsrMatrix", "EmbeddingTable", "IdLists", "ItemIndex", "RecEngineError", "TopK", "default_num_threads",
    "normalized_adjacency", "openmp_enabled", "propagate", "set_simd_level", "simd_level", "spmm",
    "supported_simd_levels", "topk",
]
