"""EASE^R (Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): the closed-form item-item model.

Method
------
``X`` is the binary train matrix (users x items; repeats count once). EASE^R learns the item-item matrix
``B`` that minimizes ``||X - X B||_F^2 + l2 ||B||_F^2`` subject to ``diag(B) = 0``; its closed form is::

    G = X^T X + l2 * I,      P = G^-1,      B = -P / diag(P)  (column j divided by P_jj),   diag(B) = 0

and a user's scores are ``x B``, the sum of ``B``'s rows of its items. There is no training loop and no
epoch: one ``n_items x n_items`` inverse (Cholesky factor and inverse by LAPACK, in place), so the cost is
about ``n_items^3`` flops and the memory ``n_items^2`` numbers: it suits catalogues up to some tens of
thousands of items, and :meth:`EASE.fit` refuses, saying what it would need, when the matrix would not fit
in memory. Steck's ``l2`` for binary data is 500 (ML-20M, Netflix); smaller data sets want less.

Serving and evaluation score through :class:`rec_engine.item_item.ItemItemScorer` (the core's embedding
bag over ``B`` stored as a table, then top-k), so training's metrics are what the bundle gives.
"""
from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp

from rec_engine import EmbeddingTable, IdLists
from rec_engine.item_item import ItemItemScorer

from ..data.containers import Interactions

DTYPES = ("float64", "float32")


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable`` on Linux), None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def memory_needed(n_items: int, dtype: str = "float64") -> int:
    """Peak bytes of :meth:`EASE.fit` for ``n_items`` items: the ``dtype`` Gram matrix inverted in place,
    plus its float32 copy when ``dtype`` is float64."""
    n2 = int(n_items) ** 2
    return n2 * (8 + 4) if dtype == "float64" else n2 * 4


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class EASE:
    """EASE^R, fitted in closed form.

    Parameters
    ----------
    l2 : float  the L2 weight ``lambda`` (> 0); Steck: 500 on binary ML-20M / Netflix
    dtype : {"float64", "float32"}  precision of the inverse (float64: 12 bytes per matrix entry at the
        peak, float32: 4, a little less accurate)
    max_items : int, optional  refuse catalogues above this size (default: whatever fits the available memory)
    num_threads : int, optional  threads of the core's pooling when scoring

    Attributes (after :meth:`fit`)
    ------------------------------
    B : float32 [n_items, n_items]  the item-item matrix, zero diagonal
    train_lists : IdLists  each user's distinct train items, sorted
    item_counts : int64 [n_items]  train interactions per item (repeats counted)
    n_users, n_items : int
    """

    def __init__(self, l2: float = 500.0, *, dtype: str = "float64", max_items: int | None = None,
                 num_threads: int | None = None):
        if isinstance(l2, bool) or not isinstance(l2, (int, float, np.integer, np.floating)) \
                or not np.isfinite(l2) or l2 <= 0:
            raise ValueError(f"l2 must be a finite number > 0, got {l2!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, (int, np.integer))
                                      or max_items < 1):
            raise ValueError(f"max_items must be an integer >= 1, got {max_items!r}")
        self.l2, self.dtype, self.max_items, self.num_threads = float(l2), dtype, max_items, num_threads
        self.n_users = self.n_items = 0
        self._scorer: ItemItemScorer | None = None

    # ------------------------------------------------------------------------------------------ fit
    def check_size(self, n_items: int) -> None:
        """ValueError, saying what is needed, when ``n_items`` is above ``max_items`` or its matrix would not
        fit in the available memory."""
        need = memory_needed(n_items, self.dtype)
        what = (f"EASE needs a dense {n_items:,} x {n_items:,} item-item matrix: {_gib(need)} at the peak "
                f"({self.dtype} inverse{' + float32 copy' if self.dtype == 'float64' else ''})")
        if self.max_items is not None and n_items > self.max_items:
            raise ValueError(f"{what}; the catalogue has {n_items:,} items, above max_items={self.max_items:,}")
        avail = available_memory()
        if self.max_items is None and avail is not None and need > avail:
            hint = " (dtype=float32 needs a third of that)" if self.dtype == "float64" else ""
            raise ValueError(f"{what}, but only {_gib(avail)} of memory is available{hint}; use fewer items "
                             "(e.g. drop rare ones) or a model without an item-item matrix")

    def fit(self, train: Interactions) -> "EASE":
        """Compute ``B`` from ``train`` (see the module docstring)."""
        if not isinstance(train, Interactions):
            raise TypeError(f"train must be an Interactions, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train holds no interactions: EASE has nothing to fit")
        n_users, n_items = int(train.n_users), int(train.n_items)
        self.check_size(n_items)
        x = sp.csr_matrix((np.ones(len(train), np.float32), (train.users, train.items)), shape=(n_users, n_items))
        x.sum_duplicates()
        x.data[:] = 1.0
        x.sort_indices()
        self.train_lists = IdLists(x.indptr.astype(np.int64), x.indices.astype(np.int64))
        self.item_counts = train.item_counts()
        self.n_users, self.n_items = n_users, n_items
        self.B = ease_matrix(x, self.l2, self.dtype)
        self._scorer = ItemItemScorer(EmbeddingTable(self.B), self.train_lists, self.item_counts)
        return self

    # ------------------------------------------------------------------------------------------ scoring
    @property
    def scorer(self) -> ItemItemScorer:
        """The serving code's scorer over the fitted ``B`` (what an exported bundle answers with)."""
        if self._scorer is None:
            raise RuntimeError("EASE is not fitted: call fit(train) first")
        return self._scorer

    def scores(self, users) -> np.ndarray:
        """Scores of train users (by id) over all items: float32 ``[n_items]`` or ``[B, n_items]``."""
        u = np.asarray(users)
        out = self.scorer.scores(self.scorer.user_lists(u.reshape(-1)), num_threads=self.num_threads)
        return out[0] if u.ndim == 0 else out

    def fold_in(self, rows) -> np.ndarray:
        """Scores of users given by their item lists (no refit): float32 ``[B, n_items]``."""
        return self.scorer.scores(rows, num_threads=self.num_threads)

    def recommend(self, users, k: int = 20, exclude_seen: bool = True):
        """The ``k`` best items of train users (by id), best first; their train items left out unless
        ``exclude_seen`` is False. One id gives 1-D results, a batch 2-D (``TopK``)."""
        return self.scorer.recommend_users(users, k, exclude_seen=exclude_seen, num_threads=self.num_threads)


