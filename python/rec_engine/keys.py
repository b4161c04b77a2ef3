"""The user's own keys ("sku-1837", 2**40 + 3, "u-22") and the dense ids the models use inside.

A :class:`KeyMap` maps ``n`` keys to the ids ``0..n-1`` and back. Keys are all integers (int64) or all
strings (UTF-8); a map without stored keys is the identity (``dense``: the ids are the keys), which is
what bundles written before keys existed, and data sets whose ids are already dense, get.

In a bundle a map is one or two arrays (no pickles, memory-mapped at load)::

    arrays/<entity>_keys.npy           int64 [n]          integer keys
    arrays/<entity>_keys_utf8.npy      uint8 [bytes]      string keys, concatenated UTF-8
    arrays/<entity>_keys_offsets.npy   int64 [n + 1]      key i is utf8[offsets[i]:offsets[i + 1]]

Look-ups go through the core's hash index (``_core.KeyIndex``, about 6.4 bytes a key beside the key
storage, built once at load); no Python dict of the keys is ever made.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from . import _core
from ._core import RecEngineError

KEY_KINDS = ("dense", "int", "str")


class UnknownKeyError(RecEngineError, KeyError):
    """A key that the model version does not know (an unknown item key in a request, for example)."""

    def __str__(self) -> str:          # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


def _is_int(k) -> bool:
    return isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_))


class KeyMap:
    """Keys <-> dense ids for one entity (users or items). Immutable; safe to share between threads.

    Build one with :meth:`from_keys` (checks types and uniqueness), :meth:`dense`, or read it from a
    bundle's arrays with :meth:`from_arrays`.
    """

    def __init__(self, kind: str, n: int, index=None, int_keys: np.ndarray | None = None,
                 utf8: np.ndarray | None = None, offsets: np.ndarray | None = None):
        self.kind, self.n = kind, int(n)
        self._index, self._ints, self._utf8, self._offsets = index, int_keys, utf8, offsets

    # ------------------------------------------------------------------ construction
    @classmethod
    def dense(cls, n: int) -> "KeyMap":
        """The identity map over ``n`` ids (keys are the ints ``0..n-1``)."""
        return cls("dense", n)

    @classmethod
    def from_keys(cls, keys: Iterable[Any]) -> "KeyMap":
        """The map whose key of id ``i`` is ``keys[i]``: all ints (within int64) or all str, distinct.

        Raises TypeError for mixed, bool, float or other key types, ValueError for duplicates (naming
        the key and both positions) or integers outside int64."""
        if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
            if keys.dtype.kind == "u" and keys.size and keys.max() > np.iinfo(np.int64).max:
                raise ValueError("integer keys must fit in int64")
            return cls._from_ints(np.ascontiguousarray(keys, dtype=np.int64))
        keys = list(keys)
        if all(_is_int(k) for k in keys):
            try:
                arr = np.array(keys, dtype=np.int64) if keys else np.zeros(0, np.int64)
            except OverflowError:
                raise ValueError("integer keys must fit in int64") from None
            return cls._from_ints(arr)
        if all(isinstance(k, str) for k in keys):
            encoded = [k.encode("utf-8") for k in keys]
            offsets = np.zeros(len(keys) + 1, np.int64)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            utf8 = np.frombuffer(b"".join(encoded), np.uint8) if encoded else np.zeros(0, np.uint8)
            return cls._from_strings(utf8, offsets)
        pos = next((j for j, k in enumerate(keys) if not (_is_int(k) or isinstance(k, str))), None)
        if pos is not None:
            bad = keys[pos]
            raise TypeError(f"keys must be all integers or all strings, got a {type(bad).__name__} ({bad!r})")
        raise TypeError("keys must be all integers or all strings, not a mix of both")

    @classmethod
    def _from_ints(cls, keys: np.ndarray) -> "KeyMap":
        try:
            index = _core.KeyIndex(keys)
        except ValueError as e:
            raise _duplicate(e, lambda i: int(keys[i])) from None
        return cls("int", len(keys), index, int_keys=keys)

    @classmethod
    def _from_strings(cls, utf8: np.ndarray, offsets: np.ndarray) -> "KeyMap":
        try:
            index = _core.KeyIndex(utf8, offsets)
        except ValueError as e:
            def key(i):
                return bytes(utf8[offsets[i]:offsets[i + 1]]).decode("utf-8", "replace")
            raise _duplicate(e, key) from None
        return cls("str", len(offsets) - 1, index, utf8=utf8, offsets=offsets)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], entity: str, n: int) -> "KeyMap":
        """The map of ``entity`` ("user" / "item") stored in ``arrays`` (see the module docstring), or
        the identity over ``n`` ids when none is stored. Raises ValueError when it does not hold ``n`` keys."""
        if f"{entity}_keys" in arrays:
            m = cls._from_ints(_int64(arrays[f"{entity}_keys"], f"{entity}_keys"))
        elif f"{entity}_keys_utf8" in arrays:
            utf8 = np.asarray(arrays[f"{entity}_keys_utf8"])
            offsets = _int64(arrays.get(f"{entity}_keys_offsets"), f"{entity}_keys_offsets")
            if utf8.dtype != np.uint8 or utf8.ndim != 1:
                raise ValueError(f"{entity}_keys_utf8 must be a 1-D uint8 array")
            m = cls._from_strings(np.ascontiguousarray(utf8), offsets)
        else:
            return cls.dense(n)
        if len(m) != n:
            raise ValueError(f"the {entity} key map holds {len(m)} keys, the model has {n} {entity}s")
        return m

    def to_arrays(self, entity: str) -> dict[str, np.ndarray]:
        """The arrays that store this map in a bundle (none for the identity map)."""
        if self.kind == "int":
            return {f"{entity}_keys": self._ints}
        if self.kind == "str":
            return {f"{entity}_keys_utf8": self._utf8, f"{entity}_keys_offsets": self._offsets}
        return {}

    # ------------------------------------------------------------------ look-ups
    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"KeyMap({self.kind}, {self.n} keys)"

    def __eq__(self, other) -> bool:
        if not isinstance(other, KeyMap) or len(self) != len(other):
            return False
        if self.kind != other.kind:      # an int map of 0..n-1 equals the identity
            return {self.kind, other.kind} == {"dense", "int"} and np.array_equal(
                self.key_array(), other.key_array())
        if self.kind == "int":
            return np.array_equal(self._ints, other._ints)
        if self.kind == "str":
            return np.array_equal(self._offsets, other._offsets) and np.array_equal(self._utf8, other._utf8)
        return True

    __hash__ = None

    def id(self, key) -> int:
        """The dense id of ``key``, -1 when the map does not hold it. TypeError for a key of the wrong type."""
        if self.kind == "dense":
            if not _is_int(key):
                raise TypeError(f"keys of this map are integers, got {type(key).__name__}")
            return int(key) if 0 <= key < self.n else -1
        return self._index.find(key)

    def lookup(self, keys) -> np.ndarray:
        """Dense ids (int64) of a sequence of keys (or an int64 array), -1 where a key is unknown."""
        if self.kind == "dense":
            a = _int_keys(keys)
            return np.where((a >= 0) & (a < self.n), a, -1)
        return self._index.lookup(keys if not isinstance(keys, np.ndarray) or keys.dtype == np.int64
                                  or keys.dtype.kind not in "iu" else keys.astype(np.int64))

    def ids(self, keys, what: str = "item") -> np.ndarray:
        """Dense ids of ``keys``; :class:`UnknownKeyError` naming the first key the map does not hold."""
        out = self.lookup(keys)
        if out.size and out.min() < 0:
            pos = int(np.flatnonzero(out < 0)[0])
            key = keys[pos]
            key = key.item() if isinstance(key, np.generic) else key
            raise UnknownKeyError(f"unknown {what} key {key!r} (position {pos})")
        return out

    def key(self, i: int):
        """The key of dense id ``i``."""
        if not 0 <= i < self.n:
            raise IndexError(f"id {i} is outside [0, {self.n})")
        if self.kind == "str":
            return self._index.strings(np.array([i], np.int64))[0]
        return int(self._ints[i]) if self.kind == "int" else int(i)

    def keys(self, ids) -> np.ndarray | list:
        """The keys of dense ids ``ids`` (all in ``[0, n)``): an int64 array, or a list of str."""
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            bad = int(ids[(ids < 0) | (ids >= self.n)][0])
            raise IndexError(f"id {bad} is outside [0, {self.n})")
        if self.kind == "str":
            return self._index.strings(ids)
        return ids.copy() if self.kind == "dense" else self._ints[ids]

    def key_array(self) -> np.ndarray:
        """Every key in id order: int64 array, or an object array of str."""
        if self.kind == "str":
            return np.array(self._index.strings(np.arange(self.n, dtype=np.int64)), dtype=object)
        return np.arange(self.n, dtype=np.int64) if self.kind == "dense" else np.asarray(self._ints)


def _int64(a, name: str) -> np.ndarray:
    if a is None:
        raise ValueError(f"{name} is missing")
    a = np.asarray(a)
    if a.dtype != np.int64 or a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int64 array, got {a.dtype} with shape {a.shape}")
    return np.ascontiguousarray(a)


def _int_keys(keys) -> np.ndarray:
    """Integer keys as int64 (TypeError naming the first non-integer; keys outside int64 become -1)."""
    if isinstance(keys, np.ndarray) and keys.dtype.kind in "iu":
        return keys.astype(np.int64, copy=False).reshape(-1)
    keys = list(keys)
    for pos, k in enumerate(keys):
        if not _is_int(k):
            raise TypeError(f"keys of this map are integers, got {type(k).__name__} at position {pos}")
    return np.array([k if -2**63 <= k < 2**63 else -1 for k in keys], dtype=np.int64).reshape(-1)


def _duplicate(e: ValueError, key_at) -> ValueError:
    """The core's duplicate-key error, with the key itself named."""
    import re

    m = re.search(r"positions (\d+) and (\d+)", str(e))
    if not m:
        return e
    i, j = int(m.group(1)), int(m.group(2))
    return ValueError(f"duplicate key {key_at(i)!r} at positions {i} and {j}: keys must be distinct")


def as_key_map(keys, n: int) -> KeyMap:
    """``keys`` (a KeyMap, a sequence of keys, or None for the identity) as a KeyMap of ``n`` keys."""
    m = keys if isinstance(keys, KeyMap) else KeyMap.dense(n) if keys is None else KeyMap.from_keys(keys)
    if len(m) != n:
        raise ValueError(f"{len(m)} keys given for {n} ids")
    return m
