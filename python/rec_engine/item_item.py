"""Item-item models (kind ``ease``): a user's scores are the sum of its items' rows of an item-item matrix.

With ``X`` the binary user-item matrix and ``B`` the model's ``n_items x n_items`` matrix (EASE^R: Steck
2019), the scores of a user with item row ``x`` are ``x B``: the sum of the rows of ``B`` of the user's
distinct items, which is one embedding-bag call of the core over ``B`` stored as an
:class:`~rec_engine.embedding.EmbeddingTable` (float32, float16 or row-wise int8). A user known to the
model and a new one are scored the same way, so new interactions count at once (fold-in is free).

Bundle (written by ``rec_engine_train.export_ease``): table ``item_item`` ``[n_items, n_items]``, arrays
``train_indptr`` / ``train_items`` (each user's distinct train items, CSR) and ``item_counts``, meta
``n_users``, ``n_items``, ``l2``, ``metrics``.

This is the maths training evaluates with and serving answers with (training imports it).
"""
from __future__ import annotations

import numpy as np

from .bundle import Bundle, BundleError
from .embedding import EmbeddingTable
from .topk import IdLists, TopK, topk

# rows of scores held at once by batch methods: about 64 MB of float32 whatever the catalogue
_SCORE_FLOATS = 1 << 24


