"""SASRec (Kang & McAuley, ICDM 2018): self-attentive sequential recommendation.

The model is split the way serving runs it:

- ``SASRec.item_emb``: ``[n_items + 1, d]``, row 0 the padding row (the internal id of item ``i`` is
  ``i + 1``). It embeds the input sequence and is also the output matrix: the score of item ``i`` for a
  user is ``user . item_emb[i + 1]`` (shared, as in the paper). The bundle stores ``item_emb[1:]``.
- :class:`SASRecEncoder`: everything else (learned positions, the blocks of causal self-attention and
  point-wise feed-forward, the final layer norm). It takes the looked-up embeddings and a 0/1 mask, so
  the item table stays outside the ONNX graph.

Sequences are LEFT-padded: the latest item is always at the last position, whose output is the user
vector. Position embeddings are indexed from the end of the window (the last position always gets row
``max_len - 1``), which is exactly the paper's indexing for a window of ``max_len`` and keeps a shorter
window consistent with it.

Two deliberate differences from the reference implementations, both to make the user vector exactly
independent of the padding: padded positions are masked out of the attention keys (the reference lets
queries attend to the zero vectors of padding), and every position may attend to itself, so a fully
padded row never has an empty softmax. Non-padded outputs are the same function of the real items
whatever the amount of padding.

``pre_ln=True`` (default) is the paper's block, ``x + Dropout(g(LayerNorm(x)))`` for both sub-layers;
``pre_ln=False`` is the post-norm transformer block, ``LayerNorm(x + Dropout(g(x)))``. Both end with a
final layer norm, as in pmixer's SASRec.pytorch.

An empty history has no user vector: :func:`user_vectors` raises ValueError for it (a cold user is served
by another model, e.g. popularity).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rec_engine import IdLists

from ..data.containers import SequenceData
from ..evaluate import evaluate_sampled, sample_unseen
from rec_engine.sequential import check_candidates, pad_histories
from ..loop import History, Progress, TrainConfig, batches, fit, seed_everything
from .layers import FastDropout

DEFAULTS = {"max_len": 50, "n_blocks": 2, "n_heads": 1, "dropout": 0.2, "pre_ln": True,
            "n_negatives_valid": 100}
_MODEL_PARAMS = ("max_len", "n_blocks", "n_heads", "dropout", "pre_ln")
_LN_EPS = 1e-8


class _CausalSelfAttention(nn.Module):
    """Multi-head self-attention restricted by a boolean ``allowed`` matrix ``[B, L, L]`` (query, key)."""

    def __init__(self, dim: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_dropout = FastDropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        qkv = self.in_proj(x).reshape(b, length, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                                  # [B, h, L, dh]
        logits = (q @ k.transpose(-1, -2)) * (self.head_dim ** -0.5)
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        weights = self.attn_dropout(torch.softmax(logits, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).reshape(b, length, d))


class _PointWiseFeedForward(nn.Module):
    """Two position-wise linear layers with a ReLU (the paper's FFN; pmixer's pair of 1x1 convolutions)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = FastDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.dropout(self.fc1(x))))


class _Block(nn.Module):
    def __init__(self, dim: int, n_heads: int, dropout: float, pre_ln: bool):
        super().__init__()
        self.pre_ln = pre_ln
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim, eps=_LN_EPS), nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = _CausalSelfAttention(dim, n_heads, dropout)
        self.ffn = _PointWiseFeedForward(dim, dropout)
        self.attn_dropout, self.ffn_dropout = FastDropout(dropout), FastDropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.attn_dropout(self.attn(self.attn_norm(x), allowed))
            return x + self.ffn_dropout(self.ffn(self.ffn_norm(x)))
        x = self.attn_norm(x + self.attn_dropout(self.attn(x, allowed)))
        return self.ffn_norm(x + self.ffn_dropout(self.ffn(x)))


