"""GF-CF: a training-free graph filter on the normalized item-item graph (Shen et al. 2021), computed with
the core's sparse products, with an optional BSPM-style sharpening step (Choi et al. 2023).

Method
------
``R`` is the binary train matrix (users x items, repeats count once) and ``R~ = D_u^-1/2 R D_i^-1/2`` its
normalization (``D_u``, ``D_i`` the user and item degrees). The scores of a user whose interactions are the
binary row ``r`` (1 x n_items) are::

    s = r P  +  alpha * r D_i^-1/2 V V^T D_i^1/2,        P = R~^T R~

with ``V`` the top ``k_ideal`` right singular vectors of ``R~`` (the ideal low-pass filter). GF-CF uses
``alpha = 0.3``, ``k_ideal = 256``. With ``sharpen > 0`` the scores then follow BSPM's sharpening ODE
``ds/dt = -s P`` over time ``sharpen`` ("early merge": the low-pass part is sharpened too), solved by
``sharpen_steps`` steps of ``sharpen_solver``: for this linear ODE that is ``s' = s q(P)`` with ``q`` a
polynomial (:func:`rec_engine.graph_filter.sharpening_polynomial`: one Euler step is ``I - tP``, one RK4 step the
4th-order Taylor polynomial of ``exp(-tP)``), applied by Horner's rule. ``sharpen = 0`` is plain GF-CF;
BSPM-EM's Gowalla setting is ``alpha = 0.2``, ``k_ideal = 448``, ``sharpen = 2.5``, one RK4 step.

How it is computed (never as a dense ``n_items x n_items`` matrix)
----------------------------------------------------------------
This module fits (degrees, normalization, SVD); the scoring is serving's
:class:`rec_engine.graph_filter.GraphFilter` (:attr:`GFCF.graph_filter`), so training evaluates exactly what
a bundle answers with. For a batch of ``B`` users the scores are built transposed, as an ``n_items x B``
block ``S^T``:

1. ``Y = R~ r_B^T`` (n_users x B): a sparse x sparse product (NumPy, into a dense block), since ``r_B``
   holds only the users' few items; it costs ``sum over the batch's items of their degree`` (about 2,000
   multiply-adds per Gowalla user). Doing it as a core SpMM over a dense ``r_B^T`` would cost
   ``nnz(R~) * B`` (800,000 per user), about twice the whole remaining work.
2. ``S^T = R~^T Y`` (n_items x B): :func:`rec_engine.spmm` with the CSR of ``R~^T`` built once at fit
   (``nnz(R~) * B`` multiply-adds, parallel over item rows). This is the cheapest exact association:
   ``r (R~^T R~)`` through ``P`` itself would need ``P`` (dense: 6.7 GB on Gowalla; sparse: tens of
   millions of entries, each touched per user), and ``(r R~^T) R~`` as sparse x sparse produces a
   half-dense row per user at SciPy's single-threaded speed (measured about 6x slower than step 2).
3. Ranking (:meth:`GFCF.recommend`) fuses the low-rank part, the exclusion and the selection into one
   :func:`rec_engine.topk` call per block of ``rank_batch`` users: the item vectors are
   ``[S_lin^T | D_i^1/2 V]`` (n_items x (b + k)) and the query of the batch's j-th user is
   ``[e_j | alpha * r D_i^-1/2 V]``, so the inner product is exactly ``S_lin[j, i] + alpha * (low-rank)``.
   The identity block costs ``b`` extra multiply-adds per item and user (b = 64 against k = 256), and in
   return the ``B x n_items`` scores are never transposed or scanned again: the core computes, excludes
   the train items and selects in one cache-blocked pass (ties: lower id first). Selecting from a dense
   score block instead (``torch.topk`` / ``np.argpartition`` over ``[B, n_items]``) measured 1.5x to 20x
   slower, mostly for the transpose of the ``n_items x B`` block.
4. :meth:`GFCF.scores` / :meth:`GFCF.fold_in` return the dense scores: the low-rank part is
   ``Q = r D_i^-1/2 V`` by :func:`rec_engine.spmm` over the batch's CSR rows, then
   ``S^T += alpha * (D_i^1/2 V) Q^T`` by BLAS, a chunk of items at a time.
5. Sharpening (``sharpen > 0``) applies ``P`` to ``S_lin^T`` once per degree of ``q`` (two core SpMMs
   each: once for Euler, four times for one RK4 step); its effect on the low-rank part is folded into
   the item factor once at fit: ``q(P) D_i^1/2 V``.

The SVD is a randomized SVD (Halko, Martinsson & Tropp 2011) with ``oversample`` extra columns and
``n_iter`` subspace (power) iterations whose products with ``R~`` and ``R~^T`` run through
:func:`rec_engine.spmm`; ``svd="exact"`` (dense LAPACK, small graphs only) and ``svd="scipy"``
(:func:`scipy.sparse.linalg.svds`) are the references. On Gowalla the randomized SVD with 4 iterations takes
a few seconds where ``svds(k=256)`` takes tens of seconds; Recall@20 is 0.1867 with it against
0.1849 with ARPACK's vectors (the subspace differs only among near-equal singular values at the cut).

Folding in
----------
The method has no trained user vector: a user's scores are a fixed linear map ``G`` of its row ``r``.
:meth:`GFCF.fold_in` applies the fitted ``G`` to any new row, so serving can score fresh interactions at
once. What is exactly equal: ``fold_in(row of u) == scores(u)``; and the linear part of ``fold_in(r)`` is
``r D_i^-1/2 R^T D_u^-1 R D_i^-1/2`` with the *fitted* degrees. A model refitted with ``r`` as a user's row
has different degrees (each item of ``r`` gains or loses that user), so its scores differ from the
fold-in ones by exactly that change of normalization (and of ``V``).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.linalg import solve_triangular

import rec_engine
from rec_engine import CsrMatrix, IdLists, TopK
from rec_engine.graph_filter import GraphFilter, sharpen, sharpening_polynomial

from ..data.containers import Interactions
from ..evaluate import take_lists

SVD_METHODS = ("randomized", "exact", "scipy")


class GFCF:
    """GF-CF graph filter (training-free), optionally with a BSPM sharpening step.

    Parameters
    ----------
    alpha : float
        Weight of the ideal low-pass part (GF-CF: 0.3).
    k_ideal : int
        Singular vectors in the ideal low-pass filter (GF-CF: 256); 0 disables that part.
    sharpen : float
        BSPM sharpening time (0: plain GF-CF).
    sharpen_solver : {"euler", "rk4"}
    sharpen_steps : int
        Steps of the solver over the sharpening time.
    svd : {"randomized", "exact", "scipy"}
    n_iter, oversample : int
        Randomized SVD: subspace iterations and extra columns.
    batch_size : int
        Users per block in :meth:`scores` / :meth:`fold_in` (memory ~ ``4 * (n_users + n_items) * batch_size``
        bytes).
    rank_batch : int
        Users per block in :meth:`recommend` (one :func:`rec_engine.topk` call each; its item matrix has
        ``rank_batch + k_ideal`` columns).
    seed : int
        Seed of the randomized SVD's test matrix.
    num_threads : int, optional
        Threads of the core's products (default: OpenMP's).
    """

    def __init__(self, alpha: float = 0.3, k_ideal: int = 256, *, sharpen: float = 0.0,
                 sharpen_solver: str = "euler", sharpen_steps: int = 1, svd: str = "randomized",
                 n_iter: int = 4, oversample: int = 64, batch_size: int = 1024, rank_batch: int = 64,
                 seed: int = 0,
                 num_threads: int | None = None):
        if not np.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if not np.isfinite(sharpen) or sharpen < 0:
            raise ValueError(f"sharpen must be a finite number >= 0, got {sharpen}")
        for name, v, low in (("k_ideal", k_ideal, 0), ("n_iter", n_iter, 0), ("oversample", oversample, 0),
                             ("batch_size", batch_size, 1), ("rank_batch", rank_batch, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {svd!r}")
        self.alpha, self.k_ideal, self.sharpen = float(alpha), int(k_ideal), float(sharpen)
        self.sharpen_poly = sharpening_polynomial(self.sharpen, sharpen_steps, sharpen_solver)
        self.sharpen_solver, self.sharpen_steps = sharpen_solver, int(sharpen_steps)
        self.svd, self.n_iter, self.oversample = svd, int(n_iter), int(oversample)
        self.batch_size, self.rank_batch = int(batch_size), int(rank_batch)
        self.seed, self.num_threads = int(seed), num_threads
        self.n_users = self.n_items = 0
        self._fitted = False

    # ------------------------------------------------------------------------------------------ fit
    def fit(self, train: Interactions) -> "GFCF":
        """Build ``R~``, its transpose, the item degrees and the low-pass factors from ``train``.

        Attributes set
        --------------
        norm : CsrMatrix  ``R~``, float32 (n_users x n_items)
        norm_t : CsrMatrix  ``R~^T`` (n_items x n_users)
        train_lists : IdLists  each user's distinct train items, sorted
        item_degree, user_degree : int64 [n_items], [n_users]  distinct users / items
        item_counts : int64 [n_items]  train interactions per item (repeats counted)
        v_left, v_right : float32 [n_items, k]  ``D_i^-1/2 V`` and ``D_i^1/2 V`` (items without
            interactions get 0 rows)
        singular_values : float64 [k]
        """
        if not isinstance(train, Interactions):
            raise TypeError(f"train must be an Interactions, got {type(train).__name__}")
        if len(train) == 0:
            raise ValueError("train holds no interactions: GF-CF has nothing to filter")
        n_users, n_items = int(train.n_users), int(train.n_items)
        r = sp.csr_matrix((np.ones(len(train), np.float32), (train.users, train.items)), shape=(n_users, n_items))
        r.sum_duplicates()
        r.data[:] = 1.0
        r.sort_indices()
        du = np.diff(r.indptr).astype(np.int64)
        di = np.bincount(r.indices, minlength=n_items).astype(np.int64)
        inv_u = _inv_sqrt(du)
        self._inv_i = _inv_sqrt(di)
        norm = r.multiply(inv_u[:, None]).multiply(self._inv_i[None, :]).tocsr().astype(np.float32)
        norm.sort_indices()
        self.norm = CsrMatrix.from_scipy(norm)
        self.norm_t = self.norm.transpose()
        self.train_lists = IdLists(r.indptr.astype(np.int64), r.indices.astype(np.int64))
        self.user_degree, self.item_degree = du, di
        self.item_counts = train.item_counts()
        self.n_users, self.n_items = n_users, n_items
        k = min(self.k_ideal, n_users, n_items)
        if self.k_ideal > 0 and k < self.k_ideal:
            raise ValueError(f"k_ideal={self.k_ideal} exceeds the rank bound min(n_users, n_items) = {k}")
        if k > 0:
            s, v = self._top_right_singular(norm, k)
        else:
            s, v = np.zeros(0), np.zeros((n_items, 0))
        self.singular_values = s
        self.v_left = np.ascontiguousarray(v * self._inv_i[:, None], dtype=np.float32)
        # the low-rank part through the sharpening, once: q(P) D^1/2 V
        self.v_right = sharpen(self.sharpen_poly, self.norm, self.norm_t,
                               np.ascontiguousarray(v * np.sqrt(di)[:, None], dtype=np.float32),
                               num_threads=self.num_threads)
        self._fitted = True
        return self

    def _top_right_singular(self, norm: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` largest singular values (float64 [k], descending) and right singular vectors
        (float64 [n_items, k]) of ``norm``."""
        if self.svd == "exact":
            _, s, vt = np.linalg.svd(norm.toarray().astype(np.float64), full_matrices=False)
            return s[:k], vt[:k].T
        if self.svd == "scipy":
            from scipy.sparse.linalg import svds
            _, s, vt = svds(norm.astype(np.float64), k=k, random_state=self.seed)
            order = np.argsort(-s)
            return s[order], vt[order].T
        n_items = norm.shape[1]
        width = min(k + self.oversample, min(norm.shape))
        rng = np.random.default_rng(self.seed)
        omega = rng.standard_normal((n_items, width)).astype(np.float32)
        q = _orthonormal(self._spmm(self.norm, omega))                  # range of R~ Omega
        for _ in range(self.n_iter):
            z = _orthonormal(self._spmm(self.norm_t, q))
            q = _orthonormal(self._spmm(self.norm, z))
        bt = self._spmm(self.norm_t, q).astype(np.float64)               # (Q^T R~)^T, n_items x width
        # right singular vectors of Q^T R~ from the eigenvectors of its small Gram matrix (width x width)
        evals, evecs = np.linalg.eigh(bt.T @ bt)
        top = np.argsort(-evals)[:k]
        s = np.sqrt(np.maximum(evals[top], 0.0))
        if s[-1] <= 0:
            raise ValueError(f"R~ has rank below k_ideal={k}: lower k_ideal")
        return s, (bt @ evecs[:, top]) / s

    def _spmm(self, a: CsrMatrix, x: np.ndarray) -> np.ndarray:
        return rec_engine.spmm(a, np.ascontiguousarray(x, dtype=np.float32), num_threads=self.num_threads)

    # ------------------------------------------------------------------------------------------ scoring
    @property
    def graph_filter(self) -> GraphFilter:
        """The serving code's filter (:class:`rec_engine.graph_filter.GraphFilter`) over the fitted
        matrices: what an exported bundle answers with (built on each access; it holds no copies)."""
        self._check_fitted()
        return GraphFilter(self.norm, self.v_left, self.v_right, self.alpha, self.sharpen_poly,
                           norm_t=self.norm_t, num_threads=self.num_threads)

    def _check_users(self, users) -> tuple[np.ndarray, bool]:
        self._check_fitted()
        u = np.asarray(users)
        if u.dtype.kind not in "iu" or u.ndim > 1:
            raise TypeError(f"users must be an integer id or a 1-D array of them, got dtype {u.dtype} and shape {u.shape}")
        single = u.ndim == 0
        u = u.reshape(-1).astype(np.int64)
        bad = np.flatnonzero((u < 0) | (u >= self.n_users))
        if bad.size:
            raise IndexError(f"user id {int(u[bad[0]])} at position {int(bad[0])} is outside [0, {self.n_users})")
        return u, single

    def _user_rows(self, u: np.ndarray) -> sp.csr_matrix:
        return _binary_rows(self.train_lists, u, self.n_items)

    def scores(self, users) -> np.ndarray:
        """GF-CF scores of train users over all items (train items included).

        Parameters
        ----------
        users : int or int array, shape (B,)

        Returns
        -------
        float32 ``[n_items]`` for one user, ``[B, n_items]`` (C-contiguous) for a batch.
        """
        u, single = self._check_users(users)
        out = self._blocks(self._user_rows(u))
        return out[0] if single else out

    def fold_in(self, rows) -> np.ndarray:
        """Scores of users given by their interaction rows, through the fitted filter (no refit).

        Parameters
        ----------
        rows : IdLists, or a sequence of B arrays of item ids (repeats count once), or one 1-D array
            (one user; 1-D result)

        Returns
        -------
        float32 ``[B, n_items]`` (``[n_items]`` for one 1-D array).

        Raises
        ------
        IndexError  an item id outside ``[0, n_items)``.
        """
        self._check_fitted()
        single = isinstance(rows, np.ndarray) and rows.ndim == 1
        lists = rows if isinstance(rows, IdLists) else IdLists.from_lists([rows] if single else list(rows))
        if lists.ids.size and (lists.ids.min() < 0 or lists.ids.max() >= self.n_items):
            bad = int(np.flatnonzero((lists.ids < 0) | (lists.ids >= self.n_items))[0])
            raise IndexError(f"item id {int(lists.ids[bad])} (entry {bad}) is outside [0, {self.n_items})")
        out = self._blocks(_binary_rows(lists, np.arange(len(lists)), self.n_items))
        return out[0] if single else out

    def _blocks(self, rows: sp.csr_matrix) -> np.ndarray:
        f = self.graph_filter
        out = np.empty((rows.shape[0], self.n_items), np.float32)
        for start in range(0, rows.shape[0], self.batch_size):
            block = rows[start:start + self.batch_size]
            out[start:start + block.shape[0]] = f.scores_t(CsrMatrix.from_scipy(block)).T
        return out

    def recommend(self, users, k: int = 20, exclude="train") -> TopK:
        """The ``k`` best items of each user, best first.

        Parameters
        ----------
        users : int or int array, shape (B,)
        k : int
        exclude : "train" (each user's train items), None, or an IdLists / sequence of B id arrays

        Returns
        -------
        TopK(ids int64, scores float32) of shape ``(width,)`` or ``(B, width)``, ``width = min(k, n_items)``;
        slots without an eligible item hold id -1 and score -inf.
        """
        u, single = self._check_users(users)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        if isinstance(exclude, str):
            if exclude != "train":
                raise ValueError(f"exclude must be 'train', None or id lists, got {exclude!r}")
            ex, ex_rows = self.train_lists, u
        elif exclude is None:
            ex, ex_rows = None, None
        else:
            ex = exclude if isinstance(exclude, IdLists) else IdLists.from_lists([exclude] if single else list(exclude))
            if len(ex) != u.size:
                raise ValueError(f"exclude has {len(ex)} lists for {u.size} users")
            if ex.ids.size and (ex.ids.min() < 0 or ex.ids.max() >= self.n_items):
                raise IndexError(f"exclude holds an item id outside [0, {self.n_items})")
            ex_rows = np.arange(u.size)
        width = min(int(k), self.n_items)
        f = self.graph_filter
        rows = self._user_rows(u)
        b = min(self.rank_batch, max(u.size, 1))
        n_low = self.v_right.shape[1] if self.alpha != 0.0 else 0
        # items [n_items, b + k]: the batch's linear scores in the first b columns, D^1/2 V after them;
        # queries [B, b + k]: the identity (picks a user's own column) then alpha * r D^-1/2 V.
        items = np.zeros((self.n_items, b + n_low), np.float32)
        items[:, b:] = self.v_right[:, :n_low]
        ids, vals = [], []
        for start in range(0, u.size, b):
            stop = min(start + b, u.size)
            block = CsrMatrix.from_scipy(rows[start:stop])
            items[:, :stop - start] = f.linear_t(block)
            queries = np.zeros((stop - start, b + n_low), np.float32)
            queries[:, :stop - start] = np.eye(stop - start, dtype=np.float32)
            if n_low:
                queries[:, b:] = self.alpha * f.user_factors(block)
            excl = None if ex is None else take_lists(ex, ex_rows[start:stop])
            top = rec_engine.topk(queries, items, width, exclude=excl, num_threads=self.num_threads)
            ids.append(top.ids)
            vals.append(top.scores)
        ids = np.concatenate(ids) if ids else np.zeros((0, width), np.int64)
        vals = np.concatenate(vals) if vals else np.zeros((0, width), np.float32)
        return TopK(ids[0], vals[0]) if single else TopK(ids, vals)

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("GFCF is not fitted: call fit(train) first")


