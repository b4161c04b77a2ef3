"""Feature schema of ranking (CTR) models, and its encoding into embedding bags.

Every field of a schema owns a contiguous block of rows in ONE embedding table:

- ``categorical``: one value per example; its vocabulary, then ``hash_buckets`` rows for values outside it.
- ``multi``: a list of values per example (e.g. genres), pooled by mean; same rows as categorical.
- ``numeric``: one row, scaled by the example's (standardized) value.

An encoded batch of ``B`` examples is ``B * F`` bags (F = number of fields, example-major) in the layout of
:meth:`rec_engine.EmbeddingTable.pool` with ``mode="sum"``: ``indices``, ``offsets`` and per-sample
``weights`` (1 for categorical values, ``1/len`` for multi values, the value for numeric fields). One pool
call therefore returns the ``[B * F, dim]`` field embeddings of a whole batch, which PyTorch computes the
same way with ``torch.nn.functional.embedding_bag``. Missing values give empty bags (zeros).
Unknown values go to the field's hashed buckets (crc32 of the value's text), so serving never fails on a
value training did not see.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

KINDS = ("categorical", "multi", "numeric")
TRANSFORMS = ("none", "log1p")


def _key(value: Any) -> str:
    """The text a value is known by in vocabularies and hashing (1, "1" and 1.0 differ from each other
    only where their text differs: 1 and "1" are the same value)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


_SCALARS = (str, bytes, bytearray, int, float, np.generic, type(None))   # (bool is an int)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return value == ""
    if isinstance(value, (float, np.floating)):
        return bool(np.isnan(value))
    return False


