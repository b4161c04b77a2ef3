"""Collaborative filtering over the user-item graph: MF, LightGCN and NGCF, trained with BPR.

All three score a user-item pair by the inner product of a user vector and an item vector, so serving
ranks them with the core's top-k. LightGCN and NGCF propagate over ``A_hat = D^-1/2 A D^-1/2`` of the
bipartite train graph; the adjacency is built by the core (:func:`rec_engine.normalized_adjacency`, node
``u`` is user ``u``, node ``n_users + i`` is item ``i``) and every propagation step in training runs
through the core's SpMM (:class:`CoreSpmm`), so training and serving multiply by the very same matrix.

References: Rendle et al. 2009 (BPR), He et al. 2020 (LightGCN), Wang et al. 2019 (NGCF).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import rec_engine
from rec_engine import CsrMatrix
from rec_engine.kinds import names

from ..data.containers import ImplicitSplit, Interactions
from ..evaluate import evaluate_retrieval
from ..loop import History, Progress, TrainConfig, batches, fit, seed_everything
from .layers import FastDropout

KINDS = names(family="graph", epochs=True)      # from the registry: mf, lightgcn, ngcf


# ----------------------------------------------------------------------------- graph
def graph_adjacency(train: Interactions, *, num_threads: int | None = None) -> CsrMatrix:
    """The core's ``D^-1/2 A D^-1/2`` of the train graph, checked to be symmetric.

    Returns
    -------
    CsrMatrix, square ``(n_users + n_items)``; users first, then items.

    Raises
    ------
    RuntimeError
        The matrix is not symmetric (then :class:`CoreSpmm`'s backward, which multiplies by ``A_hat``
        instead of ``A_hat^T``, would be wrong).
    """
    adj = rec_engine.normalized_adjacency(train.users, train.items, train.n_users, train.n_items,
                                          num_threads=num_threads)
    n = adj.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(adj.indptr))
    cols = adj.indices.astype(np.int64)
    order = np.argsort(rows * n + cols, kind="stable")
    order_t = np.argsort(cols * n + rows, kind="stable")
    if not (np.array_equal(rows[order], cols[order_t]) and np.array_equal(cols[order], rows[order_t])
            and np.allclose(adj.data[order], adj.data[order_t], rtol=1e-6, atol=0.0)):
        raise RuntimeError("the normalized adjacency from the core is not symmetric")
    return adj


class EdgeDropout:
    """Drops each undirected edge of a symmetric adjacency (a train interaction: both of its entries) with
    probability ``p`` and scales the kept entries by ``1 / (1 - p)``: the NGCF authors' "node dropout" (which
    drops entries of the normalized adjacency), kept symmetric so that :class:`CoreSpmm` and
    :class:`CorePropagate` stay self-adjoint. A fresh graph every call of :meth:`sample`.

    Parameters
    ----------
    adj : CsrMatrix  symmetric (:func:`graph_adjacency`)
    p : float in [0, 1)
    seed : int  of the generator that picks the edges
    """

    def __init__(self, adj: CsrMatrix, p: float, seed: int):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"edge_dropout must be in [0, 1), got {p}")
        self.adj, self.p = adj, float(p)
        n = adj.shape[0]
        self.rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(adj.indptr))
        cols = adj.indices.astype(np.int64)
        _, self.edge = np.unique(np.minimum(self.rows, cols) * n + np.maximum(self.rows, cols), return_inverse=True)
        self.edge = self.edge.reshape(-1)
        self.n_edges = int(self.edge.max()) + 1 if self.edge.size else 0
        self.data = (adj.data / (1.0 - self.p)).astype(np.float32)
        self.rng = np.random.default_rng(seed)

    def sample(self) -> CsrMatrix:
        if self.p == 0.0:
            return self.adj
        keep = (self.rng.random(self.n_edges) >= self.p)[self.edge]
        indptr = np.zeros(self.adj.shape[0] + 1, np.int64)
        np.cumsum(np.bincount(self.rows[keep], minlength=self.adj.shape[0]), out=indptr[1:])
        return CsrMatrix(indptr, self.adj.indices[keep], self.data[keep], self.adj.shape)


class CoreSpmm(torch.autograd.Function):
    """``A_hat @ x`` through the core's SpMM, with the gradient ``A_hat^T @ grad = A_hat @ grad``.

    Only valid for a symmetric ``adj`` (as :func:`graph_adjacency` guarantees). ``x`` must be a float32
    CPU tensor of shape ``(n, d)``; the result is float32 ``(n, d)``.

    Call it as ``CoreSpmm.apply(x, adj, num_threads)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, adj: CsrMatrix, num_threads: int | None = None) -> torch.Tensor:
        ctx.adj, ctx.num_threads = adj, num_threads
        return _core_spmm(adj, x, num_threads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _core_spmm(ctx.adj, grad, ctx.num_threads), None, None


class CorePropagate(torch.autograd.Function):
    """LightGCN's whole propagation ``sum_k w_k A_hat^k x`` in one call of the core (the layer sum fused
    into the products). ``A_hat`` is symmetric, so the operator is self-adjoint and the gradient is the
    same propagation of ``grad``: three SpMMs forward and three backward, no intermediate layers kept.

    Call it as ``CorePropagate.apply(x, adj, layer_weights, num_threads)``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, adj: CsrMatrix, layer_weights: list[float],
                num_threads: int | None = None) -> torch.Tensor:
        ctx.adj, ctx.layer_weights, ctx.num_threads = adj, layer_weights, num_threads
        return _core_propagate(adj, x, layer_weights, num_threads)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _core_propagate(ctx.adj, grad, ctx.layer_weights, ctx.num_threads), None, None, None


def _core_propagate(adj: CsrMatrix, x: torch.Tensor, layer_weights: list[float],
                    num_threads: int | None) -> torch.Tensor:
    out = rec_engine.propagate(adj, _float32_numpy(x, "CorePropagate"), len(layer_weights) - 1,
                               np.asarray(layer_weights, np.float32), num_threads=num_threads)
    return torch.from_numpy(out)


class GatherRows(torch.autograd.Function):
    """``table[index]`` for a 1-D int64 ``index``, with the backward pass a plain ``index_add_`` (torch's
    own backward of indexing, an accumulating ``index_put_``, is several times slower on the CPU).

    Call it as ``GatherRows.apply(table, index)``.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.shape = table.shape
        return torch.index_select(table, 0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        return grad.new_zeros(ctx.shape).index_add_(0, index, grad), None


def _core_spmm(adj: CsrMatrix, x: torch.Tensor, num_threads: int | None) -> torch.Tensor:
    return torch.from_numpy(rec_engine.spmm(adj, _float32_numpy(x, "CoreSpmm"), num_threads=num_threads))


def _float32_numpy(x: torch.Tensor, who: str) -> np.ndarray:
    """The core's view of ``x`` (no copy when it is already a contiguous float32 CPU tensor)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError(f"{who} needs a float32 CPU tensor, got {x.dtype} on {x.device}")
    return x.detach().contiguous().numpy()


# ----------------------------------------------------------------------------- models
class _BprModel(nn.Module):
    """What the trainer and the exporter need of a model: ``kind``, sizes, ``ego()`` (layer-0 user and
    item embeddings) and ``propagate()`` (the final user and item vectors that are scored by dot)."""

    kind = ""

    def __init__(self, n_users: int, n_items: int, n_layers: int, params: dict):
        super().__init__()
        self.n_users, self.n_items, self.n_layers = int(n_users), int(n_items), int(n_layers)
        self.params = dict(params)
        self.layer_weights: list[float] | None = None

    def ego(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def propagate(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def bpr_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg: float,
                 candidates: int = 1) -> torch.Tensor:
        """Mean BPR loss ``-log sigmoid(s(u, pos) - s(u, neg))`` plus ``reg`` times the LightGCN-style L2
        term ``(|e_u|^2 + |e_pos|^2 + |e_neg|^2) / 2 / batch`` on the batch's ego embeddings.

        ``neg`` is ``[B]`` or ``[B, k]``: with ``k`` negatives per (user, positive) pair the loss is that
        of the ``B * k`` triples (each pair repeated with each of its negatives), the L2 term included.
        With ``candidates = c > 1``, ``neg`` holds ``k * c`` columns, ``k`` groups of ``c`` candidates, and
        each group's negative is its candidate the model currently scores highest for the user (dynamic
        negative sampling, Zhang et al. 2013; chosen without gradient)."""
        users, pos, neg, k = _triples(users, pos, neg)
        user_vecs, item_vecs = self.propagate()
        if candidates > 1:
            neg = _hardest([user_vecs.detach()], [item_vecs.detach()], users, neg, candidates)
            k //= candidates
        b, neg = users.shape[0], neg.reshape(-1)
        u, p = GatherRows.apply(user_vecs, users), GatherRows.apply(item_vecs, pos)
        n = GatherRows.apply(item_vecs, neg).reshape(b, k, -1)
        loss = -F.logsigmoid((u * p).sum(1, keepdim=True) - torch.bmm(n, u.unsqueeze(2)).squeeze(2)).mean()
        user_ego, item_ego = self.ego()
        l2 = (k * (GatherRows.apply(user_ego, users).pow(2).sum() + GatherRows.apply(item_ego, pos).pow(2).sum())
              + GatherRows.apply(item_ego, neg).pow(2).sum()) / 2
        return loss + reg * l2 / (b * k)


def _hardest(user_vecs: list[torch.Tensor], item_vecs: list[torch.Tensor], users: torch.Tensor,
             neg: torch.Tensor, candidates: int) -> torch.Tensor:
    """Of each group of ``candidates`` consecutive columns of ``neg`` [B, k * c], the item with the highest
    ``<user_vecs[user], item_vecs[item]>``: [B, k] (first of equal scores). ``user_vecs`` and ``item_vecs``
    are lists of tables whose column-wise concatenation is the vector (scores add up per table, so the
    concatenation is never built)."""
    b, width = neg.shape
    if width % candidates:
        raise ValueError(f"neg has {width} columns, not a multiple of candidates={candidates}")
    flat = neg.reshape(-1)
    with torch.no_grad():
        scores = sum(torch.bmm(torch.index_select(it, 0, flat).reshape(b, width, -1),
                               torch.index_select(ut, 0, users).unsqueeze(2))
                     for ut, it in zip(user_vecs, item_vecs))
        scores = scores.reshape(b, -1, candidates)
        return neg.reshape(b, -1, candidates).gather(2, scores.argmax(2, keepdim=True)).squeeze(2)


def _node_bpr_loss(model: "_BprModel", ego: torch.Tensor, tables: list[torch.Tensor], users: torch.Tensor,
                   pos: torch.Tensor, neg: torch.Tensor, reg: float, candidates: int) -> torch.Tensor:
    """:meth:`_BprModel.bpr_loss` for a model whose final vector of node ``v`` (users first, then items) is
    ``cat([t[v] for t in tables])`` and whose ego embeddings are the node table ``ego``.

    Users and items are gathered from each node table in one index (one scatter per table in the backward
    pass), the concatenation is built for the batch's rows only, and the L2 term comes from node counts."""
    users, pos, neg, k = _triples(users, pos, neg)
    nu = model.n_users
    if candidates > 1:
        fixed = [t.detach() for t in tables]
        neg = _hardest([t[:nu] for t in fixed], [t[nu:] for t in fixed], users, neg, candidates)
        k //= candidates
    b, n_nodes = users.shape[0], ego.shape[0]
    nodes = torch.cat([users, pos + nu, neg.reshape(-1) + nu])
    rows = [GatherRows.apply(t, nodes) for t in tables]
    u, p, n = (rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)).split([b, b, b * k])
    neg_scores = torch.bmm(n.reshape(b, k, -1), u.unsqueeze(2)).squeeze(2)                # [B, k]
    loss = -F.logsigmoid((u * p).sum(1, keepdim=True) - neg_scores).mean()
    # the L2 term sum over triples of |e|^2 / 2 is sum over nodes of count * |e_node|^2 / 2: one pass over
    # the table instead of a gather (and a scatter back) of all B * (2 + k) rows
    counts = torch.bincount(nodes[2 * b:], minlength=n_nodes).to(ego.dtype)
    counts += k * torch.bincount(nodes[:2 * b], minlength=n_nodes).to(ego.dtype)
    l2 = (counts * ego.pow(2).sum(1)).sum() / 2
    return loss + reg * l2 / (b * k)


