"""The shapes data takes on its way to a model: interactions, splits, sequences and CTR examples.

Ids are 0-based and dense (users ``0..n_users-1``, items ``0..n_items-1``) everywhere in training;
loaders remap the user's own ids (*keys*) and keep them: a container's ``keys`` is ``{"user": K_u,
"item": K_i}`` where ``K_u[u]`` is the key of dense user ``u`` (keys in dense-id order), or None when the
dense ids are the keys (user ``u``'s key is the integer ``u``). One side's keys are either all integers
(a NumPy int64 array) or all strings (a NumPy object array of Python ``str``); they are distinct. Loaders
number keys in sorted order (numeric for integer keys, code point order for strings); other code may use
any order (the synthetic world's string keys follow its dense ids). :func:`normalize_keys` checks and
converts keys given as lists; :func:`dense_ids` maps keys back to dense ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from rec_engine import IdLists
from rec_engine.features import EncodedBatch, Schema


@dataclass
class Interactions:
    """``n`` (user, item) events, optionally time-stamped, over ``n_users`` x ``n_items``."""

    users: np.ndarray          # int64 [n]
    items: np.ndarray          # int64 [n]
    n_users: int
    n_items: int
    timestamps: np.ndarray | None = None   # int64 [n]
    keys: dict | None = None               # the user's own ids (see the module doc); split functions pass them on

    def __post_init__(self):
        self.keys = normalize_keys(self.keys, self.n_users, self.n_items)
        self.users = np.ascontiguousarray(self.users, dtype=np.int64)
        self.items = np.ascontiguousarray(self.items, dtype=np.int64)
        if self.users.shape != self.items.shape or self.users.ndim != 1:
            raise ValueError(f"users and items must be 1-D of one length, got {self.users.shape} and {self.items.shape}")
        if len(self.users) and (self.users.min() < 0 or self.users.max() >= self.n_users):
            raise ValueError(f"user ids must be in [0, {self.n_users})")
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.n_items):
            raise ValueError(f"item ids must be in [0, {self.n_items})")

    def __len__(self) -> int:
        return len(self.users)

    def by_user(self) -> IdLists:
        """Each user's items (in the order of the events, stable), as CSR lists of ``n_users`` users."""
        order = np.argsort(self.users, kind="stable")
        counts = np.bincount(self.users, minlength=self.n_users)
        indptr = np.zeros(self.n_users + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return IdLists(indptr, self.items[order])

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.items, minlength=self.n_items).astype(np.int64)


@dataclass
class ImplicitSplit:
    """Implicit feedback for all-item ranking (the LightGCN protocol): train / test (/ valid) events."""

    train: Interactions
    test: Interactions
    valid: Interactions | None = None
    name: str = ""
    keys: dict | None = None     # None: the train part's keys (if any); the parts share the split's keys

    def __post_init__(self):
        if self.keys is None:
            self.keys = self.train.keys
        self.keys = normalize_keys(self.keys, self.train.n_users, self.train.n_items)
        for part in (self.train, self.test, self.valid):
            if part is not None and part.keys is None:
                part.keys = self.keys


@dataclass
class SequenceData:
    """Time-ordered item sequences per user, split leave-last-out (the SASRec protocol): for user ``u``
    ``train[u]`` is all but the last two items, ``valid[u]`` the second-to-last, ``test[u]`` the last
    (-1 where the user has too few items)."""

    train: list[np.ndarray]    # int64 arrays of item ids, oldest first
    valid: np.ndarray          # int64 [n_users]
    test: np.ndarray           # int64 [n_users]
    n_items: int
    name: str = ""
    keys: dict | None = None

    def __post_init__(self):
        self.keys = normalize_keys(self.keys, len(self.train), self.n_items)

    @property
    def n_users(self) -> int:
        return len(self.train)

    def seen(self, upto: str = "valid") -> IdLists:
        """Items each user interacted with: train, plus valid (``upto="valid"``) and test (``"test"``)."""
        lists = []
        for u, seq in enumerate(self.train):
            extra = []
            if upto in ("valid", "test") and self.valid[u] >= 0:
                extra.append(self.valid[u])
            if upto == "test" and self.test[u] >= 0:
                extra.append(self.test[u])
            lists.append(np.concatenate([seq, np.asarray(extra, np.int64)]))
        return IdLists.from_lists(lists)


