"""GF-CF / BSPM scoring: a fitted graph filter applied to users' item rows (Shen et al. 2021, Choi et al. 2023).

With ``R~ = D_u^-1/2 R D_i^-1/2`` the normalized train matrix (users x items) and ``P = R~^T R~``, the scores
of a user whose item row is ``r`` (1 x n_items, binary) are::

    s(r) = q(P) P r^T  +  alpha * items_lowrank (items_lowrank_query^T r^T)          (as a column)

with ``q`` the sharpening polynomial (:func:`sharpening_polynomial`; ``[1]``: plain GF-CF), ``items_lowrank_query
= D_i^-1/2 V`` and ``items_lowrank = q(P) D_i^1/2 V`` (``V`` the top right singular vectors of ``R~``, passed
through ``q`` once at fit). ``P`` is never formed: ``P x = R~^T (R~ x)``.

This is the scoring both sides run: serving scores one user at a time (:meth:`GraphFilter.user_scores`),
training scores and ranks blocks of users (:meth:`GraphFilter.linear_t`, :meth:`GraphFilter.scores_t`).
The fit (degrees, SVD) is training's: ``rec_engine_train.models.gfcf``.
"""
from __future__ import annotations

import numpy as np

from .embedding import EmbeddingTable
from .graph import CsrMatrix, spmm

# float32 values of the [items, B] product held at once when the low-rank part is added to a block
_LOWRANK_CHUNK_FLOATS = 1 << 22


