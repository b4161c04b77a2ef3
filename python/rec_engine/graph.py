"""Sparse graph propagation: the normalized user-item adjacency, SpMM, LightGCN propagation and its fold-in
of one user (the serving side of a LightGCN bundle; training imports the same code)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _core
from ._convert import as_count, as_float32, as_ids, threads_arg
from .embedding import EmbeddingTable


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

    def transpose(self) -> "CsrMatrix":
        """The CSR of this matrix's transpose (each new row's ids ascending), sharing nothing with it."""
        n_rows, n_cols = self.shape
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(self.indptr))
        order = np.argsort(self.indices, kind="stable")
        indptr = np.zeros(n_cols + 1, np.int64)
        np.cumsum(np.bincount(self.indices, minlength=n_cols), out=indptr[1:])
        return CsrMatrix(indptr, rows[order].astype(np.int32), np.ascontiguousarray(self.data[order]), (n_cols, n_rows))


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


class LightGCNFoldIn:
    """LightGCN vectors of users from their items, the items' layers kept as trained: one row of
    :func:`propagate` over the graph where the user's edges are its given items.

    Layer ``k + 1`` of the user is ``sum_i e_i^k / sqrt(d_u d_i)`` over its distinct items ``i``, with
    ``e_i^k`` the item's layer ``k`` in the trained graph, ``d_u`` the number of items and ``d_i`` the
    item's degree in the trained graph plus one when ``i`` is a new edge of the user; the vector is
    ``sum_k w_k e_u^k`` with ``e_u^0`` the user's trained layer-0 embedding (zero for a user the model does
    not know). A train user given exactly its train items gets its trained vector.

    Parameters
    ----------
    adj : CsrMatrix  the normalized adjacency the model was trained with (:func:`normalized_adjacency`:
        users ``0 .. n_users - 1``, then items)
    users_ego : EmbeddingTable or float32 array [n_users, d]  layer-0 user embeddings
    items_ego : EmbeddingTable or float32 array [n_items, d]  layer-0 item embeddings
    n_layers : int  K
    layer_weights : K + 1 floats, optional  default: the mean of layers 0..K
    num_threads : int, optional  threads of the set-up propagation

    Notes
    -----
    Building it propagates the whole graph ``K - 1`` times (the items' layers ``0 .. K-1``, kept side by side
    as one ``[n_items, K * d]`` table); each vector is then one pooling over the user's items. Methods only
    read; they may be called from many threads at once.
    """

    def __init__(self, adj: CsrMatrix, users_ego, items_ego, n_layers: int, layer_weights=None, *,
                 num_threads: int | None = None):
        self.users_ego = users_ego if isinstance(users_ego, EmbeddingTable) else EmbeddingTable(users_ego)
        items = items_ego.to_numpy() if isinstance(items_ego, EmbeddingTable) else as_float32(items_ego, "items_ego")
        self.n_users, self.n_items = self.users_ego.rows, items.shape[0]
        self.dim = self.users_ego.dim
        k = as_count(n_layers, "n_layers")
        if adj.shape != (self.n_users + self.n_items,) * 2 or items.shape[1] != self.dim:
            raise ValueError(f"adj {adj.shape}, users_ego {self.users_ego.shape} and items_ego {items.shape} do not "
                             "describe one graph (adj is (n_users + n_items) square, users first)")
        w = np.full(k + 1, 1.0 / (k + 1)) if layer_weights is None else np.asarray(layer_weights, np.float64)
        if w.shape != (k + 1,):
            raise ValueError(f"layer_weights needs n_layers + 1 = {k + 1} entries, got {w.size}")
        self.layer_weights = w.astype(np.float32)
        self.adj = adj
        layers = [np.concatenate([self.users_ego.to_numpy(), items])]
        for _ in range(k - 1):
            layers.append(spmm(adj, layers[-1], num_threads=num_threads))
        self.item_layers = EmbeddingTable(np.ascontiguousarray(                   # [n_items, K * d]
            np.concatenate([lay[self.n_users:] for lay in layers[:k]], axis=1))) if k else None
        self.item_degrees = np.diff(adj.indptr)[self.n_users:].astype(np.float64)

    def user_vector(self, user: int, items) -> np.ndarray:
        """The vector (float32 [d]) of the user with dense id ``user`` (-1: a user the model does not know)
        whose items are ``items`` (train + new ones, repeats count once)."""
        items = np.unique(np.asarray(items, np.int64).reshape(-1))
        known = 0 <= user < self.n_users
        w = self.layer_weights
        e0 = self.users_ego.gather(np.array([user]))[0] if known else np.zeros(self.dim, np.float32)
        k = len(w) - 1
        if k == 0 or len(items) == 0:
            return (w[0] * e0).astype(np.float32)
        train = (self.adj.indices[self.adj.indptr[user]:self.adj.indptr[user + 1]] - self.n_users
                 if known else np.zeros(0, np.int64))
        d_i = self.item_degrees[items] + ~np.isin(items, train)
        weights = (1.0 / np.sqrt(len(items) * d_i)).astype(np.float32)
        hops = self.item_layers.pool(items, np.array([0, len(items)], np.int64), weights, mode="sum",
                                     include_last_offset=True).reshape(k, self.dim)
        return (w[0] * e0 + w[1:] @ hops).astype(np.float32)
