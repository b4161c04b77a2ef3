"""Ranking: the second stage. A CTR model's sparse features are looked up by the C++ core and its dense
part runs in ONNX Runtime.

A ranking bundle (kinds ``lr``, ``fm``, ``widedeep``, ``deepfm``, ``xdeepfm``) holds the feature schema, the
shared ``embedding`` and ``linear`` tables, the ONNX ``dense`` part (inputs ``emb`` [B, F, d] and ``lin``
[B, F], output ``logit`` [B]) and, for serving candidates, feature stores: each item's and each user's
encoded features (arrays ``item_features_*`` / ``user_features_*``, fields named in meta
``entity_fields``). The fields of neither entity come from the request's ``context``; a user the store
does not know is described by ``context`` too, and values never seen in training fall into their
field's hashed bucket.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ._core import RecEngineError
from .bundle import Bundle, BundleError
from .features import EncodedBatch, Schema

RANKING_KINDS = ("lr", "fm", "widedeep", "deepfm", "xdeepfm")


class _Store:
    """Per-entity encoded features (the entity's fields only), rows = entity ids."""

    def __init__(self, bundle: Bundle, prefix: str, n_fields: int):
        self.batch = EncodedBatch(bundle.array(f"{prefix}_indices"), bundle.array(f"{prefix}_offsets"),
                                  bundle.array(f"{prefix}_weights"), n_fields)
        self.n = len(self.batch)


class CtrRanker:
    """A ranking bundle opened for scoring: core pooling, then the ONNX dense part (no torch).

    Call it with an :class:`~rec_engine.features.EncodedBatch` for click probabilities (or use
    :meth:`logits`), or score a user's candidates with :meth:`score_candidates`. Safe to call from
    several threads at once (the tables and the ONNX session are).

    Parameters
    ----------
    bundle : Bundle
    session_options : onnxruntime.SessionOptions, optional
        Default: one intra-op thread (right for a server running requests in parallel).
    num_threads : int, optional
        Core threads of the pooling (None: the core's default).
    """

    def __init__(self, bundle: Bundle, session_options=None, *, num_threads: int | None = 1):
        import onnxruntime as ort

        meta = bundle.meta
        missing = [k for k in ("schema", "dim") if k not in meta] + ([] if bundle.has("dense.onnx") else ["dense.onnx"])
        if missing:
            raise BundleError(f"{bundle.path} is not a ranking bundle (kind {bundle.kind!r}): it lacks {missing}")
        self.bundle = bundle
        self.kind = bundle.kind
        self.schema = Schema.from_dict(meta["schema"])
        self.n_fields = self.schema.n_fields
        self.dim = int(meta["dim"])
        self.num_threads = num_threads
        self.embedding = bundle.table("embedding")
        self.linear = bundle.table("linear")
        if self.embedding.rows != self.schema.n_rows or self.linear.rows != self.schema.n_rows:
            raise BundleError(f"bundle {bundle.path}: tables do not have the schema's {self.schema.n_rows} rows")
        if session_options is None:
            session_options = ort.SessionOptions()
            session_options.intra_op_num_threads = 1
            session_options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(bundle.onnx_path("dense")), sess_options=session_options,
                                            providers=["CPUExecutionProvider"])
        self.inputs = tuple(meta.get("inputs", ("emb", "lin")))
        self.output = meta.get("output", "logit")
        groups = meta.get("entity_fields") or {}
        names = self.schema.names
        self.user_fields = [n for n in names if n in set(groups.get("user", ()))]
        self.item_fields = [n for n in names if n in set(groups.get("item", ()))]
        self.context_fields = [n for n in names if n not in set(self.user_fields) | set(self.item_fields)]
        pos = {n: i for i, n in enumerate(names)}
        self.user_pos = np.array([pos[n] for n in self.user_fields], np.int64)
        self.item_pos = np.array([pos[n] for n in self.item_fields], np.int64)
        self.ctx_pos = np.array([pos[n] for n in self.context_fields], np.int64)
        self.items = _Store(bundle, "item_features", len(self.item_fields)) if self.item_fields else None
        self.users = _Store(bundle, "user_features", len(self.user_fields)) if self.user_fields else None
        self.n_items = self.items.n if self.items is not None else None

    # ------------------------------------------------------------------ the two halves
    def _pool(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        args = dict(mode="sum", include_last_offset=True, num_threads=self.num_threads)
        emb = self.embedding.pool(batch.indices, batch.offsets, batch.weights, **args)
        lin = self.linear.pool(batch.indices, batch.offsets, batch.weights, **args)
        return emb, lin[:, 0]

    def _logits(self, emb: np.ndarray, lin: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], dict(zip(self.inputs, (emb, lin))))
        return np.asarray(out, np.float32).reshape(-1)

    @staticmethod
    def _sigmoid(z: np.ndarray) -> np.ndarray:
        return (0.5 * (1.0 + np.tanh(0.5 * z.astype(np.float64)))).astype(np.float32)   # no overflow

    def pool(self, batch: EncodedBatch) -> tuple[np.ndarray, np.ndarray]:
        """``emb`` float32 ``[n, F, dim]`` and ``lin`` float32 ``[n, F]`` of the ``n`` examples of ``batch``."""
        if not isinstance(batch, EncodedBatch):
            raise TypeError(f"expected an EncodedBatch, got {type(batch).__name__}")
        if batch.n_fields != self.n_fields:
            raise ValueError(f"the batch has {batch.n_fields} fields, the bundle's schema has {self.n_fields}")
        emb, lin = self._pool(batch)
        return emb.reshape(-1, self.n_fields, self.dim), lin.reshape(-1, self.n_fields)

    def logits(self, batch: EncodedBatch) -> np.ndarray:
        """Logits, float32 ``[n]``, of fully encoded examples (all schema fields)."""
        emb, lin = self.pool(batch)
        if len(emb) == 0:
            return np.zeros(0, np.float32)
        return self._logits(emb, lin)

    def __call__(self, batch: EncodedBatch) -> np.ndarray:
        """Click probabilities, float32 ``[n]``."""
        return self._sigmoid(self.logits(batch))

    score_examples = __call__

    def __repr__(self) -> str:
        return f"CtrRanker({str(self.bundle.path)!r}, kind={self.kind!r}, fields={self.n_fields}, dim={self.dim})"

    def score_rows(self, rows: list[Mapping[str, Any]]) -> np.ndarray:
        """Click probabilities of examples given as ``{field: value}`` dicts (missing fields are empty)."""
        return self(self.schema.encode_rows(rows))

    def score_candidates(self, user: int, candidates: np.ndarray, context: Mapping[str, Any] | None = None
                         ) -> np.ndarray:
        """Click probabilities ``[N]`` of ``candidates`` (item ids) for ``user`` in ``context``."""
        if self.items is None:
            raise RecEngineError("this ranking bundle has no item feature store: score examples with score_rows")
        context = dict(context or {})
        unknown = set(context) - set(self.schema.names)
        if unknown:
            raise ValueError(f"context has fields the ranking model does not know: {sorted(unknown)}")
        cands = np.asarray(candidates, np.int64)
        if len(cands) and (cands.min() < 0 or cands.max() >= self.items.n):
            raise IndexError(f"candidate ids must be in [0, {self.items.n})")
        N, F, d = len(cands), self.schema.n_fields, self.dim
        emb = np.empty((N, F, d), np.float32)
        lin = np.empty((N, F), np.float32)
        if N == 0:
            return np.zeros(0, np.float32)
        e, li = self._pool(self.items.batch.take(cands))
        emb[:, self.item_pos] = e.reshape(N, -1, d)
        lin[:, self.item_pos] = li.reshape(N, -1)
        if self.user_fields:
            if self.users is not None and 0 <= user < self.users.n:
                ub = self.users.batch.take(np.array([user]))
            else:   # a user the store does not know: its fields come from the context
                ub = self.schema.encode({n: [context.get(n)] for n in self.user_fields}, fields=self.user_fields)
            e, li = self._pool(ub)
            emb[:, self.user_pos] = e
            lin[:, self.user_pos] = li
        if self.context_fields:
            cb = self.schema.encode({n: [context.get(n)] for n in self.context_fields}, fields=self.context_fields)
            e, li = self._pool(cb)
            emb[:, self.ctx_pos] = e
            lin[:, self.ctx_pos] = li
        return self._sigmoid(self._logits(emb, lin))


def load_ranking(bundle: Bundle, session_options=None, *, num_threads: int | None = 1) -> CtrRanker:
    """The ranking model of ``bundle`` (kinds: lr, fm, widedeep, deepfm, xdeepfm)."""
    if bundle.kind not in RANKING_KINDS:
        raise BundleError(f"bundle {bundle.path} of kind {bundle.kind!r} is not a ranking model "
                          f"({', '.join(RANKING_KINDS)})")
    return CtrRanker(bundle, session_options, num_threads=num_threads)