def _triples(users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor):
    """Check a BPR batch; ``neg`` becomes ``[B, k]``."""
    if neg.dim() == 1:
        neg = neg.unsqueeze(1)
    if users.dim() != 1 or pos.shape != users.shape or neg.dim() != 2 or neg.shape[0] != users.shape[0]:
        raise ValueError(f"BPR batch needs users [B], pos [B] and neg [B] or [B, k]; got "
                         f"{tuple(users.shape)}, {tuple(pos.shape)}, {tuple(neg.shape)}")
    return users, pos, neg, neg.shape[1]


class MF(_BprModel):
    """Matrix factorization: ``score(u, i) = <p_u, q_i>`` with ``dim``-dimensional embeddings."""

    kind = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int, params: dict | None = None):
        super().__init__(n_users, n_items, 0, params or {})
        self.layer_weights = [1.0]
        self.user_emb = nn.Parameter(torch.empty(n_users, dim).normal_(0.0, 0.1))
        self.item_emb = nn.Parameter(torch.empty(n_items, dim).normal_(0.0, 0.1))

    def ego(self):
        return self.user_emb, self.item_emb

    def propagate(self):
        return self.user_emb, self.item_emb


class LightGCN(_BprModel):
    """LightGCN: ``E_{k+1} = A_hat E_k`` for ``k < n_layers``, final ``sum_k w_k E_k`` (default: the mean).

    Parameters
    ----------
    adj : CsrMatrix, symmetric ``(n_users + n_items)`` square (:func:`graph_adjacency`)
    dim : int  embedding size ``d``; the user / item vectors have ``d`` columns
    n_layers : int  propagation steps ``K``
    layer_weights : sequence of K + 1 floats, optional
    """

    kind = "lightgcn"

    def __init__(self, adj: CsrMatrix, n_users: int, n_items: int, dim: int, n_layers: int = 3,
                 layer_weights=None, num_threads: int | None = None, params: dict | None = None):
        super().__init__(n_users, n_items, n_layers, params or {})
        _check_adjacency(adj, n_users, n_items)
        if layer_weights is None:
            layer_weights = [1.0 / (n_layers + 1)] * (n_layers + 1)
        if len(layer_weights) != n_layers + 1:
            raise ValueError(f"layer_weights needs n_layers + 1 = {n_layers + 1} entries, got {len(layer_weights)}")
        self.layer_weights = [float(w) for w in layer_weights]
        self.adj, self.num_threads = adj, num_threads
        self.embedding = nn.Parameter(torch.empty(n_users + n_items, dim).normal_(0.0, 0.1))

    def ego(self):
        return self.embedding[:self.n_users], self.embedding[self.n_users:]

    def propagate(self):
        out = CorePropagate.apply(self.embedding, self.adj, self.layer_weights, self.num_threads)
        return out[:self.n_users], out[self.n_users:]

    def bpr_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg: float,
                 candidates: int = 1) -> torch.Tensor:
        """:meth:`_BprModel.bpr_loss` fused over the node table (:func:`_node_bpr_loss`)."""
        final = CorePropagate.apply(self.embedding, self.adj, self.layer_weights, self.num_threads)
        return _node_bpr_loss(self, self.embedding, [final], users, pos, neg, reg, candidates)


