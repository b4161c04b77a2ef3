"""A living catalogue: items added and removed while the engine serves.

The engine keeps a :class:`Catalogue` (like its online state, by key and independent of the model
version): the items added online (each with its retrieval vector and, for the ranking model, its feature
values) and the keys removed. Each loaded version applies it through :class:`VersionItems`:

- an added item the version does not hold gets the next dense id: its vector is appended to the table
  retrieval scans (a :class:`GrowingRows` buffer: the version's table is copied into it once, at the first
  addition, with room to grow, and later additions write into the free rows, so an addition costs its own
  rows, amortized), its key joins the version's key map (:class:`ExtendedKeyMap`), and its features are
  pooled once for the ranking model;
- a removed key's id joins a sorted array that every request excludes (retrieval, candidates, fallback).

Additions publish their parts in an order that keeps every concurrent request consistent: the keys first,
then the ranking features, then the scanned table. A request reads the table once; retrieval drops
exclusion and candidate ids past it (items being added at that instant), so every id it returns is in
the ranking store and in the key map the answer is named by. Both operations are recorded in the event store
(kinds ``item_added`` / ``item_removed``), so a restart replays them, and a swap re-applies them to the
new version by key (an item the new version was trained on keeps the new version's own vector).
"""
from __future__ import annotations

import threading
from typing import Any, Mapping

import numpy as np

from .keys import KeyMap, UnknownKeyError, _is_int


class GrowingRows:
    """A 2-D array that grows by appending rows: ``view`` is the filled part (a view of the buffer, valid
    as long as it is held: a reallocation makes a new buffer and leaves the old one to its readers)."""

    def __init__(self, base: np.ndarray, *, spare: float = 0.25, min_spare: int = 1024):
        base = np.asarray(base)
        self._spare, self._min_spare = spare, min_spare
        cap = len(base) + max(min_spare, int(len(base) * spare))
        self._buf = np.empty((cap,) + base.shape[1:], base.dtype)
        self._buf[:len(base)] = base
        self.n = len(base)
        self.view = self._buf[:self.n]

    def append(self, rows: np.ndarray) -> np.ndarray:
        """Append ``rows``; returns the new view (also in :attr:`view`)."""
        rows = np.asarray(rows, self._buf.dtype)
        n, m = self.n, len(rows)
        if n + m > len(self._buf):
            cap = max(n + m, int(len(self._buf) * 2))
            buf = np.empty((cap,) + self._buf.shape[1:], self._buf.dtype)
            buf[:n] = self._buf[:n]
            self._buf = buf
        self._buf[n:n + m] = rows
        self.n = n + m
        self.view = self._buf[:self.n]
        return self.view


class ExtendedKeyMap(KeyMap):
    """A version's key map plus the keys added online (ids ``n_base, n_base + 1, ...`` in order)."""

    def __init__(self, base: KeyMap, added: list, ids: dict):
        kind = base.kind if base.kind != "dense" else "int"
        super().__init__(kind, len(base) + len(added))
        self.base, self._added, self._ids = base, added, ids

    def id(self, key) -> int:
        got = self.base.id(key)
        return got if got >= 0 else self._ids.get(key, -1)

    def lookup(self, keys) -> np.ndarray:
        out = self.base.lookup(keys)
        miss = np.flatnonzero(out < 0)
        if len(miss) and self._ids:
            seq = keys.tolist() if isinstance(keys, np.ndarray) else keys
            for j in miss.tolist():
                k = seq[j]
                out[j] = self._ids.get(k.item() if isinstance(k, np.generic) else k, -1)
        return out

    def key(self, i: int):
        nb = len(self.base)
        if nb <= i < self.n:
            return self._added[i - nb]
        return self.base.key(i)

    def keys(self, ids):
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n):
            bad = int(ids[(ids < 0) | (ids >= self.n)][0])
            raise IndexError(f"id {bad} is outside [0, {self.n})")
        nb = len(self.base)
        new = ids >= nb
        if not new.any():
            got = self.base.keys(ids)
            return got if self.kind == "str" else np.asarray(got, np.int64)
        if self.kind == "str":
            base = self.base.keys(ids[~new]) if (~new).any() else []
            it = iter(base)
            return [self._added[i - nb] if i >= nb else next(it) for i in ids.tolist()]
        out = np.empty(len(ids), np.int64)
        out[~new] = self.base.keys(ids[~new])
        out[new] = [self._added[i - nb] for i in ids[new].tolist()]
        return out

    def key_array(self) -> np.ndarray:
        base = self.base.key_array()
        return np.concatenate([base, np.array(self._added, dtype=base.dtype)])

    def __eq__(self, other) -> bool:
        return self is other

    __hash__ = None

    def __repr__(self) -> str:
        return f"ExtendedKeyMap({self.kind}, {len(self.base)} + {len(self._added)} keys)"