# ---------------------------------------------------------------------------------------------- helpers
def _inv_sqrt(deg: np.ndarray) -> np.ndarray:
    """``deg ** -0.5`` (float64), 0 where the degree is 0."""
    out = np.zeros(deg.shape, np.float64)
    nz = deg > 0
    out[nz] = 1.0 / np.sqrt(deg[nz])
    return out


def _orthonormal(x: np.ndarray) -> np.ndarray:
    """An orthonormal basis (float32, C-contiguous) of the columns of ``x`` [n, m], n >= m.

    CholeskyQR2 in float64 (two rounds of ``x R^-1`` with ``R`` the Cholesky factor of ``x^T x``): BLAS-3
    products instead of Householder QR, several times faster for tall blocks; falls back to Householder
    QR when the Gram matrix is numerically singular."""
    q = x.astype(np.float64)
    try:
        for _ in range(2):
            chol = np.linalg.cholesky(q.T @ q)
            q = solve_triangular(chol, q.T, lower=True).T
    except np.linalg.LinAlgError:
        q, _ = np.linalg.qr(x.astype(np.float64))
    return np.ascontiguousarray(q, dtype=np.float32)


def _list_entries(lists: IdLists, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position in ``rows``, item) of every entry of the lists of ``rows``: int64 [n], int64 [n]."""
    starts = lists.indptr[rows]
    lengths = lists.indptr[rows + 1] - starts
    offsets = np.cumsum(lengths) - lengths
    total = int(lengths.sum())
    pos = np.repeat(np.arange(rows.size, dtype=np.int64), lengths)
    gather = np.repeat(starts - offsets, lengths) + np.arange(total, dtype=np.int64)
    return pos, lists.ids[gather]


def _binary_rows(lists: IdLists, rows: np.ndarray, n_items: int) -> sp.csr_matrix:
    """The lists of ``rows`` as binary CSR rows (float32, B x n_items, repeats count once)."""
    pos, items = _list_entries(lists, rows)
    m = sp.csr_matrix((np.ones(pos.size, np.float32), (pos, items)), shape=(rows.size, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m