def sharpening_polynomial(t: float, steps: int = 1, solver: str = "euler") -> np.ndarray:
    """Coefficients (lowest power first, float64) of the polynomial ``q`` with ``x(t) = q(P) x(0)`` for
    ``steps`` equal steps of ``solver`` on BSPM's sharpening ODE ``dx/dt = -P x`` over time ``t``.

    For this linear ODE one Euler step of size ``h`` is ``I - hP`` and one classical Runge-Kutta step
    is the 4th-order Taylor polynomial of ``exp(-hP)``; ``steps`` steps are its ``steps``-th power.
    ``t = 0`` gives ``[1.0]`` (no sharpening).

    Raises
    ------
    ValueError  ``t`` negative or not finite, ``steps < 1``, an unknown ``solver`` ("euler" or "rk4").
    """
    if not np.isfinite(t) or t < 0:
        raise ValueError(f"sharpening time must be a finite number >= 0, got {t}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if solver not in ("euler", "rk4"):
        raise ValueError(f"solver must be 'euler' or 'rk4', got {solver!r}")
    if t == 0:
        return np.ones(1)
    h = float(t) / int(steps)
    step = [1.0, -h] if solver == "euler" else [1.0, -h, h ** 2 / 2, -h ** 3 / 6, h ** 4 / 24]
    poly = np.ones(1)
    for _ in range(int(steps)):
        poly = np.polynomial.polynomial.polymul(poly, step)
    return poly


def apply_polynomial(coeffs, operator, x: np.ndarray) -> np.ndarray:
    """``sum_j coeffs[j] * operator^j (x)`` by Horner's rule: ``len(coeffs) - 1`` calls of ``operator``
    (a linear map, e.g. two :func:`~rec_engine.spmm` calls), no power of it ever formed. Returns ``x``
    itself when ``coeffs == [1]``."""
    c = np.asarray(coeffs, dtype=np.float64).reshape(-1)
    if c.size == 0:
        raise ValueError("coeffs must hold at least one coefficient")
    if c.size == 1 and c[0] == 1.0:
        return x
    y = c[-1] * x
    for cj in c[-2::-1]:
        y = operator(y)
        y += cj * x
    return y


def sharpen(coeffs, norm: CsrMatrix, norm_t: CsrMatrix, x_t: np.ndarray, *,
            num_threads: int | None = None) -> np.ndarray:
    """``q(P) x_t`` for a block ``x_t`` [n_items, B] (``q``: ``coeffs``, lowest power first), ``P x = R~^T (R~ x)``
    by two core SpMMs per degree of ``q``: float32 C-contiguous [n_items, B] (``x_t`` itself when ``q = [1]``
    and ``x_t`` is already float32 C-contiguous). Training applies it once at fit to the low-rank item
    factor."""
    def apply_p(v: np.ndarray) -> np.ndarray:
        return spmm(norm_t, spmm(norm, v, num_threads=num_threads), num_threads=num_threads)
    return np.ascontiguousarray(apply_polynomial(coeffs, apply_p, x_t), dtype=np.float32)


def _row_entries(m: CsrMatrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in ``m.indices`` / ``m.data`` of the entries of ``rows``, row after row; each row's entry
    count): int64 [n], int64 [len(rows)]."""
    starts = m.indptr[rows]
    lengths = m.indptr[rows + 1] - starts
    pos = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(int(lengths.sum()))
    return pos, lengths


def _weighted_rows(m: CsrMatrix, rows: np.ndarray, weights: np.ndarray, size: int) -> np.ndarray:
    """``sum_j weights[j] * m[rows[j]]`` as a dense float64 vector of ``size``."""
    pos, lengths = _row_entries(m, rows)
    return np.bincount(m.indices[pos], weights=m.data[pos] * np.repeat(weights, lengths), minlength=size)


class GraphFilter:
    """The filter of a fitted GF-CF / BSPM model (the maths in the module docstring).

    Parameters
    ----------
    norm : CsrMatrix  ``R~``, float32 (n_users x n_items)
    items_lowrank_query : EmbeddingTable or float32 array [n_items, k]  ``D_i^-1/2 V``
    items_lowrank : float32 array [n_items, k]  ``q(P) D_i^1/2 V``
    alpha : float  weight of the low-rank part
    sharpen_poly : sequence of float  ``q``'s coefficients, lowest power first (``[1]``: no sharpening)
    norm_t : CsrMatrix, optional  ``R~^T`` (default: built from ``norm``)
    num_threads : int, optional  threads of the core's products (None: the core's default)

    Notes
    -----
    Methods only read the matrices; they may be called from many threads at once.
    """

    def __init__(self, norm: CsrMatrix, items_lowrank_query, items_lowrank: np.ndarray, alpha: float,
                 sharpen_poly=(1.0,), *, norm_t: CsrMatrix | None = None, num_threads: int | None = None):
        self.n_users, self.n_items = norm.shape
        self.norm = norm
        self.norm_t = norm.transpose() if norm_t is None else norm_t
        if self.norm_t.shape != (self.n_items, self.n_users):
            raise ValueError(f"norm_t has shape {self.norm_t.shape}, the transpose of norm {norm.shape}")
        self.query = (items_lowrank_query if isinstance(items_lowrank_query, EmbeddingTable)
                      else EmbeddingTable(items_lowrank_query))
        self.items_lowrank = np.ascontiguousarray(items_lowrank, dtype=np.float32)
        if self.query.shape != self.items_lowrank.shape or self.query.rows != self.n_items:
            raise ValueError(f"items_lowrank_query {self.query.shape} and items_lowrank {self.items_lowrank.shape} "
                             f"must both be [n_items = {self.n_items}, k]")
        self.alpha = float(alpha)
        self.sharpen_poly = np.asarray(sharpen_poly, np.float64)
        if self.sharpen_poly.ndim != 1 or self.sharpen_poly.size == 0 or not np.isfinite(self.sharpen_poly).all():
            raise ValueError("sharpen_poly must be a non-empty list of finite numbers")
        if not np.isfinite(self.alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        self.num_threads = num_threads
        self._query_dense = None

    @property
    def rank(self) -> int:
        """``k``, the columns of the low-rank factors."""
        return self.query.dim

    # ------------------------------------------------------------------------------------------ one user
    def user_scores(self, items) -> np.ndarray:
        """Scores of every item for one user whose items are ``items`` (repeats count once): float32
        ``[n_items]``. IndexError for an id outside ``[0, n_items)``.

        ``R~ r^T`` and ``R~^T y`` touch only the rows of the user's items and of the users sharing them (a
        few thousand multiply-adds, summed in float64); the sharpening applies ``P`` to the item vector
        once per degree of ``q``; the low-rank part is one pooling of ``items_lowrank_query`` and one pass
        over ``items_lowrank``."""
        items = np.unique(np.asarray(items, np.int64).reshape(-1))
        if items.size and (items[0] < 0 or items[-1] >= self.n_items):
            bad = items[0] if items[0] < 0 else items[-1]
            raise IndexError(f"item id {int(bad)} is outside [0, {self.n_items})")
        y = _weighted_rows(self.norm_t, items, np.ones(len(items)), self.n_users)      # R~ r^T
        users = np.flatnonzero(y)
        lin = _weighted_rows(self.norm, users, y[users], self.n_items)                # R~^T y
        lin = apply_polynomial(self.sharpen_poly, self._apply_p_vector, lin)
        q = self.query.pool(items, np.array([0, len(items)], np.int64), mode="sum", include_last_offset=True)[0]
        return (lin + self.alpha * (self.items_lowrank @ q)).astype(np.float32)

    def _apply_p_vector(self, x: np.ndarray) -> np.ndarray:
        """``P x`` for a vector over items (float64 in and out, float32 products)."""
        return self.apply_p(x[:, None].astype(np.float32))[:, 0].astype(np.float64)

    # ------------------------------------------------------------------------------------------ blocks
    def apply_p(self, x_t: np.ndarray) -> np.ndarray:
        """``P x_t = R~^T (R~ x_t)`` for a float32 block ``x_t`` [n_items, B] (two core SpMMs): float32."""
        return spmm(self.norm_t, spmm(self.norm, x_t, num_threads=self.num_threads), num_threads=self.num_threads)

    def sharpen_t(self, x_t: np.ndarray) -> np.ndarray:
        """``q(P) x_t`` (float32 C-contiguous [n_items, B]; ``x_t`` itself without sharpening)."""
        return sharpen(self.sharpen_poly, self.norm, self.norm_t, x_t, num_threads=self.num_threads)

    def linear_t(self, rows: CsrMatrix) -> np.ndarray:
        """The linear part ``q(P) P r^T`` of the item rows ``rows`` (B x n_items, binary), transposed: float32
        C-contiguous [n_items, B].

        ``Y = R~ r^T`` is a sparse x sparse product (about 2,000 multiply-adds per Gowalla user: the
        degrees of the user's items), written into a dense [n_users, B] block; ``R~^T Y`` is one core SpMM
        (``nnz(R~) * B`` multiply-adds, parallel over item rows), the cheapest exact association (``P`` is
        dense; ``(r R~^T) R~`` as a sparse product makes a half-dense row per user)."""
        return self.sharpen_t(spmm(self.norm_t, self._norm_times_rows_t(rows), num_threads=self.num_threads))

    def _norm_times_rows_t(self, rows: CsrMatrix) -> np.ndarray:
        """``R~ r^T``: float32 [n_users, B]. Each value is summed in float32 in the order of its row's items
        (as SciPy's sparse product sums it)."""
        b = rows.shape[0]
        pos, lengths = _row_entries(self.norm_t, rows.indices)
        col = np.repeat(np.repeat(np.arange(b, dtype=np.int64), np.diff(rows.indptr)), lengths)
        y = np.zeros(self.n_users * b, np.float32)
        np.add.at(y, self.norm_t.indices[pos].astype(np.int64) * b + col,
                  self.norm_t.data[pos] * np.repeat(rows.data, lengths))
        return y.reshape(self.n_users, b)

    def user_factors(self, rows: CsrMatrix) -> np.ndarray:
        """``r @ items_lowrank_query`` of the item rows ``rows`` (B x n_items): float32 [B, k] (alpha not
        applied)."""
        if self._query_dense is None:
            self._query_dense = (self.query.weights if self.query.dtype == "float32"
                                 else np.ascontiguousarray(self.query.to_numpy()))
        return spmm(rows, self._query_dense, num_threads=self.num_threads)

    def scores_t(self, rows: CsrMatrix) -> np.ndarray:
        """Scores of the item rows ``rows`` (B x n_items, binary), transposed: float32 C-contiguous
        [n_items, B] (a Fortran-ordered [B, n_items] block): :meth:`linear_t` plus the low-rank part,
        added in place a chunk of items at a time."""
        s_t = self.linear_t(rows)
        if self.rank and self.alpha != 0.0:
            q_t = np.ascontiguousarray(self.user_factors(rows).T)                  # [k, B]
            step = max(1, _LOWRANK_CHUNK_FLOATS // max(1, rows.shape[0]))
            for start in range(0, self.n_items, step):
                part = self.items_lowrank[start:start + step] @ q_t
                part *= self.alpha
                s_t[start:start + step] += part
        return s_t