class Catalogue:
    """The items added and removed online (by key), in the order they happened; thread-safe.

    ``added``: key -> ``{"vector": float32 array or None, "features": mapping or None}``; ``removed``: keys.
    Adding a removed key brings it back; removing an added key drops its record (nothing of it is served or
    re-applied to later versions again, so a server that adds and withdraws items for months does not keep
    them all; a later re-add brings a new record). The removed keys stay, so a later bundle that holds one
    does not serve it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.added: dict = {}
        self.removed: set = set()

    def add(self, key, vector, features, content=None, text=None) -> None:
        with self._lock:
            self.added[key] = {"vector": vector, "features": features, "content": content, "text": text}
            self.removed.discard(key)

    def remove(self, key) -> None:
        with self._lock:
            self.removed.add(key)
            self.added.pop(key, None)

    def removed_keys(self) -> list:
        """The removed keys, in a stable order."""
        with self._lock:
            return sorted(self.removed, key=str)

    def snapshot(self) -> tuple[list, set]:
        with self._lock:
            return list(self.added.items()), set(self.removed)


class VersionItems:
    """One version's view of the catalogue: extended keys, the grown scanned table and the removed ids.

    ``apply_add`` / ``apply_remove`` are called under the engine's catalogue lock."""

    def __init__(self, version):
        self.v = version
        self.base_keys: KeyMap = version.item_keys
        self.n_base = version.n_items or 0
        self._added: list = []
        self._ids: dict = {}
        self._table: GrowingRows | None = None
        self._content: GrowingRows | None = None
        self.removed_ids = np.zeros(0, np.int64)

    def check_keys(self, keys: list) -> None:
        want = str if self.base_keys.kind == "str" else int
        for k in keys:
            if isinstance(k, bool) or not isinstance(k, want) or (want is int and not _is_int(k)):
                raise TypeError(f"item keys of this catalogue are {'strings' if want is str else 'integers'}, "
                                f"got {type(k).__name__} ({k!r})")

    def id(self, key) -> int:
        return self.v.item_keys.id(key)

    def apply_add(self, keys: list, vectors: np.ndarray | None, features: list,
                  content: np.ndarray | None = None) -> np.ndarray:
        """Give the keys the version does not hold their new ids (vectors appended, features pooled, content
        vectors appended when the version has a content table: zeros for an item without); keys it holds
        keep their ids (their vectors are the version's own). ``vectors`` None: from ``content`` through
        the version's content map. Returns the ids of ``keys``."""
        v = self.v
        ids = v.item_keys.lookup(list(keys))
        new = [j for j, i in enumerate(ids.tolist()) if i < 0]
        if new:
            r = v.retrieval
            if vectors is None and content is not None and v.content_map is not None:
                vectors = v.map_content(content)
            if vectors is None:
                raise ValueError(f"{len(new)} of the items are new to this model version and have no vector: "
                                 f"give vectors= (the retrieval model's item space, dim {r.items.shape[1]}), or "
                                 f"text= with a bundle that has a content map")
            rows = np.ascontiguousarray(vectors[new], np.float32)
            start = self.n_base + len(self._added)
            for j, k in enumerate(new):                               # 1. their keys
                self._ids[keys[k]] = start + j
                self._added.append(keys[k])
            v.item_keys = ExtendedKeyMap(self.base_keys, self._added, self._ids)
            if v.ranking is not None:
                v.ranking.add_items([features[j] for j in new],     # 2. what ranks them
                                    None if content is None else content[new])
            if v.content_vectors is not None:                      # what content similarity reads
                c = np.zeros((len(new), v.content_vectors.shape[1]), np.float32)
                if content is not None:
                    c[:] = content[new]
                if self._content is None:
                    self._content = GrowingRows(v.content_vectors)
                v.content_vectors = self._content.append(c)
            if self._table is None:                                   # 3. what retrieves them
                self._table = GrowingRows(r.items)
            r.items = self._table.append(rows)
            v.n_items = start + len(new)
            ids = v.item_keys.lookup(list(keys))
        return ids

    def set_removed(self, keys) -> None:
        ids = self.v.item_keys.lookup(list(keys)) if keys else np.zeros(0, np.int64)
        got = np.unique(ids[ids >= 0]).astype(np.int64)
        got.flags.writeable = False
        self.removed_ids = got


def check_features(features, n: int) -> list:
    """``features`` as a list of ``n`` mappings (or Nones)."""
    if features is None:
        return [None] * n
    if isinstance(features, Mapping):
        raise TypeError("features must be a sequence with one mapping per item")
    features = list(features)
    if len(features) != n:
        raise ValueError(f"features has {len(features)} entries for {n} items")
    for j, f in enumerate(features):
        if f is not None and not isinstance(f, Mapping):
            raise TypeError(f"features[{j}] must be a mapping or None, got {type(f).__name__}")
    return features


def check_vectors(vectors, n: int, dim: int | None) -> np.ndarray | None:
    if vectors is None:
        return None
    a = np.asarray(vectors)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"vectors must be numbers, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, np.float32)
    if a.ndim != 2 or a.shape[0] != n or (dim is not None and a.shape[1] != dim):
        raise ValueError(f"vectors must have shape ({n}, {dim}), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("vectors must be finite")
    return a


def unknown(key) -> UnknownKeyError:
    return UnknownKeyError(f"items: unknown item key {key!r}")


__all__ = ["Catalogue", "VersionItems", "ExtendedKeyMap", "GrowingRows", "Any"]
