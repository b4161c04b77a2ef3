"""Ranking (CTR) models over a feature schema: LR, FM, Wide&Deep, DeepFM and xDeepFM.

Every model is one :class:`CtrModel`: two tables of the schema's ``n_rows`` rows, pooled per field exactly as
the C++ core pools them (``EmbeddingTable.pool(indices, offsets, weights, mode="sum", include_last_offset=True)``),

- ``embedding`` ``[n_rows, dim]``: the field embeddings ``emb [B, F, dim]``,
- ``linear`` ``[n_rows, 1]``: the first-order weights ``lin [B, F]``,

and a ``dense`` module ``(emb, lin) -> logit [B]`` holding everything else. The tables go to a bundle as
tables and the dense part as ONNX (see :mod:`rec_engine_train.export_ctr`), so serving looks rows up in C++
and runs only the small dense graph.

Dense parts (``b`` a bias, ``e_f`` the embedding of field ``f``):

- ``lr``:        ``b + sum_f lin_f``
- ``fm``:        ``lr + 0.5 * sum_d((sum_f e_f)^2 - sum_f e_f^2)``  (all pairwise ``<e_f, e_g>``, ``f < g``)
- ``widedeep``:  ``lr + MLP(flatten(emb))``
- ``deepfm``:    ``fm + MLP(flatten(emb))``
- ``xdeepfm``:   ``lr + CIN(emb) + MLP(flatten(emb))``
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rec_engine.features import EncodedBatch, Schema
from rec_engine.kinds import names

from ..data.containers import CtrData
from ..evaluate import evaluate_ctr
from ..loop import History, Progress, TrainConfig, batches, fit, seed_everything

KINDS = names(family="ctr")          # from the registry: lr, fm, widedeep, deepfm, xdeepfm
_FM_KINDS = ("fm", "deepfm")
_MLP_KINDS = ("widedeep", "deepfm", "xdeepfm")
_BUILT = ("lr", "xdeepfm") + _FM_KINDS + _MLP_KINDS      # the kinds this module knows how to build

DEFAULT_MLP = (128, 64)
DEFAULT_CIN = (64, 64)


def check_kind(kind: str) -> str:
    """Return ``kind`` if it is a known model kind; raise ValueError listing the known kinds otherwise."""
    if kind not in KINDS:
        raise ValueError(f"unknown CTR model kind {kind!r}; known kinds: {', '.join(KINDS)}")
    if kind not in _BUILT:
        raise ValueError(f"CTR kind {kind!r} is registered (rec_engine.kinds) but rec_engine_train.models.ctr "
                         "cannot build it")
    return kind


def fm_interaction(emb: torch.Tensor) -> torch.Tensor:
    """Second-order FM term of ``emb [B, F, d]``: ``0.5 * sum_d((sum_f e)^2 - sum_f e^2)`` -> ``[B]``."""
    s = emb.sum(dim=1)
    return 0.5 * (s * s - (emb * emb).sum(dim=1)).sum(dim=1)


class MLP(nn.Module):
    """``Linear -> [BatchNorm] -> ReLU -> Dropout`` per hidden size, then ``Linear`` to 1: ``[B, n_in] -> [B]``."""

    def __init__(self, n_in: int, hidden: Sequence[int], dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers.append(nn.Linear(n_in, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            n_in = h
        layers.append(nn.Linear(n_in, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class CIN(nn.Module):
    """Compressed Interaction Network of xDeepFM (Lian et al., 2018), with direct connections.

    Layer ``k`` maps ``X^{k-1} [B, H_{k-1}, d]`` and ``X^0 = emb [B, F, d]`` to
    ``X^k_h = sum_{i,j} W^{k,h}_{ij} (X^{k-1}_i * X^0_j)`` (a 1x1 convolution over the ``H_{k-1} * F``
    outer-product maps); each layer's maps are sum-pooled over ``d`` and the concatenation goes
    through a linear layer to 1: ``[B, F, d] -> [B]``."""

    def __init__(self, n_fields: int, layers: Sequence[int]):
        super().__init__()
        sizes = [n_fields, *layers]
        self.convs = nn.ModuleList(nn.Conv1d(sizes[k] * n_fields, sizes[k + 1], kernel_size=1)
                                   for k in range(len(layers)))
        self.out = nn.Linear(sum(layers), 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x0, x = emb, emb
        pooled = []
        for conv in self.convs:
            z = (x.unsqueeze(2) * x0.unsqueeze(1)).flatten(1, 2)      # [B, H * F, d]
            x = conv(z)                                                # [B, H_next, d]
            pooled.append(x.sum(dim=2))
        return self.out(torch.cat(pooled, dim=1)).squeeze(-1)


class CtrDense(nn.Module):
    """The dense part of a CTR model: ``forward(emb [B, F, d] float32, lin [B, F] float32) -> logit [B]``."""

    def __init__(self, kind: str, n_fields: int, dim: int, *, mlp: Sequence[int] = DEFAULT_MLP,
                 cin: Sequence[int] = DEFAULT_CIN, dropout: float = 0.0, batch_norm: bool = False):
        super().__init__()
        self.kind = check_kind(kind)
        self.bias = nn.Parameter(torch.zeros(1))
        self.use_fm = kind in _FM_KINDS
        self.mlp = MLP(n_fields * dim, mlp, dropout, batch_norm) if kind in _MLP_KINDS else None
        self.cin = CIN(n_fields, cin) if kind == "xdeepfm" else None

    def forward(self, emb: torch.Tensor, lin: torch.Tensor) -> torch.Tensor:
        logit = self.bias + lin.sum(dim=1)
        if self.use_fm:
            logit = logit + fm_interaction(emb)
        if self.cin is not None:
            logit = logit + self.cin(emb)
        if self.mlp is not None:
            logit = logit + self.mlp(emb.flatten(1))
        return logit


class CtrModel(nn.Module):
    """A CTR model of ``kind`` over ``schema``: tables ``embedding`` ``[n_rows, dim]`` and ``linear``
    ``[n_rows, 1]`` pooled per field, then ``dense`` (a :class:`CtrDense`).

    ``params`` (model-specific): ``mlp`` hidden sizes (default (128, 64)), ``cin`` layer sizes (default
    (64, 64)), ``dropout`` (0), ``batch_norm`` (False), ``init_std`` of the embeddings (0.01).
    """

    def __init__(self, kind: str, schema: Schema, dim: int = 16, params: dict | None = None):
        super().__init__()
        if not isinstance(schema, Schema):
            raise TypeError(f"schema must be a rec_engine.features.Schema, got {type(schema).__name__}")
        self.kind = check_kind(kind)
        self.schema = schema
        self.dim = int(dim)
        self.params = dict(params or {})
        self.n_fields = schema.n_fields
        std = float(self.params.get("init_std", 0.01))
        self.embedding = nn.Parameter(torch.randn(schema.n_rows, self.dim) * std)
        self.linear = nn.Parameter(torch.zeros(schema.n_rows, 1))
        self.dense = CtrDense(kind, self.n_fields, self.dim,
                              mlp=tuple(self.params.get("mlp", DEFAULT_MLP)),
                              cin=tuple(self.params.get("cin", DEFAULT_CIN)),
                              dropout=float(self.params.get("dropout", 0.0)),
                              batch_norm=bool(self.params.get("batch_norm", False)))

    def pool(self, indices: torch.Tensor, offsets: torch.Tensor,
             weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Field embeddings ``emb [B, F, dim]`` and first-order weights ``lin [B, F]`` of ``B * F`` bags."""
        emb = F.embedding_bag(indices, self.embedding, offsets, mode="sum", per_sample_weights=weights,
                              include_last_offset=True)
        lin = F.embedding_bag(indices, self.linear, offsets, mode="sum", per_sample_weights=weights,
                              include_last_offset=True)
        return emb.view(-1, self.n_fields, self.dim), lin.view(-1, self.n_fields)

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Logits ``[B]`` of ``B`` examples encoded as ``B * F`` bags (int64 indices, int64 offsets of
        length ``B * F + 1``, float32 weights; the layout of :class:`rec_engine.features.EncodedBatch`)."""
        return self.dense(*self.pool(indices, offsets, weights))

    def check_batch(self, batch: EncodedBatch, what: str = "batch") -> None:
        """Raise ValueError if ``batch`` was not encoded with a schema of this model's shape."""
        if batch.n_fields != self.n_fields:
            raise ValueError(f"{what} has {batch.n_fields} fields, the model's schema has {self.n_fields} "
                             f"({', '.join(self.schema.names)})")
        if len(batch.indices) and (batch.indices.min() < 0 or batch.indices.max() >= self.schema.n_rows):
            raise ValueError(f"{what} holds rows outside [0, {self.schema.n_rows}): it was encoded with "
                             "another schema")