class SASRecEncoder(nn.Module):
    """The attention part of SASRec: from looked-up item embeddings to user vectors.

    Parameters
    ----------
    dim, max_len, n_blocks, n_heads : int
        ``dim`` must be divisible by ``n_heads``; inputs hold at most ``max_len`` positions.
    dropout : float
        On the embeddings, the attention weights, inside and after each sub-layer (training only).
    pre_ln : bool
        Pre-norm blocks (the paper) or post-norm blocks.
    """

    def __init__(self, dim: int, max_len: int, n_blocks: int = 2, n_heads: int = 1, dropout: float = 0.2,
                 pre_ln: bool = True):
        super().__init__()
        self.dim, self.max_len = int(dim), int(max_len)
        self.scale = math.sqrt(self.dim)
        self.pos_emb = nn.Parameter(torch.empty(self.max_len, self.dim))
        self.emb_dropout = FastDropout(dropout)
        self.blocks = nn.ModuleList(_Block(self.dim, n_heads, dropout, pre_ln) for _ in range(n_blocks))
        self.last_norm = nn.LayerNorm(self.dim, eps=_LN_EPS)

    def sequence(self, seq_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Outputs at every position.

        Parameters
        ----------
        seq_emb : float32 [B, L, dim]
            Item embeddings of left-padded sequences, ``L <= max_len``; padded rows may hold anything.
        mask : float32 [B, L]
            1 at real items, 0 at padding.

        Returns
        -------
        float32 [B, L, dim]; output ``t`` depends only on the real items at positions ``<= t``.
        """
        if seq_emb.dim() != 3 or seq_emb.shape[2] != self.dim:
            raise ValueError(f"seq_emb must have shape [batch, length, {self.dim}], got {tuple(seq_emb.shape)}")
        length = seq_emb.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequences hold at most max_len = {self.max_len} positions, got {length}")
        if mask.dim() != 2 or mask.shape[1] != length:
            raise ValueError(f"mask must have shape [batch, {length}], got {tuple(mask.shape)}")
        keep = mask.unsqueeze(-1)
        x = (seq_emb * self.scale + self.pos_emb[self.max_len - length:]) * keep
        x = self.emb_dropout(x)
        pos = torch.arange(length, device=seq_emb.device)
        causal = pos.unsqueeze(1) >= pos.unsqueeze(0)                        # [L, L] query >= key
        allowed = causal & ((mask.unsqueeze(1) > 0) | torch.eye(length, dtype=torch.bool, device=seq_emb.device))
        for block in self.blocks:
            x = block(x, allowed) * keep
        return self.last_norm(x)

    def forward(self, seq_emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """User vectors: the output at the last position (the latest item), float32 [B, dim]."""
        return self.sequence(seq_emb, mask)[:, -1]


class SASRec(nn.Module):
    """Item table + :class:`SASRecEncoder`.

    Parameters
    ----------
    n_items, dim : int
    max_len, n_blocks, n_heads, dropout, pre_ln
        See :class:`SASRecEncoder`.
    """

    def __init__(self, n_items: int, dim: int = 50, max_len: int = 50, n_blocks: int = 2, n_heads: int = 1,
                 dropout: float = 0.2, pre_ln: bool = True):
        super().__init__()
        for name, value, low in (("n_items", n_items, 1), ("dim", dim, 1), ("max_len", max_len, 1),
                                 ("n_blocks", n_blocks, 0), ("n_heads", n_heads, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.n_items, self.dim, self.max_len = int(n_items), int(dim), int(max_len)
        self.params = {"max_len": self.max_len, "n_blocks": int(n_blocks), "n_heads": int(n_heads),
                       "dropout": float(dropout), "pre_ln": bool(pre_ln)}
        self.item_emb = nn.Embedding(self.n_items + 1, self.dim, padding_idx=0)
        self.encoder = SASRecEncoder(self.dim, self.max_len, n_blocks, n_heads, dropout, pre_ln)
        for p in self.parameters():          # pmixer: Xavier-normal on every matrix
            if p.dim() == 2:
                nn.init.xavier_normal_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Outputs at every position of left-padded internal ids ``seq`` (int64 [B, L], 0 = padding):
        float32 [B, L, dim]."""
        return self.encoder.sequence(self.item_emb(seq), (seq != 0).to(torch.float32))


def _internal_ids(histories, model: SASRec, length: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = pad_histories(histories, length, model.n_items)
    return np.where(mask > 0, ids + 1, 0), mask


def user_vectors(model: SASRec, histories: Sequence, batch_size: int = 1024) -> np.ndarray:
    """User vectors of item histories (oldest first; the latest ``max_len`` items are used).

    Parameters
    ----------
    histories : sequence of 1-D integer arrays, or an IdLists
        Item ids in ``[0, n_items)``; every history needs at least one item.

    Returns
    -------
    float32 [U, dim]

    Raises
    ------
    ValueError  an empty history; IndexError  an item id out of range (both name the history).
    """
    ids, mask = _internal_ids(histories, model, model.max_len)
    out = np.empty((ids.shape[0], model.dim), np.float32)
    # Shortest histories first, each chunk trimmed to its longest: left padding never changes the output.
    lengths = mask.sum(1).astype(np.int64)
    order = np.argsort(lengths, kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                rows = order[start:start + batch_size]
                w = max(int(lengths[rows[-1]]), 1)
                seq = torch.from_numpy(ids[rows, -w:])
                m = torch.from_numpy(mask[rows, -w:])
                out[rows] = model.encoder(model.item_emb(seq), m).numpy()
    finally:
        model.train(was_training)
    return out


def score(model: SASRec, users_hist: Sequence, candidates) -> np.ndarray:
    """Scores of candidate items for each history: ``user_vector . item_emb[item + 1]``.

    Parameters
    ----------
    users_hist : U histories (see :func:`user_vectors`)
    candidates : integer array [U, C]
        Item ids in ``[0, n_items)``.

    Returns
    -------
    float32 [U, C]
    """
    cand = check_candidates(candidates, len(users_hist), model.n_items)
    users = user_vectors(model, users_hist)
    items = model.item_emb.weight.detach().numpy()[cand + 1]       # [U, C, d]
    return np.einsum("ucd,ud->uc", items, users).astype(np.float32)


# Users per scoring call in evaluation: user_vectors sorts a call's histories by length and trims each
# chunk to its longest, so large calls waste little on padding (the sampled candidates do not depend on it).
EVAL_USERS = 8192
# A group of rows costs about as much fixed work as this many extra positions (measured on one core).
_GROUP_COST = 256


def length_groups(widths: np.ndarray, max_groups: int = 4, group_cost: int = _GROUP_COST) -> list[np.ndarray]:
    """Split rows into at most ``max_groups`` groups of similar width that minimise
    ``sum(rows * widest row) + group_cost * groups``, the positions a trimmed batch computes.

    ``widths`` int [B]; returns row indices per group (together a permutation of ``range(B)``), narrowest
    group first. Exact: a dynamic programme over the distinct widths, in sorted order."""
    widths = np.asarray(widths, np.int64)
    if widths.size == 0:
        return []
    values, counts = np.unique(widths, return_counts=True)
    u = values.size
    before = np.concatenate([[0], np.cumsum(counts)])              # rows narrower than values[i]
    # cost[i, j]: one group holding the distinct widths i..j-1 (rows before[j] - before[i], width values[j-1])
    i, j = np.arange(u + 1)[:, None], np.arange(u + 1)[None, :]
    cost = np.where(i < j, (before[j] - before[i]) * values[np.maximum(j - 1, 0)] + group_cost,
                    np.iinfo(np.int64).max // 4)
    best, cuts = cost[0], []
    totals = [best[u]]
    for _ in range(1, max_groups):
        step = best[:, None] + cost
        cuts.append(np.argmin(step, axis=0))
        best = step[cuts[-1], np.arange(u + 1)]
        totals.append(best[u])
    g = int(np.argmin(totals))
    bounds, j_end = [], u
    for c in reversed(cuts[:g]):
        bounds.append(int(c[j_end]))
        j_end = bounds[-1]
    edges = [0] + bounds[::-1] + [u]
    order = np.argsort(widths, kind="stable")
    return [order[before[a]:before[b]] for a, b in zip(edges[:-1], edges[1:])]


def _batch_logits(model: SASRec, seq: np.ndarray, neg: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the next item and of its negative at every target position of a training batch.

    ``seq`` int64 [B, max_len + 1] left-padded internal ids (input ``seq[:, :-1]``, targets ``seq[:, 1:]``),
    ``neg`` int64 [B, max_len] one negative per target position. Most histories are far shorter than
    ``max_len``, so rows are grouped by length (:func:`length_groups`) and each group runs trimmed to its
    longest row: left padding never changes a real position's output (positions are indexed from the end
    and padded keys are masked), so this is the same loss as the full-width batch for a fraction of the
    work. One embedding lookup serves every group, so the table's gradient is accumulated once.
    Returns two float32 vectors over the target positions (targets != 0), in group order."""
    targets = seq[:, 1:]
    widths = np.maximum((targets != 0).sum(1), 1)
    groups = length_groups(widths)
    parts, inputs, real = [], [], []
    for rows in groups:
        w = int(widths[rows].max())
        inp, tgt = seq[rows, -w - 1:-1], targets[rows, -w:]
        r = tgt != 0
        parts += [inp.ravel(), tgt[r], neg[rows, -w:][r]]
        inputs.append(inp)
        real.append(r)
    emb = model.item_emb(torch.from_numpy(np.concatenate(parts)))
    pos_logits, neg_logits, at = [], [], 0
    for inp, r in zip(inputs, real):
        b, w = inp.shape
        x = emb[at:at + b * w].reshape(b, w, model.dim)
        mask = torch.from_numpy((inp != 0).astype(np.float32))
        at += b * w
        n = int(r.sum())
        p, q = emb[at:at + n], emb[at + n:at + 2 * n]
        at += 2 * n
        h = model.encoder.sequence(x, mask)[torch.from_numpy(r)]
        pos_logits.append((h * p).sum(-1))
        neg_logits.append((h * q).sum(-1))
    return torch.cat(pos_logits), torch.cat(neg_logits)


def _params(config: TrainConfig) -> dict:
    unknown = set(config.params) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown SASRec params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **config.params}


def train_sasrec(data: SequenceData, config: TrainConfig,
                 log: Callable[[str], None] = print) -> tuple[SASRec, History]:
    """Train SASRec on ``data.train`` sequences, validating sampled HR@10 on ``data.valid``.

    Each step takes a batch of users' training sequences (their latest ``max_len + 1`` items, left-padded):
    the input is ``seq[:-1]`` and, at every non-padded position, the target is the next item against one
    negative drawn uniformly from the items not in the user's training sequence; the loss is the sum of
    the two mean binary cross-entropies (the paper's loss). Adam (betas 0.9, 0.98 as in the reference)
    with ``config.lr`` and ``config.weight_decay``. Validation: :func:`evaluate_sampled` on the ``valid``
    split with each user's training sequence as history; the best epoch by ``hr@10`` is kept.

    ``config.params``: ``max_len`` (50), ``n_blocks`` (2), ``n_heads`` (1), ``dropout`` (0.2), ``pre_ln``
    (True), ``n_negatives_valid`` (100). Users with fewer than 2 training items give no training step.

    Returns
    -------
    (SASRec in eval mode, History)
    """
    if not isinstance(data, SequenceData):
        raise TypeError(f"data must be a SequenceData, got {type(data).__name__}")
    p = _params(config)
    rng = seed_everything(config.seed)
    model = SASRec(data.n_items, config.dim, **{k: p[k] for k in _MODEL_PARAMS})
    max_len = model.max_len

    lengths = np.array([len(s) for s in data.train], np.int64)
    users = np.flatnonzero(lengths >= 2)
    if users.size == 0:
        raise ValueError("no user has 2 or more training items: SASRec has nothing to learn from")
    seqs, _ = _internal_ids([data.train[u] for u in users], model, max_len + 1)     # [U', max_len + 1]
    train_lists = IdLists.from_lists(data.train)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, betas=(0.9, 0.98), weight_decay=config.weight_decay)
    n = users.size
    n_batches = -(-n // config.batch_size)

    def train_epoch(epoch: int, progress: Progress | None) -> float:
        total, count = 0.0, 0
        for rows in (progress if progress is not None else batches(n, config.batch_size, rng)):
            neg = sample_unseen(train_lists, users[rows], data.n_items, max_len, rng) + 1
            pos_logit, neg_logit = _batch_logits(model, seqs[rows], neg)
            loss = (F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit))
                    + F.binary_cross_entropy_with_logits(neg_logit, torch.zeros_like(neg_logit)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total, count = total + value * len(rows), count + len(rows)
            if progress is not None:
                progress.add_loss(value)
        return total / max(count, 1)

    def validate() -> dict:
        return evaluate_sampled(lambda u, cands: score(model, [data.train[i] for i in u], cands), data,
                                split="valid", n_negatives=int(p["n_negatives_valid"]), seed=config.seed, ks=(10,),
                                batch_size=EVAL_USERS)

    def make_progress(epoch: int) -> Progress:
        return Progress(batches(n, config.batch_size, rng), n_batches, f"sasrec {epoch}/{config.epochs}",
                        enabled=config.progress)

    history = fit(model, train_epoch, validate, config, monitor="hr@10", log=log, make_progress=make_progress)
    return model, history
