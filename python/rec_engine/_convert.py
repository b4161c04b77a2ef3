"""Argument conversion for the Python facade.

The C++ core takes C-contiguous arrays of an exact dtype and never copies them. These helpers hand such
arrays through untouched and convert everything else once, or reject it where a conversion would be
wrong (float ids, ids that do not fit in int64, non-numeric data).
"""
from __future__ import annotations

import operator

import numpy as np

_ID_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def as_float32(x, name: str, ndim: int | None = None) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 array (no copy when it already is one)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" or a.dtype.kind == "b":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape {a.shape}")
    return _c_contiguous(a, np.float32)


def _c_contiguous(a: np.ndarray, dtype) -> np.ndarray:
    """``a`` as a C-contiguous array of ``dtype``, copied only if needed, keeping 0-d arrays 0-d
    (np.ascontiguousarray would make them 1-d)."""
    if a.dtype == dtype and a.flags.c_contiguous and a.flags.aligned:   # (the core refuses misaligned data)
        return a
    return np.array(a, dtype=dtype, order="C")


def as_ids(x, name: str, ndim: int | None = 1) -> np.ndarray:
    """Return ``x`` as a C-contiguous int32 or int64 array (int32/int64 pass through, other integer
    dtypes widen to int64). Floats, booleans and values beyond int64 raise."""
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":  # np.asarray([]) is float64
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer ids (int32 or int64), got dtype {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension{'s' if ndim != 1 else ''}, got shape {a.shape}")
    if a.dtype in _ID_DTYPES:  # native int32/int64 (a byte-swapped dtype compares unequal)
        return _c_contiguous(a, a.dtype)
    if a.dtype == np.uint64 and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise IndexError(f"{name} holds an id larger than int64 can represent")
    return _c_contiguous(a, np.int64)


def as_count(x, name: str) -> int:
    """An integer count >= 0 (booleans and floats rejected)."""
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        v = operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(x).__name__}") from None
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def threads_arg(num_threads) -> int:
    """None means the default (0 for the core); otherwise a positive integer."""
    if num_threads is None:
        return 0
    v = as_count(num_threads, "num_threads")
    if v == 0:
        raise ValueError("num_threads must be >= 1 (or None for the default)")
    return v


def at_least_one(value, name: str) -> int:
    """``value`` as an int if it is an integer >= 1 (NumPy integers too, booleans not), else ValueError."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