class NGCF(_BprModel):
    """NGCF: ``E_{k+1} = LeakyReLU(W1 (A_hat + I) E_k + W2 (A_hat E_k * E_k))``, message dropout, and the
    final vector the concatenation of ``E_0`` and the L2-normalized ``E_1 .. E_K`` (``d * (K + 1)``
    columns), as in the authors' implementation.

    Parameters
    ----------
    adj : CsrMatrix, symmetric ``(n_users + n_items)`` square (:func:`graph_adjacency`)
    dim : int  size ``d`` of every layer
    n_layers : int  number of layers ``K``
    dropout : float  message dropout after each layer (training only)
    edge_dropout : float  the authors' node dropout: each training step propagates over the graph with
        this fraction of its edges dropped (:class:`EdgeDropout`; training only)
    """

    kind = "ngcf"

    def __init__(self, adj: CsrMatrix, n_users: int, n_items: int, dim: int, n_layers: int = 3,
                 dropout: float = 0.1, num_threads: int | None = None, params: dict | None = None,
                 edge_dropout: float = 0.0):
        super().__init__(n_users, n_items, n_layers, params or {})
        _check_adjacency(adj, n_users, n_items)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.adj, self.num_threads = adj, num_threads
        self.embedding = nn.Parameter(nn.init.xavier_uniform_(torch.empty(n_users + n_items, dim)))
        self.w1 = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.w2 = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        for lin in (*self.w1, *self.w2):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.dropout = FastDropout(dropout)
        # seeded from torch's generator (seed_everything); none without edge dropout, so p = 0 leaves the
        # generator as it was and builds no per-entry edge map
        self.edge_dropout = (EdgeDropout(adj, edge_dropout, int(torch.randint(2 ** 62, ())))
                             if edge_dropout else None)

    def ego(self):
        return self.embedding[:self.n_users], self.embedding[self.n_users:]

    def layers(self) -> list[torch.Tensor]:
        """``[E_0, normalized E_1, ..., normalized E_K]``, node tables [n_users + n_items, d] each."""
        e = self.embedding
        layers = [e]
        adj = self.edge_dropout.sample() if self.training and self.edge_dropout is not None else self.adj
        for w1, w2 in zip(self.w1, self.w2):
            side = CoreSpmm.apply(e, adj, self.num_threads)
            e = F.leaky_relu(w1(side + e) + w2(side * e), negative_slope=0.2)
            e = self.dropout(e)
            layers.append(F.normalize(e, p=2, dim=1))
        return layers

    def propagate(self):
        out = torch.cat(self.layers(), dim=1)
        return out[:self.n_users], out[self.n_users:]

    def bpr_loss(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, reg: float,
                 candidates: int = 1) -> torch.Tensor:
        """:meth:`_BprModel.bpr_loss` over the layer tables (:func:`_node_bpr_loss`): the ``d * (K + 1)``
        -wide concatenation is built for the batch's rows only, never for the whole graph."""
        return _node_bpr_loss(self, self.embedding, self.layers(), users, pos, neg, reg, candidates)