def ease_matrix(x: sp.spmatrix, l2: float, dtype: str = "float64") -> np.ndarray:
    """EASE^R's ``B`` (float32 ``[n_items, n_items]``, zero diagonal) of the binary matrix ``x`` (users x items).

    ``G = x^T x`` is formed by a sparse product (cost: the sum of the users' squared degrees) written into a
    dense ``dtype`` matrix, then ``G + l2 I`` is Cholesky-factored and inverted in place by LAPACK
    (``potrf`` / ``potri``), so only one ``n_items^2`` matrix of ``dtype`` is alive, plus the float32 result
    when ``dtype`` is float64."""
    from scipy.linalg import lapack

    x = sp.csr_matrix(x, dtype=np.float64 if dtype == "float64" else np.float32)
    n = x.shape[1]
    g = np.empty((n, n), dtype=dtype, order="F")
    _dense_gram(x, g)
    g[np.diag_indices(n)] += l2
    potrf, potri = (lapack.dpotrf, lapack.dpotri) if dtype == "float64" else (lapack.spotrf, lapack.spotri)
    c, info = potrf(g, lower=0, overwrite_a=1, clean=0)
    if info != 0:
        raise np.linalg.LinAlgError(f"X^T X + l2 I is not positive definite (potrf info {info}); raise l2")
    p, info = potri(c, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"inverting X^T X + l2 I failed (potri info {info})")
    # p holds P in its upper triangle (column-major): mirror it, a block of columns at a time
    block = 1024
    for s in range(0, n, block):
        e = min(s + block, n)
        p[e:, s:e] = p[s:e, e:].T
        tri = p[s:e, s:e]
        p[s:e, s:e] = np.triu(tri) + np.triu(tri, 1).T
    d = np.diag(p).copy()
    if not np.all(d > 0):
        raise np.linalg.LinAlgError("the inverse has a non-positive diagonal: raise l2")
    pc = p.T                                           # P is symmetric: its C-ordered view is P again
    out = pc if dtype == "float32" else np.empty((n, n), np.float32)
    for s in range(0, n, block):                       # B = -P / diag(P), column j divided by P_jj
        e = min(s + block, n)
        out[s:e] = pc[s:e] / -d[None, :]
    out[np.diag_indices(n)] = 0.0
    return out


def _dense_gram(x: sp.csr_matrix, g: np.ndarray) -> None:
    """``g[:] = x^T x`` for a sparse ``x``, through the sparse product in row blocks of ``x^T x``."""
    xt = x.T.tocsr()
    n = x.shape[1]
    block = max(1, (1 << 25) // max(n, 1))             # about 32M entries of x^T x per block
    for s in range(0, n, block):
        e = min(s + block, n)
        g[s:e] = (xt[s:e] @ x).toarray()
