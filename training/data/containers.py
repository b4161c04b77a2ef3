"""The shapes data takes on its way to a model: interactions, splits, sequences and CTR examples.

Ids are 0-based and dense (users ``0..n_users-1``, items ``0..n_items-1``) everywhere in training;
loaders remap raw ids and keep the maps.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self):
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