def _check_adjacency(adj: CsrMatrix, n_users: int, n_items: int) -> None:
    if not isinstance(adj, CsrMatrix):
        raise TypeError(f"adj must be a rec_engine.CsrMatrix, got {type(adj).__name__}")
    n = n_users + n_items
    if adj.shape != (n, n):
        raise ValueError(f"adj has shape {adj.shape}, expected ({n}, {n}) for {n_users} users and {n_items} items")


def build_model(kind: str, train: Interactions, config: TrainConfig) -> _BprModel:
    """An untrained ``kind`` model for ``train``'s users and items (``config.dim``, ``config.params``:
    ``n_layers`` (3), ``layer_weights`` (LightGCN), ``dropout`` (NGCF, 0.1), ``edge_dropout`` (NGCF, 0.0))."""
    if kind not in KINDS:
        raise ValueError(f"unknown graph model kind {kind!r}; expected one of {KINDS}")
    p = dict(config.params)
    if kind == "mf":
        return MF(train.n_users, train.n_items, config.dim, params=p)
    adj = graph_adjacency(train, num_threads=config.num_threads)
    n_layers = int(p.get("n_layers", 3))
    if kind == "lightgcn":
        return LightGCN(adj, train.n_users, train.n_items, config.dim, n_layers, p.get("layer_weights"),
                        num_threads=config.num_threads, params=p)
    if kind == "ngcf":
        return NGCF(adj, train.n_users, train.n_items, config.dim, n_layers, float(p.get("dropout", 0.1)),
                    num_threads=config.num_threads, params=p, edge_dropout=float(p.get("edge_dropout", 0.0)))
    raise ValueError(f"graph kind {kind!r} is registered (rec_engine.kinds) but rec_engine_train.models.graph "
                     "cannot build it")