def distinct_lists(lists: IdLists, n_items: int) -> IdLists:
    """Each list's distinct ids, sorted (a binary row: repeats count once). IndexError for an id outside
    ``[0, n_items)``."""
    if lists.ids.size and (lists.ids.min() < 0 or lists.ids.max() >= n_items):
        bad = int(np.flatnonzero((lists.ids < 0) | (lists.ids >= n_items))[0])
        raise IndexError(f"item id {int(lists.ids[bad])} (entry {bad}) is outside [0, {n_items})")
    rows = np.repeat(np.arange(len(lists), dtype=np.int64), np.diff(lists.indptr))
    keys = np.unique(rows * n_items + lists.ids)
    indptr = np.zeros(len(lists) + 1, np.int64)
    np.cumsum(np.bincount(keys // n_items, minlength=len(lists)), out=indptr[1:])
    return IdLists(indptr, keys % n_items)


class ItemItemScorer:
    """Scores and top-k of an item-item model.

    Parameters
    ----------
    table : EmbeddingTable ``[n_items, n_items]``  row ``i`` holds item ``i``'s contribution to every item
    seen_lists : IdLists, optional  each known user's train items (distinct), for users given by id
    item_counts : int array [n_items], optional  train interactions per item

    Notes
    -----
    Methods only read the table; they may be called from many threads at once.
    """

    def __init__(self, table: EmbeddingTable, seen_lists: IdLists | None = None, item_counts=None):
        if not isinstance(table, EmbeddingTable):
            raise TypeError(f"table must be an EmbeddingTable, got {type(table).__name__}")
        if table.rows != table.dim:
            raise ValueError(f"an item-item table must be square, got {table.rows} x {table.dim}")
        self.table = table
        self.n_items = table.rows
        self.seen_lists = seen_lists
        self.n_users = 0 if seen_lists is None else len(seen_lists)
        self.item_counts = None if item_counts is None else np.asarray(item_counts)

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> "ItemItemScorer":
        """The scorer of an ``ease`` bundle (its table memory-mapped, not copied)."""
        meta = bundle.meta
        table = bundle.table("item_item")
        n_users, n_items = int(meta["n_users"]), int(meta["n_items"])
        if table.shape != (n_items, n_items):
            raise BundleError(f"bundle {bundle.path}: table item_item is {table.rows} x {table.dim}, "
                              f"meta n_items is {n_items}")
        seen = IdLists(bundle.array("train_indptr", mmap=True), bundle.array("train_items", mmap=True))
        if len(seen) != n_users:
            raise BundleError(f"bundle {bundle.path}: train lists cover {len(seen)} users, meta n_users is {n_users}")
        return cls(table, seen, bundle.array("item_counts"))

    # ------------------------------------------------------------------------------------------ scores
    def user_scores(self, items, *, num_threads: int | None = None) -> np.ndarray:
        """Scores of every item for one user whose items are ``items`` (repeats count once): float32
        ``[n_items]``. IndexError for an id outside ``[0, n_items)``."""
        items = np.unique(np.asarray(items, np.int64).reshape(-1))
        if items.size and (items[0] < 0 or items[-1] >= self.n_items):
            bad = items[0] if items[0] < 0 else items[-1]
            raise IndexError(f"item id {int(bad)} is outside [0, {self.n_items})")
        return self.table.pool(items, np.array([0, items.size], np.int64), mode="sum", include_last_offset=True,
                               num_threads=num_threads)[0]

    def scores(self, lists, *, num_threads: int | None = None) -> np.ndarray:
        """Scores of every item for users given by their item lists: float32 ``[B, n_items]``.

        Parameters
        ----------
        lists : IdLists or a sequence of B id arrays (repeats count once)
        """
        lists = distinct_lists(lists if isinstance(lists, IdLists) else IdLists.from_lists(list(lists)), self.n_items)
        return self.table.pool(lists.ids, lists.indptr, mode="sum", include_last_offset=True,
                               num_threads=num_threads)

    def user_lists(self, users) -> IdLists:
        """The train lists of known users ``users`` (int array [B]); IndexError for an unknown id."""
        if self.seen_lists is None:
            raise ValueError("this scorer has no train lists: pass item lists instead of user ids")
        u = np.asarray(users, np.int64).reshape(-1)
        bad = np.flatnonzero((u < 0) | (u >= self.n_users))
        if bad.size:
            raise IndexError(f"user id {int(u[bad[0]])} at position {int(bad[0])} is outside [0, {self.n_users})")
        starts, stops = self.seen_lists.indptr[u], self.seen_lists.indptr[u + 1]
        indptr = np.zeros(u.size + 1, np.int64)
        np.cumsum(stops - starts, out=indptr[1:])
        gather = np.repeat(starts - indptr[:-1], stops - starts) + np.arange(indptr[-1], dtype=np.int64)
        return IdLists(indptr, self.seen_lists.ids[gather])

    # ------------------------------------------------------------------------------------------ top-k
    def recommend(self, lists, k: int = 10, *, exclude="items", num_threads: int | None = None) -> TopK:
        """The ``k`` best items for each user given by its item lists, best first (ties: lower id first).

        Parameters
        ----------
        lists : IdLists or a sequence of B id arrays  each user's items (train + observed)
        k : int
        exclude : "items" (each user's own items), None, or an IdLists / sequence of B id arrays

        Returns
        -------
        TopK(ids int64, scores float32) of shape ``(B, width)``, ``width = min(k, n_items)``; slots without
        an eligible item hold id -1 and score -inf.
        """
        lists = distinct_lists(lists if isinstance(lists, IdLists) else IdLists.from_lists(list(lists)), self.n_items)
        if isinstance(exclude, str):
            if exclude != "items":
                raise ValueError(f"exclude must be 'items', None or id lists, got {exclude!r}")
            exclude = lists
        elif exclude is not None and not isinstance(exclude, IdLists):
            exclude = IdLists.from_lists(list(exclude))
        if exclude is not None and len(exclude) != len(lists):
            raise ValueError(f"exclude has {len(exclude)} lists for {len(lists)} users")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        width = min(int(k), self.n_items)
        ids = np.full((len(lists), width), -1, np.int64)
        vals = np.full((len(lists), width), -np.inf, np.float32)
        one = np.ones(1, np.float32)
        step = max(1, _SCORE_FLOATS // max(self.n_items, 1))
        for start in range(0, len(lists), step):
            stop = min(start + step, len(lists))
            block = IdLists(lists.indptr[start:stop + 1] - lists.indptr[start],
                            lists.ids[lists.indptr[start]:lists.indptr[stop]])
            s = self.table.pool(block.ids, block.indptr, mode="sum", include_last_offset=True,
                                num_threads=num_threads)
            for j in range(stop - start):
                top = topk(one, s[j][:, None], width, exclude=None if exclude is None else exclude[start + j],
                           num_threads=1)
                ids[start + j], vals[start + j] = top.ids, top.scores
        return TopK(ids, vals)

    def recommend_users(self, users, k: int = 10, *, exclude_seen: bool = True,
                        num_threads: int | None = None) -> TopK:
        """:meth:`recommend` for known users by id (their train items; those excluded unless told not to).
        One id gives 1-D results, a batch 2-D."""
        u = np.asarray(users)
        if u.dtype.kind not in "iu" or u.ndim > 1:
            raise TypeError(f"users must be an integer id or a 1-D array of them, got dtype {u.dtype} and "
                            f"shape {u.shape}")
        out = self.recommend(self.user_lists(u), k, exclude="items" if exclude_seen else None,
                             num_threads=num_threads)
        return TopK(out.ids[0], out.scores[0]) if u.ndim == 0 else out