@dataclass
class CtrData:
    """Labelled examples of a feature schema for ranking (CTR) models."""

    schema: Schema
    train: EncodedBatch
    valid: EncodedBatch
    test: EncodedBatch
    name: str = ""
    extra: dict = field(default_factory=dict)   # e.g. the ground-truth click probabilities of synthetic data
    keys: dict | None = None    # keys of the dense user / item ids of ``extra["entity_features"]``, if any

    def __post_init__(self):
        self.keys = normalize_keys(self.keys)


# ------------------------------------------------------------------------------------------ keys
def _key_array(values, side: str) -> np.ndarray:
    """One side's keys as an int64 array (all integers) or an object array of str (all strings)."""
    arr = values if isinstance(values, np.ndarray) else np.asarray(list(values), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{side} keys must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind == "u" and len(arr) and arr.max() > np.iinfo(np.int64).max:
        raise ValueError(f"{side} keys: integer keys must fit int64")
    if arr.dtype.kind in "iu":
        out = np.asarray(arr, np.int64)
    elif arr.dtype.kind == "U":
        out = arr.astype(object)
    elif arr.dtype.kind == "O":
        items = arr.tolist()
        if all(type(x) is str for x in items):
            out = arr
        elif all(isinstance(x, str) for x in items):
            out = np.empty(len(items), object)
            out[:] = [str(x) for x in items]
        elif all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in items):
            try:
                out = np.asarray(items, np.int64) if items else np.zeros(0, np.int64)
            except OverflowError:
                raise ValueError(f"{side} keys: integer keys must fit int64") from None
        else:
            raise ValueError(f"{side} keys must be all int or all str, got "
                             f"{sorted({type(x).__name__ for x in items})}")
    else:
        raise ValueError(f"{side} keys must be int or str, got dtype {arr.dtype}")
    distinct = len(np.unique(out)) if out.dtype.kind == "i" else len(set(out.tolist()))
    if distinct != len(out):
        raise ValueError(f"{side} keys must be distinct: {len(out) - distinct} repeated")
    return out


def normalize_keys(keys: Mapping | None, n_users: int | None = None, n_items: int | None = None) -> dict | None:
    """Check ``keys`` (None, or ``{"user": ..., "item": ...}`` of lists or arrays) and return them as
    ``{"user": int64 array | object array of str, "item": ...}``; raise ValueError for keys of mixed types,
    repeated keys, or (when given) a count other than ``n_users`` / ``n_items``."""
    if keys is None:
        return None
    if not isinstance(keys, Mapping) or set(keys) != {"user", "item"}:
        raise ValueError(f"keys must be a dict with 'user' and 'item', got {keys!r:.200}")
    out = {}
    for side, n in (("user", n_users), ("item", n_items)):
        arr = _key_array(keys[side], side)
        if n is not None and len(arr) != n:
            raise ValueError(f"{len(arr)} {side} keys for {n} {side}s")
        out[side] = arr
    return out


def dense_ids(side_keys: np.ndarray | None, wanted) -> np.ndarray:
    """Dense ids (int64) of the keys ``wanted`` given one side's keys (``keys["user"]`` or
    ``keys["item"]``); -1 for an unknown key. With ``side_keys`` None (the dense ids are the keys)
    integer keys come back as they are."""
    wanted = np.asarray(list(wanted) if not isinstance(wanted, np.ndarray) else wanted)
    if side_keys is None:
        w = wanted.astype(np.int64) if wanted.dtype.kind in "iu" else None
        return np.full(len(wanted), -1, np.int64) if w is None else w
    if side_keys.dtype.kind == "i":
        if wanted.dtype.kind not in "iu" or not len(side_keys):
            return np.full(len(wanted), -1, np.int64)
        order = np.argsort(side_keys, kind="stable")
        srt = side_keys[order]
        pos = np.minimum(np.searchsorted(srt, wanted), len(srt) - 1)
        return np.where(srt[pos] == wanted, order[pos], -1).astype(np.int64)
    index = {k: i for i, k in enumerate(side_keys.tolist())}
    return np.fromiter((index.get(w, -1) if isinstance(w, str) else -1 for w in wanted.tolist()), np.int64,
                       len(wanted))