def _tensors(batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(np.ascontiguousarray(batch.indices, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(batch.offsets, dtype=np.int64)),
            torch.from_numpy(np.ascontiguousarray(batch.weights, dtype=np.float32)))


@torch.no_grad()
def predict_ctr(model: CtrModel, batch: EncodedBatch, *, batch_rows: int = 8192) -> np.ndarray:
    """Click probabilities of the ``n`` examples of ``batch``, ``batch_rows`` at a time: float32 ``[n]``.

    Raises ValueError if ``batch`` does not fit the model's schema."""
    model.check_batch(batch)
    was_training = model.training
    model.eval()
    n = len(batch)
    out = np.empty(n, np.float32)
    for s in range(0, n, batch_rows):
        part = batch.take(np.arange(s, min(s + batch_rows, n)))
        out[s:s + len(part)] = torch.sigmoid(model(*_tensors(part))).numpy()
    model.train(was_training)
    return out


def train_ctr(kind: str, data: CtrData, config: TrainConfig, log: Callable[[str], None] = print, *,
              model: CtrModel | None = None) -> tuple[CtrModel, History]:
    """Train a CTR model of ``kind`` on ``data.train``, validating AUC / log loss on ``data.valid``.

    Adam with ``config.lr``; ``config.weight_decay`` is an L2 penalty on the dense parameters and
    ``config.params["emb_l2"]`` (default 0) one on the two tables. Loss: BCE with logits over shuffled
    mini-batches of ``config.batch_size`` examples. The best epoch by validation AUC is kept (early
    stopping after ``config.patience`` epochs without improvement). Both tables get dense gradients: fine
    for tables of up to a few million rows; larger ones would want sparse gradients and a sparse optimizer.

    Parameters
    ----------
    kind : one of ``KINDS``
    data : CtrData
        Encoded examples with float32 labels in {0, 1}.
    model : CtrModel, optional
        Continue training this model (its kind and schema must match) instead of a new one.

    Returns
    -------
    (CtrModel, History)
    """
    check_kind(kind)
    if not isinstance(data, CtrData):
        raise TypeError(f"data must be a CtrData, got {type(data).__name__}")
    for split in ("train", "valid"):
        if getattr(data, split).labels is None:
            raise ValueError(f"data.{split} has no labels")
    rng = seed_everything(config.seed)
    if model is None:
        model = CtrModel(kind, data.schema, config.dim, config.params)
    elif model.kind != kind:
        raise ValueError(f"the model given is a {model.kind!r} model, not {kind!r}")
    elif model.schema != data.schema:
        raise ValueError(f"the data's schema differs from the model's: {data.schema!r} vs {model.schema!r}")
    for split in ("train", "valid"):
        model.check_batch(getattr(data, split), f"data.{split}")

    emb_l2 = float(config.params.get("emb_l2", 0.0))
    opt = torch.optim.Adam([
        {"params": [model.embedding, model.linear], "weight_decay": emb_l2},
        {"params": list(model.dense.parameters()), "weight_decay": config.weight_decay},
    ], lr=config.lr)
    train = data.train
    n = len(train)
    n_batches = -(-n // config.batch_size)

    def train_epoch(epoch: int, progress: Progress | None) -> float:
        total, count = 0.0, 0
        for rows in (progress if progress is not None else batches(n, config.batch_size, rng)):
            part = train.take(rows)
            logit = model(*_tensors(part))
            labels = torch.from_numpy(np.asarray(part.labels, dtype=np.float32))
            loss = F.binary_cross_entropy_with_logits(logit, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            total, count = total + value * len(rows), count + len(rows)
            if progress is not None:
                progress.add_loss(value)
        return total / max(count, 1)

    def validate() -> dict:
        return evaluate_ctr(data.valid.labels, predict_ctr(model, data.valid))

    def make_progress(epoch: int) -> Progress:
        return Progress(batches(n, config.batch_size, rng), n_batches, f"{kind} {epoch}/{config.epochs}",
                        enabled=config.progress)

    history = fit(model, train_epoch, validate, config, monitor="auc", log=log, make_progress=make_progress)
    return model, history