# ----------------------------------------------------------------------------- negative sampling
class NegativeSampler:
    """Uniform negatives: for each user an item drawn uniformly from the items it has NOT interacted with.

    Exact and loop-free: with a user's positives sorted ``p_0 < p_1 < ...``, the ``r``-th non-positive
    item is ``r + #{j : p_j - j <= r}``, found for a whole batch with one ``np.searchsorted`` over the
    sorted keys ``user * n_items + (p_j - j)``. (This equals "draw uniformly, redraw the positives"
    without the redraw rounds, and stays fast for users who have seen almost every item.)

    Parameters
    ----------
    train : Interactions  the positives (repeats count once)
    """

    def __init__(self, train: Interactions):
        self.n_items = int(train.n_items)
        keys = np.unique(train.users * self.n_items + train.items)             # sorted (user, item)
        users = keys // self.n_items
        self.n_pos = np.bincount(users, minlength=train.n_users).astype(np.int64)
        start = np.zeros(train.n_users + 1, np.int64)
        np.cumsum(self.n_pos, out=start[1:])
        rank = np.arange(keys.shape[0], dtype=np.int64) - start[users]       # j within the user
        self._gap_keys = keys - rank                                          # user * n_items + p_j - j
        self._start = start
        self._pos_items = keys % self.n_items                                 # positives, by user
        self._active = np.flatnonzero(self.n_pos)                             # users with a positive

    def sample_pairs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``n`` (user, positive) pairs the way the LightGCN authors' code samples them: a user uniformly
        among those with a positive, then one of its positives uniformly (so every user weighs the same,
        as in the per-user mean of Recall@K, instead of in proportion to its interactions)."""
        if self._active.size == 0:
            raise ValueError("there are no interactions to sample from")
        users = self._active[rng.integers(0, self._active.size, n)]
        rows = self._start[users] + rng.integers(0, self.n_pos[users])
        return users, self._pos_items[rows]

    def sample(self, users, rng: np.random.Generator) -> np.ndarray:
        """One negative item per entry of ``users`` (int64, same shape).

        Raises
        ------
        ValueError  a user has interacted with every item (it has no negative).
        """
        users = np.asarray(users, np.int64)
        n_free = self.n_items - self.n_pos[users]
        if users.size and n_free.min() <= 0:
            raise ValueError(f"user {int(users.reshape(-1)[np.argmin(n_free)])} has interacted with all "
                             f"{self.n_items} items: there is no negative to sample")
        r = rng.integers(0, n_free) if users.size else np.zeros(users.shape, np.int64)
        before = np.searchsorted(self._gap_keys, users * self.n_items + r, side="right") - self._start[users]
        return r + before


# ----------------------------------------------------------------------------- training
def train_graph(kind: str, split: ImplicitSplit, config: TrainConfig,
                log: Callable[[str], None] = print, *, init: Callable | None = None) -> tuple[_BprModel, History]:
    """Train a ``kind`` model ("mf", "lightgcn" or "ngcf") on ``split.train`` with BPR and Adam.

    An epoch visits every train interaction once as a (user, positive) pair with a fresh uniform
    negative, in shuffled batches of ``config.batch_size`` (the whole graph is propagated once per batch,
    so prefer large batches). ``config.params``: ``reg`` (1e-4, L2 on the batch's ego embeddings),
    ``n_layers``, ``layer_weights``, ``dropout``, ``edge_dropout`` (see :func:`build_model`), ``sampling``
    ("interaction", the default: every train interaction once an epoch; or "user": as many pairs drawn by
    :meth:`NegativeSampler.sample_pairs`, the LightGCN authors' scheme), ``lr_decay`` (1.0: the learning
    rate of epoch ``e`` is ``lr * lr_decay ** (e - 1)``), ``n_negatives`` (1: negatives drawn per pair, each
    making a BPR triple with it; more give each full-graph propagation more triples), ``dns_candidates``
    (1: uniform negatives; ``c > 1``: each negative is the highest-scored of ``c`` uniform candidates,
    dynamic negative sampling, see :meth:`_BprModel.bpr_loss`). After each epoch Recall@20 on
    ``split.valid`` (``split.test`` if there is no valid part) decides early stopping and the kept weights.

    ``init``: called with the freshly built model before training (a warm start writes its weights there).

    Returns
    -------
    (model, History)  the model holds the best epoch's weights and is in eval mode.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown graph model kind {kind!r}; expected one of {KINDS}")
    if len(split.train) == 0:
        raise ValueError("split.train holds no interactions")
    rng = seed_everything(config.seed)
    model = build_model(kind, split.train, config)
    if init is not None:
        init(model)
    reg = float(config.params.get("reg", 1e-4))
    sampling = str(config.params.get("sampling", "interaction"))
    if sampling not in ("interaction", "user"):
        raise ValueError(f"sampling must be 'interaction' or 'user', got {sampling!r}")
    n_negatives = int(config.params.get("n_negatives", 1))
    if n_negatives < 1:
        raise ValueError(f"n_negatives must be >= 1, got {n_negatives}")
    candidates = int(config.params.get("dns_candidates", 1))
    if candidates < 1:
        raise ValueError(f"dns_candidates must be >= 1, got {candidates}")
    lr_decay = float(config.params.get("lr_decay", 1.0))
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = NegativeSampler(split.train)
    n = len(split.train)
    train_lists = split.train.by_user()
    target = (split.valid if split.valid is not None else split.test).by_user()

    def make_progress(epoch: int) -> Progress:
        steps = batches(n, config.batch_size, rng)
        return Progress(steps, len(steps), f"{kind} epoch {epoch}", enabled=config.progress)

    def train_epoch(epoch: int, progress: Progress) -> float:
        for group in opt.param_groups:   # exponential decay: lr * lr_decay ** (epoch - 1)
            group["lr"] = config.lr * lr_decay ** (epoch - 1)
        for rows in progress:
            if sampling == "user":
                users, pos = sampler.sample_pairs(rows.shape[0], rng)
            else:
                users, pos = split.train.users[rows], split.train.items[rows]
            neg = torch.from_numpy(sampler.sample(np.repeat(users[:, None], n_negatives * candidates, axis=1), rng))
            loss = model.bpr_loss(torch.from_numpy(users), torch.from_numpy(pos), neg, reg, candidates)
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress.add_loss(loss.item())
        return progress.mean_loss

    def validate() -> dict:
        user_vecs, item_vecs = final_embeddings(model)
        return evaluate_retrieval(user_vecs, item_vecs, train_lists, target, ks=(20,))

    hist = fit(model, train_epoch, validate, config, monitor="recall@20", log=log, make_progress=make_progress)
    return model, hist


def final_embeddings(model: _BprModel) -> tuple[np.ndarray, np.ndarray]:
    """The model's final user and item vectors, computed without gradients in eval mode.

    Returns
    -------
    user_vecs : float32, C-contiguous ``[n_users, D]``  (a copy, not shared with the model)
    item_vecs : float32, C-contiguous ``[n_items, D]``
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            users, items = model.propagate()
    finally:
        model.train(was_training)
    return (np.array(users.detach().numpy(), dtype=np.float32, order="C"),
            np.array(items.detach().numpy(), dtype=np.float32, order="C"))

