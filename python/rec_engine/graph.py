"""Sparse graph propagation: the normalized user-item adjacency, SpMM and LightGCN propagation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from ._convert import as_count, as_float32, as_ids, threads_arg


@dataclass(frozen=True)
class CsrMatrix:
    """A CSR sparse matrix in the layout the core uses.

    Attributes
    ----------
    indptr : int64, shape (n_rows + 1,)
    indices : int32, shape (nnz,)  column ids, sorted within a row when built by this package
    data : float32, shape (nnz,)
    shape : (n_rows, n_cols)
    """

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    def __post_init__(self):
        n_rows, n_cols = (int(v) for v in self.shape)
        if n_rows < 0 or n_cols < 0:
            raise ValueError(f"shape must be non-negative, got {self.shape}")
        for name, dtype in (("indptr", np.int64), ("indices", np.int32), ("data", np.float32)):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous:
                raise TypeError(f"CsrMatrix.{name} must be a 1-D C-contiguous {np.dtype(dtype)} array "
                                "(use CsrMatrix.from_scipy to convert)")
        if self.indptr.shape[0] != n_rows + 1:
            raise ValueError(f"indptr has {self.indptr.shape[0]} entries for {n_rows} rows (needs n_rows + 1)")
        if self.indices.shape[0] != self.data.shape[0]:
            raise ValueError("indices and data must have the same length")
        object.__setattr__(self, "shape", (n_rows, n_cols))

    @property
    def nnz(self) -> int:
        return int(self.indices.shape[0])

    @classmethod
    def from_scipy(cls, m) -> "CsrMatrix":
        """Convert any SciPy sparse matrix or array (copies only what is not already int64/int32/float32)."""
        m = m.tocsr()
        n_rows, n_cols = (int(v) for v in m.shape)
        if n_cols > np.iinfo(np.int32).max:
            raise ValueError("matrices with more than 2**31 - 1 columns are not supported")
        return cls(np.ascontiguousarray(m.indptr, dtype=np.int64),
                   np.ascontiguousarray(m.indices, dtype=np.int32),
                   as_float32(m.data, "data"), (n_rows, n_cols))

    def to_scipy(self):
        """A ``scipy.sparse.csr_matrix`` sharing nothing with this one."""
        import scipy.sparse as sp
        return sp.csr_matrix((self.data.copy(), self.indices.copy(), self.indptr.copy()), shape=self.shape)

    def __matmul__(self, dense) -> np.ndarray:
        return spmm(self, dense)


def as_csr(a) -> CsrMatrix:
    """``a`` as a CsrMatrix: a CsrMatrix passes through, a SciPy sparse matrix is converted."""
    if isinstance(a, CsrMatrix):
        return a
    if hasattr(a, "tocsr"):
        return CsrMatrix.from_scipy(a)
    raise TypeError(f"expected a rec_engine.CsrMatrix or a scipy.sparse matrix, got {type(a).__name__}")


def normalized_adjacency(users, items, n_users: int | None = None, n_items: int | None = None, *,
                         num_threads: int | None = None) -> CsrMatrix:
    """The symmetric-normalized adjacency ``D^-1/2 A D^-1/2`` of a user-item bipartite graph.

    Parameters
    ----------
    users, items : array_like of int, shape (n,)
        The interactions (user ``users[i]`` with item ``items[i]``); repeats count once.
    n_users, n_items : int, optional
        Sizes of the id spaces; default ``max + 1`` of the ids given.

    Returns
    -------
    CsrMatrix of shape ``(n_users + n_items, n_users + n_items)``: node ``u`` is user ``u`` and node
    ``n_users + i`` is item ``i``; entry ``(u, n_users + i)`` is ``1 / sqrt(deg(u) * deg(i))``.
    """
    u = as_ids(users, "users")
    i = as_ids(items, "items")
    if u.shape != i.shape:
        raise ValueError(f"users and items must have the same length, got {u.shape[0]} and {i.shape[0]}")
    if u.dtype != i.dtype:
        u, i = u.astype(np.int64), i.astype(np.int64)
    nu = (int(u.max()) + 1 if u.size else 0) if n_users is None else as_count(n_users, "n_users")
    ni = (int(i.max()) + 1 if i.size else 0) if n_items is None else as_count(n_items, "n_items")
    indptr, indices, data = _core.normalized_adjacency(u, i, nu, ni, threads_arg(num_threads))
    return CsrMatrix(indptr, indices, data, (nu + ni, nu + ni))


def spmm(adj, dense, *, num_threads: int | None = None) -> np.ndarray:
    """``adj @ dense`` for a sparse ``adj`` (n_rows x n_cols) and dense float32 ``dense`` (n_cols x d).

    Returns float32 ``(n_rows, d)``. Parallel over rows; releases the GIL."""
    a = as_csr(adj)
    x = as_float32(dense, "dense", ndim=2)
    return _core.spmm(a.indptr, a.indices, a.data, a.shape[1], x, threads_arg(num_threads))


def propagate(adj, embeddings, n_layers: int = 3, layer_weights=None, *,
              num_threads: int | None = None) -> np.ndarray:
    """LightGCN propagation: ``sum_l w_l * adj^l @ embeddings`` for ``l = 0..n_layers``.

    Parameters
    ----------
    adj : CsrMatrix or scipy.sparse matrix, square (n, n), usually from :func:`normalized_adjacency`
    embeddings : array_like, float32, shape (n, d)  layer-0 embeddings (users then items)
    n_layers : int  number of propagation steps K
    layer_weights : array_like of float, shape (K + 1,), optional
        Default: the mean of layers 0..K (every weight ``1 / (K + 1)``).

    Returns
    -------
    numpy.ndarray, float32, shape (n, d)
    """
    a = as_csr(adj)
    x = as_float32(embeddings, "embeddings", ndim=2)
    k = as_count(n_layers, "n_layers")
    if layer_weights is None:
        w = np.full(k + 1, 1.0 / (k + 1), dtype=np.float32)
    else:
        w = as_float32(layer_weights, "layer_weights", ndim=1)
        if w.shape[0] != k + 1:
            raise ValueError(f"layer_weights needs n_layers + 1 = {k + 1} entries, got {w.shape[0]}")
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"propagation needs a square adjacency, got shape {a.shape}")
    return _core.lightgcn_propagate(a.indptr, a.indices, a.data, x, w, threads_arg(num_threads))


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
    (a linear map, e.g. two :func:`spmm` calls), no power of it ever formed. Returns ``x`` itself when
    ``coeffs == [1]``."""
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