@dataclass(frozen=True)
class Field:
    """One input field. ``vocab`` lists known values (as text); ``hash_buckets`` rows catch the rest."""

    name: str
    kind: str = "categorical"
    vocab: tuple[str, ...] = ()
    hash_buckets: int = 1
    transform: str = "none"      # numeric only: applied before standardization
    mean: float = 0.0            # numeric only
    std: float = 1.0             # numeric only

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a field name must be a non-empty string, got {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"field {self.name!r}: transform must be one of {TRANSFORMS}, got {self.transform!r}")
        object.__setattr__(self, "vocab", tuple(_key(v) for v in self.vocab))
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError(f"field {self.name!r}: vocabulary has duplicate values")
        if self.kind != "numeric" and self.hash_buckets < 1 and not self.vocab:
            raise ValueError(f"field {self.name!r}: needs a vocabulary or at least one hash bucket")
        if self.hash_buckets < 0:
            raise ValueError(f"field {self.name!r}: hash_buckets must be >= 0")
        if not (np.isfinite(self.mean) and np.isfinite(self.std) and self.std > 0):
            raise ValueError(f"field {self.name!r}: mean must be finite and std finite and > 0")

    @property
    def rows(self) -> int:
        """Rows this field owns in the shared table."""
        return 1 if self.kind == "numeric" else len(self.vocab) + self.hash_buckets

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind}
        if self.kind == "numeric":
            d.update(transform=self.transform, mean=self.mean, std=self.std)
        else:
            d.update(vocab=list(self.vocab), hash_buckets=self.hash_buckets)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Field":
        allowed = {"name", "kind", "vocab", "hash_buckets", "transform", "mean", "std"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"field {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "vocab" else v) for k, v in d.items()})


@dataclass
class EncodedBatch:
    """``n`` examples of a schema with ``F`` fields as ``n * F`` bags (see the module docstring).

    ``indices`` int64, ``offsets`` int64 of length ``n * F + 1`` (first 0, last ``len(indices)``),
    ``weights`` float32 like ``indices``; ``labels`` float32 ``[n]`` when known."""

    indices: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray
    n_fields: int
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // self.n_fields if self.n_fields else 0

    def take(self, rows) -> "EncodedBatch":
        """The examples ``rows`` (an int array, any order, repeats allowed) as a new batch."""
        rows = np.asarray(rows, dtype=np.int64)
        f = self.n_fields
        bags = (rows[:, None] * f + np.arange(f)).ravel()
        starts, ends = self.offsets[bags], self.offsets[bags + 1]
        lengths = ends - starts
        offsets = np.zeros(len(bags) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # position p of the output reads starts[bag(p)] + (p - offsets[bag(p)])
        src = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        labels = None if self.labels is None else self.labels[rows]
        return EncodedBatch(self.indices[src], offsets, self.weights[src], f, labels)

    @property
    def single_valued(self) -> bool:
        """True when every bag holds exactly one entry (then ``indices.reshape(n, F)`` is a field matrix)."""
        return len(self.indices) == len(self.offsets) - 1 and bool(np.all(np.diff(self.offsets) == 1))


class Schema:
    """An ordered list of :class:`Field` s, each with its block of rows in one shared table."""

    def __init__(self, fields: Sequence[Field]):
        fields = list(fields)
        if not fields:
            raise ValueError("a schema needs at least one field")
        names = [f.name for f in fields]
        if len(set(names)) != len(names):
            raise ValueError(f"field names must be unique, got {names}")
        self.fields: tuple[Field, ...] = tuple(fields)
        sizes = np.array([f.rows for f in fields], np.int64)
        self.field_offsets = np.concatenate([[0], np.cumsum(sizes)])   # [F + 1]
        self._index = [{v: i for i, v in enumerate(f.vocab)} for f in fields]

    # --------------------------------------------------------------------------------- description
    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    @property
    def n_fields(self) -> int:
        return len(self.fields)

    @property
    def n_rows(self) -> int:
        """Rows of the shared embedding table."""
        return int(self.field_offsets[-1])

    def __eq__(self, other) -> bool:
        return isinstance(other, Schema) and self.fields == other.fields

    def __repr__(self) -> str:
        return f"Schema({self.n_fields} fields, {self.n_rows} rows: {', '.join(self.names)})"

    def to_dict(self) -> dict:
        return {"fields": [f.to_dict() for f in self.fields]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "Schema":
        if not isinstance(d, Mapping) or not isinstance(d.get("fields"), list):
            raise ValueError("a schema is a mapping with a list under 'fields'")
        return cls([Field.from_dict(f) for f in d["fields"]])

    # --------------------------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, columns: Mapping[str, Sequence], kinds: Mapping[str, str] | None = None, *,
            min_count: int = 1, hash_buckets: int = 1, max_vocab: int | None = None,
            transforms: Mapping[str, str] | None = None) -> "Schema":
        """Build a schema from training columns: vocabularies of values seen ``min_count`` times or more
        (the ``max_vocab`` most frequent), mean/std of numeric fields. ``kinds`` maps a column to its
        kind (default categorical); a multi column holds a sequence of values per example."""
        kinds = dict(kinds or {})
        transforms = dict(transforms or {})
        unknown = (set(kinds) | set(transforms)) - set(columns)
        if unknown:
            raise ValueError(f"kinds/transforms name columns that are not given: {sorted(unknown)}")
        fields = []
        for name, col in columns.items():
            kind = kinds.get(name, "categorical")
            if kind == "numeric":
                t = transforms.get(name, "none")
                x = _numeric(col, name, t)
                x = x[np.isfinite(x)]
                mean = float(x.mean()) if len(x) else 0.0
                std = float(x.std()) if len(x) else 1.0
                fields.append(Field(name, "numeric", transform=t, mean=mean, std=std if std > 0 else 1.0))
                continue
            values = [_key(v) for row in col for v in ((row or ()) if kind == "multi" else (row,)) if not _missing(v)]
            uniq, counts = np.unique(np.array(values, dtype=object).astype(str), return_counts=True) \
                if values else (np.array([], str), np.array([], np.int64))
            keep = counts >= min_count
            uniq, counts = uniq[keep], counts[keep]
            order = np.lexsort((uniq, -counts))          # most frequent first, ties by value
            if max_vocab is not None:
                order = order[:max_vocab]
            fields.append(Field(name, kind, vocab=tuple(uniq[order].tolist()), hash_buckets=hash_buckets))
        return cls(fields)

    # --------------------------------------------------------------------------------- encoding
    def _row(self, fi: int, value: Any) -> int:
        f = self.fields[fi]
        key = _key(value)
        i = self._index[fi].get(key)
        if i is None:
            if f.hash_buckets == 0:
                raise ValueError(f"field {f.name!r}: value {key!r} is not in the vocabulary and the field has "
                                 "no hash buckets")
            i = len(f.vocab) + zlib.crc32(key.encode()) % f.hash_buckets
        return int(self.field_offsets[fi]) + i

    def encode(self, columns: Mapping[str, Sequence], labels=None, *, fields: Sequence[str] | None = None
               ) -> EncodedBatch:
        """Encode ``n`` examples given as columns (``{field name: n values}``; a multi field takes a list
        per example). Every field of the schema must be present; other keys are an error.

        ``fields`` encodes only those fields (in schema order): the batch then has ``len(fields)`` bags per
        example, still indexing the shared table (used to store per-item or per-user features)."""
        names = self.names if fields is None else [n for n in self.names if n in set(fields)]
        if fields is not None and len(names) != len(set(fields)):
            raise ValueError(f"fields {sorted(set(fields) - set(self.names))} are not in the schema")
        missing = [n for n in names if n not in columns]
        extra = [k for k in columns if k not in names]
        if missing or extra:
            raise ValueError(f"columns do not match the schema: missing {missing}, unknown {extra}")
        n = None
        for name in names:
            ln = len(columns[name])
            if n is None:
                n = ln
            elif ln != n:
                raise ValueError(f"column {name!r} has {ln} values, expected {n} like the others")
        n = int(n or 0)
        F = len(names)
        if n == 1 and labels is None:
            one = self._encode_one(columns)
            if one is not None:
                return one
        per_field = []   # (lengths[n], idx, w) per field
        for fi, f in enumerate(self.fields):
            if f.name not in columns:
                continue
            col = columns[f.name]
            if f.kind == "numeric":
                x = _numeric(col, f.name, f.transform)
                present = np.isfinite(x)
                w = ((x[present] - f.mean) / f.std).astype(np.float32)
                per_field.append((present.astype(np.int64), np.full(len(w), self.field_offsets[fi], np.int64), w))
            elif f.kind == "categorical":
                per_field.append(self._encode_categorical(fi, col))
            else:
                lists = [[v for v in (row if row is not None else ()) if not _missing(v)] for row in col]
                for r, row in enumerate(col):
                    if isinstance(row, (str, bytes)):
                        raise TypeError(f"field {f.name!r} is multi-valued: example {r} must be a list of values, "
                                        f"got the string {row!r}")
                lengths = np.array([len(v) for v in lists], np.int64)
                idx = np.array([self._row(fi, v) for row in lists for v in row], np.int64)
                w = np.repeat(1.0 / np.maximum(lengths, 1), lengths).astype(np.float32)
                per_field.append((lengths, idx, w))
        lengths = np.stack([p[0] for p in per_field], axis=1) if F else np.zeros((n, 0), np.int64)  # [n, F]
        offsets = np.zeros(n * F + 1, np.int64)
        np.cumsum(lengths.ravel(), out=offsets[1:])
        total = int(offsets[-1])
        indices = np.empty(total, np.int64)
        weights = np.empty(total, np.float32)
        starts = offsets[:-1].reshape(n, F)
        for fi, (ln, idx, w) in enumerate(per_field):
            dst = np.repeat(starts[:, fi], ln) + (np.arange(len(idx)) - np.repeat(np.cumsum(ln) - ln, ln))
            indices[dst] = idx
            weights[dst] = w
        lab = None
        if labels is not None:
            lab = np.asarray(labels, dtype=np.float32).reshape(-1)
            if len(lab) != n:
                raise ValueError(f"labels has {len(lab)} values, expected {n}")
        return EncodedBatch(indices, offsets, weights, F, lab)

    def _encode_one(self, columns: Mapping[str, Sequence]) -> EncodedBatch | None:
        """:meth:`encode` of one example of scalar categorical and numeric values (a request's context),
        without the vectorized machinery (~15x faster for a handful of fields); None when a field is
        multi-valued or a value is not a scalar (the general path then encodes it, or raises)."""
        idx, w, lengths = [], [], []
        for fi, f in enumerate(self.fields):
            if f.name not in columns:
                continue
            v = columns[f.name][0]
            if f.kind == "multi" or not isinstance(v, _SCALARS):
                return None
            if f.kind == "numeric":
                x = float(_numeric([v], f.name, f.transform)[0])
                if math.isfinite(x):
                    idx.append(int(self.field_offsets[fi]))
                    w.append((x - f.mean) / f.std)
                    lengths.append(1)
                else:
                    lengths.append(0)
            elif _missing(v):
                lengths.append(0)
            else:
                idx.append(self._row(fi, v))
                w.append(1.0)
                lengths.append(1)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return EncodedBatch(np.array(idx, np.int64), offsets, np.array(w, np.float64).astype(np.float32),
                            len(lengths), None)

    def _encode_categorical(self, fi: int, col):
        """Vectorized: each distinct value is mapped once."""
        arr = col if isinstance(col, np.ndarray) else np.asarray(col, dtype=object)
        if arr.ndim != 1:
            raise ValueError(f"field {self.fields[fi].name!r} is single-valued: expected one value per example")
        if arr.dtype.kind in "iub":
            present = np.ones(len(arr), bool)
            vals = arr
        elif arr.dtype.kind == "f":
            present = ~np.isnan(arr)
            vals = arr[present]
        else:
            present = np.array([not _missing(v) for v in arr], bool)
            vals = np.array([_key(v) for v in arr[present]], dtype=str)
        uniq, inverse = np.unique(vals, return_inverse=True)
        rows_u = np.array([self._row(fi, k) for k in uniq.tolist()], np.int64)
        return present.astype(np.int64), rows_u[inverse.reshape(-1)], np.ones(len(vals), np.float32)

    def encode_rows(self, rows: Sequence[Mapping[str, Any]], labels=None) -> EncodedBatch:
        """Encode examples given as dicts; a field absent from a dict is missing (an empty bag)."""
        for r, row in enumerate(rows):
            extra = [k for k in row if k not in self._names_set]
            if extra:
                raise ValueError(f"example {r} has fields not in the schema: {extra}")
        cols = {n: [row.get(n) for row in rows] for n in self.names}
        return self.encode(cols, labels)

    @property
    def _names_set(self) -> set:
        return set(self.names)


def _numeric(col, name: str, transform: str) -> np.ndarray:
    try:
        x = np.array([np.nan if _missing(v) else v for v in col], dtype=np.float64) \
            if not isinstance(col, np.ndarray) or col.dtype == object else col.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"numeric field {name!r} holds a value that is not a number: {e}") from None
    if transform == "log1p":
        with np.errstate(invalid="ignore", divide="ignore"):
            x = np.sign(x) * np.log1p(np.abs(x))
    return x
