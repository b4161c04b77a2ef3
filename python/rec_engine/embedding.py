"""Embedding tables: row lookup and bag pooling in C++ over float32, float16 or row-wise int8 storage."""
from __future__ import annotations

import os

import numpy as np

from . import _core
from ._convert import _ID_DTYPES, as_float32, as_ids, threads_arg

_STORAGE = ("float32", "float16", "int8")


class EmbeddingTable:
    """A ``rows x dim`` embedding table served by the C++ core.

    Parameters
    ----------
    weights : numpy.ndarray, shape (rows, dim)
        float32 or float16 values, or uint8 codes of a row-wise int8 table (then ``scale_bias`` is
        required and a value is ``scale * code + bias``). A C-contiguous float32, float16 or uint8 array
        (a memory-mapped ``.npy`` included) is used in place, without a copy, and must not be changed
        while the table is in use; other float arrays are converted to float32 once.
    scale_bias : numpy.ndarray, shape (rows, 2), float32, optional
        Per-row ``(scale, bias)`` of an int8 table.

    Notes
    -----
    Every method releases the GIL while it works and may be called from many threads at once.
    Results are float32 whatever the storage.
    """

    def __init__(self, weights, scale_bias=None):
        w = np.asarray(weights)
        if w.ndim != 2:
            raise ValueError(f"weights must have 2 dimensions (rows, dim), got shape {w.shape}")
        if w.dtype == np.uint8:
            if scale_bias is None:
                raise ValueError("uint8 weights are row-wise int8 codes: pass scale_bias, a (rows, 2) float32 array")
            sb = as_float32(scale_bias, "scale_bias", ndim=2)
            if not np.isfinite(sb).all():
                raise ValueError("scale_bias must be finite")
            w = np.ascontiguousarray(w)
        else:
            if scale_bias is not None:
                raise ValueError("scale_bias is only used with uint8 (int8 row-wise) weights")
            sb = None
            if w.dtype not in (np.float32, np.float16):
                w = as_float32(w, "weights")
            w = np.ascontiguousarray(w)
        self._table = _core.EmbeddingTable(w, sb)

    # ---------------------------------------------------------------- construction
    @classmethod
    def quantize(cls, weights, dtype: str = "int8") -> "EmbeddingTable":
        """Build a table stored as ``dtype`` ("float32", "float16" or "int8") from float weights.

        int8 is row-wise asymmetric 8-bit quantization (as in FBGEMM): ``scale = (max - min) / 255``,
        ``bias = min`` per row, so every value is within ``scale / 2`` of the original."""
        if dtype not in _STORAGE:
            raise ValueError(f"dtype must be one of {_STORAGE}, got {dtype!r}")
        w = as_float32(weights, "weights", ndim=2)
        if not np.isfinite(w).all():
            raise ValueError("weights must be finite to be quantized")
        if dtype == "float32":
            return cls(w)
        if dtype == "float16":
            return cls(w.astype(np.float16))
        lo = w.min(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
        hi = w.max(axis=1) if w.shape[1] else np.zeros(w.shape[0], np.float32)
        with np.errstate(over="ignore"):
            scale = (hi - lo) / np.float32(255.0)
        if not np.isfinite(scale).all():
            raise ValueError("a row's value range (max - min) overflows float32: it cannot be quantized to int8")
        safe = np.where(scale > 0, scale, np.float32(1.0))
        codes = np.clip(np.rint((w - lo[:, None]) / safe[:, None]), 0, 255).astype(np.uint8)
        return cls(codes, np.stack([scale, lo], axis=1).astype(np.float32))

    @classmethod
    def load(cls, path: str | os.PathLike, *, scale_bias: str | os.PathLike | None = None,
             mmap: bool = True) -> "EmbeddingTable":
        """Open a ``.npy`` table, memory-mapped read-only by default (no copy, pages load on use).

        For an int8 table pass the path of its ``(rows, 2)`` float32 scale/bias ``.npy`` as well."""
        mode = "r" if mmap else None
        w = np.load(path, mmap_mode=mode, allow_pickle=False)
        sb = None if scale_bias is None else np.load(scale_bias, mmap_mode=mode, allow_pickle=False)
        return cls(w, sb)

    # ---------------------------------------------------------------- properties
    @property
    def rows(self) -> int:
        return int(self._table.rows)

    @property
    def dim(self) -> int:
        return int(self._table.dim)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    @property
    def dtype(self) -> str:
        """Storage type: "float32", "float16" or "int8"."""
        return str(self._table.storage)

    @property
    def weights(self) -> np.ndarray:
        """The stored array (float32, float16, or uint8 codes), shared with the table, not a copy."""
        return self._table.weights

    @property
    def scale_bias(self) -> np.ndarray | None:
        """Per-row (scale, bias) of an int8 table; None for float32 and float16 storage."""
        return self._table.scale_bias if self.dtype == "int8" else None

    @property
    def nbytes(self) -> int:
        sb = self.scale_bias
        return int(self.weights.nbytes + (0 if sb is None else sb.nbytes))

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"EmbeddingTable(rows={self.rows}, dim={self.dim}, dtype={self.dtype!r})"

    # ---------------------------------------------------------------- kernels
    def gather(self, ids, *, num_threads: int | None = None) -> np.ndarray:
        """Rows ``ids`` as float32.

        Parameters
        ----------
        ids : array_like of int, any shape
            Row ids in ``[0, rows)``; int32 and int64 are used without a copy.

        Returns
        -------
        numpy.ndarray, float32, shape ``ids.shape + (dim,)``

        Raises
        ------
        IndexError  an id is out of range (the message names its position).
        TypeError   ids are not integers.
        """
        a = as_ids(ids, "ids", ndim=None)
        flat = a.reshape(-1)
        out = self._table.gather(flat, threads_arg(num_threads))
        return out.reshape(a.shape + (self.dim,))

    def pool(self, indices, offsets=None, per_sample_weights=None, mode: str = "sum", *,
             include_last_offset: bool = False, num_threads: int | None = None) -> np.ndarray:
        """Pool bags of rows, as ``torch.nn.functional.embedding_bag``.

        Parameters
        ----------
        indices : array_like of int
            1-D ids of all bags back to back (then ``offsets`` is required), or 2-D ``(bags, L)`` for
            bags of a fixed size ``L`` (then ``offsets`` must be None).
        offsets : array_like of int, optional
            Start of each bag in ``indices`` (``bags`` entries, the first 0), or ``bags + 1`` entries
            ending with ``len(indices)`` when ``include_last_offset`` is True. Must not decrease.
        per_sample_weights : array_like of float, optional
            One weight per index, multiplied into its row; only with ``mode="sum"`` (as in PyTorch).
        mode : {"sum", "mean", "max"}
            Empty bags give zeros in every mode.

        Returns
        -------
        numpy.ndarray, float32, shape ``(bags, dim)``
        """
        nt = 0 if num_threads is None else threads_arg(num_threads)
        if (type(indices) is np.ndarray and indices.ndim == 2 and offsets is None
                and per_sample_weights is None and indices.dtype in _ID_DTYPES
                and indices.flags.c_contiguous):
            # the request path: fixed-size bags of int32/int64 ids, handed to the core as they are
            return self._table.pool(indices, None, None, mode, nt)
        idx = as_ids(indices, "indices", ndim=None)
        if idx.ndim == 2:
            if offsets is not None:
                raise ValueError("offsets must be None when indices is 2-D (fixed-size bags)")
            offs = None  # the core builds the offsets of fixed-size bags
        elif idx.ndim == 1:
            if offsets is None:
                raise ValueError("offsets are required when indices is 1-D")
            offs = as_ids(offsets, "offsets").astype(np.int64, copy=False)
            if include_last_offset and offs.shape[0] < 1:
                raise ValueError("with include_last_offset=True offsets needs at least one entry")
            offs = np.ascontiguousarray(offs)
        else:
            raise ValueError(f"indices must be 1-D (with offsets) or 2-D, got shape {idx.shape}")
        w = None
        if per_sample_weights is not None:
            w = as_float32(per_sample_weights, "per_sample_weights").reshape(-1)
        return self._table.pool(idx, offs, w, mode, nt, bool(include_last_offset) or offs is None)

    def pool_select(self, indices, offsets, weights, bags, dest, out, *, num_threads: int | None = None,
                    second: "EmbeddingTable | None" = None, second_out: np.ndarray | None = None) -> np.ndarray:
        """Sum-pool the selected bags of a bag store into rows of ``out``, in place.

        ``out[dest[i]] = sum(weights[j] * row(indices[j]) for j in bag bags[i])`` (weight 1 when
        ``weights`` is None; an empty bag gives zeros); rows of ``out`` not named in ``dest`` are left
        as they are. Each row equals ``pool(...)`` of the taken bag bit for bit.

        Parameters
        ----------
        indices : numpy.ndarray, int32 or int64, 1-D
            Ids of all bags of the store back to back (a memory-mapped array is read only where selected).
        offsets : numpy.ndarray, int64, 1-D, ``n_bags + 1`` entries
        weights : numpy.ndarray, float32, 1-D (one per index), or None
        bags, dest : numpy.ndarray, int64, 1-D, the same length
            The bags to pool (repeats allowed) and the distinct rows of ``out`` they go to.
        out : numpy.ndarray, float32, shape ``(n_out, dim)``, C-contiguous and writeable

        Returns ``out``. Arrays must be C-contiguous of exactly these dtypes (TypeError otherwise; no
        copies are made). Raises IndexError for a bag, dest row or id out of range, ValueError for a
        repeated dest row, bad offsets of a selected bag, a non-finite weight of one, or mismatched
        lengths; ``out`` is unchanged when anything raises.

        ``second`` / ``second_out`` (both or neither): the same bags pooled from another table over the same
        ids (a CTR model's linear weights beside its embeddings) into ``second_out`` (float32,
        ``(len(out), second.dim)``), the store read once for both; the ids must be rows of both tables.
        """
        if (second is None) != (second_out is None):
            raise ValueError("give second and second_out together")
        if second is not None and not isinstance(second, EmbeddingTable):
            raise TypeError(f"second must be an EmbeddingTable, got {type(second).__name__}")
        return self._table.pool_select(indices, offsets, weights, bags, dest, out, threads_arg(num_threads),
                                       None if second is None else second._table, second_out)

    def to_numpy(self) -> np.ndarray:
        """The whole table as float32 (dequantized for float16 and int8 storage)."""
        return self.gather(np.arange(self.rows, dtype=np.int64))
