"""rec_engine: compiled, low-latency recommendation inference.

The C++ core (``rec_engine._core``) does the heavy lifting; this package is a thin typed facade:

- :class:`EmbeddingTable`: float32 / float16 / int8 tables, ``gather`` and ``pool`` (embedding_bag)
- :func:`normalized_adjacency`, :func:`spmm`, :func:`propagate`: graph propagation (LightGCN)
- :func:`topk`: exact top-k with exclusion and candidate subsets
- :func:`simd_level`, :func:`set_simd_level`: the instruction set in use
- :class:`Engine`: serving from a bundle (retrieval, ranking, feedback, swaps), by the user's own keys
- :class:`KeyMap`: the user's own keys <-> dense ids; :func:`open_bundle`, :func:`write_bundle`
- :class:`Event`, :class:`EventStore`, :class:`SqliteEventStore`, :func:`open_store`: behaviour collection
  (``rec_engine.events_redis`` for Redis Streams, ``rec_engine.report`` for feedback metrics,
  ``rec_engine.content`` for the text encoder, ``rec_engine.versions`` for model homes)

Importing the package loads neither ONNX Runtime nor torch: ONNX Runtime is loaded when an Engine (or a
ranking / sequential model) is first built.
"""
from ._core import RecEngineError
from .bundle import Bundle, BundleError, open_bundle, write_bundle, write_pipeline
from .embedding import EmbeddingTable
from .engine import Engine, Recommendation
from .events import Event, EventStore, EventStoreError, SqliteEventStore, open_store
from .keys import KeyMap, UnknownKeyError
from .graph import CsrMatrix, normalized_adjacency, propagate, spmm
from .runtime import (default_num_threads, openmp_enabled, set_simd_level, simd_level,
                      supported_simd_levels)
from .topk import IdLists, ItemIndex, TopK, topk

__version__ = "0.1.0"

__all__ = [
    "Bundle", "BundleError", "CsrMatrix", "EmbeddingTable", "Engine", "Event", "EventStore", "EventStoreError",
    "IdLists", "ItemIndex", "KeyMap", "SqliteEventStore", "open_store",
    "RecEngineError", "Recommendation", "TopK", "UnknownKeyError", "default_num_threads", "normalized_adjacency",
    "open_bundle", "openmp_enabled", "propagate", "set_simd_level", "simd_level", "spmm",
    "supported_simd_levels", "topk", "write_bundle", "write_pipeline",
]
