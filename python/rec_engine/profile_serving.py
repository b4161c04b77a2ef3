"""User profiles in the engine: :class:`ServingProfiles` ties :mod:`rec_engine.profiles` to a served version.

- **Tags of an item**, by what the version knows of it: the genres and tags training stored
  (``arrays/item_labels_*``, an items file), else its keyphrases (``item_keywords``), else the values of the
  ranking model's categorical item fields other than the id (``"category=3"``, ``"tags=7"``: what a
  product team reads in a schema); an item added online: the ``labels`` of its features, else the same
  field values.
- **Vectors**: ``"content"``, the items' text vectors when the version has them; ``"collaborative"``, the
  retrieval model's item vectors (MF / LightGCN / NGCF / SASRec tables).
- **Built at load** from the event store in bulk (:func:`~rec_engine.profiles.events_arrays_from_store`, then
  one vectorized :meth:`~rec_engine.profiles.Profiles.build`), **updated** by every observed event, and
  **rebuilt on demand** for a user evicted after the TTL (the loader reads that user's events from the store).
- Items added online join after the next :meth:`refresh_items` (a background rebuild of the item table that
  the engine starts after ``add_items``; until it lands, events on them only count).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

from .profiles import ItemInfo, ProfileConfig, Profiles, TagVocab, events_arrays_from_store

_SKIP_FIELDS = ("item_id", "id")


def _field_tags(v, ids: range) -> list[list[str]] | None:
    """Tags from the ranking model's categorical / multi item fields (not the id, not numeric): "field=value"."""
    r = getattr(v, "ranking", None)
    if r is None or r.items is None:
        return None
    schema = r.schema
    fields = [(j, n) for j, n in enumerate(r.item_fields)
              if n not in _SKIP_FIELDS and schema.fields[schema.names.index(n)].kind != "numeric"]
    if not fields:
        return None
    batch, F = r.items.batch, r.items.n_fields
    out = []
    for i in ids:
        tags = []
        for j, name in fields:
            f = schema.names.index(name)
            field, base = schema.fields[f], int(schema.field_offsets[f])
            lo, hi = int(batch.offsets[i * F + j]), int(batch.offsets[i * F + j + 1])
            for row in np.asarray(batch.indices[lo:hi]).tolist():
                local = row - base
                if 0 <= local < len(field.vocab):   # "labels" (an items file's genres and tags) as they are
                    tags.append(field.vocab[local] if name == "labels" else f"{name}={field.vocab[local]}")
        out.append(list(dict.fromkeys(tags)))
    return out


def version_tags(v, start: int = 0, added: dict | None = None) -> list[list[str]]:
    """Each item's tags (ids ``start .. v.n_items - 1``) as the module doc says."""
    from .engine import read_string_lists

    n = int(v.n_items or 0)
    out: list = []
    field_tags = None
    for i in range(start, n):
        got = read_string_lists(getattr(v, "labels", None), i)
        if got is None:
            got = read_string_lists(getattr(v, "keywords", None), i)
        if got is None and added is not None:
            feats = added.get(i)
            lab = (feats or {}).get("labels")
            if isinstance(lab, (list, tuple)):
                got = [str(x) for x in lab]
        if got is None:
            if field_tags is None:
                field_tags = _field_tags(v, range(start, n)) or []
            got = field_tags[i - start] if i - start < len(field_tags) else []
        out.append(got)
    return out


def version_vectors(v) -> dict:
    vecs = {}
    cv = getattr(v, "content_vectors", None)
    if cv is not None:
        vecs["content"] = cv
    r = getattr(v, "retrieval", None)
    if r is not None and getattr(r, "scans_vectors", False) and getattr(r, "items", None) is not None:
        vecs["collaborative"] = np.ascontiguousarray(r.items, np.float32)
    return vecs


class ServingProfiles:
    """The profiles of one served version (see the module doc)."""

    def __init__(self, v, store, config: ProfileConfig, clock, added: dict | None = None):
        self.v, self.store, self.clock = v, store, clock
        self.vocab = TagVocab()
        self._tag_lists = version_tags(v, 0, added)
        self.items = ItemInfo.from_tag_lists(self._tag_lists, version_vectors(v), vocab=self.vocab)
        self.profiles = Profiles(self.items, config, loader=self._load if store is not None else None, clock=clock)
        self._refresh_lock = threading.Lock()
        self.n_built = 0
        if store is not None:
            store.flush()
            users, ids, kinds, ts, values = events_arrays_from_store(store, self._ids)
            self.n_built = len(users)
            self.profiles.build(users, ids, kinds, ts, values, now=clock())

    def _ids(self, keys: list) -> np.ndarray:
        from .engine import _lookup_ids

        ids = _lookup_ids(self.v.item_keys, list(keys))
        return np.where(ids < self.items.n_items, ids, -1)

    def _load(self, user):
        return events_arrays_from_store(self.store, self._ids, user=user)[1:]

    def observe(self, user, ids: np.ndarray, kind: str, ts: float, value: float | None) -> None:
        n = self.items.n_items
        for i in np.asarray(ids).tolist():
            self.profiles.observe(user, i if 0 <= i < n else -1, kind, ts, value)

    def refresh_items(self, added: dict | None = None) -> None:
        """Rebuild the item table for the items added online since (their tags and the grown vector tables)."""
        with self._refresh_lock:
            n0, n = len(self._tag_lists), int(self.v.n_items or 0)
            if n <= n0:
                return
            self._tag_lists = self._tag_lists + version_tags(self.v, n0, added)
            items = ItemInfo.from_tag_lists(self._tag_lists, version_vectors(self.v), vocab=self.vocab)
            self.profiles.set_items(items)
            self.items = items

    def profile(self, user, top: int = 10) -> dict | None:
        p = self.profiles.profile(user, top=top)
        return None if p is None else p.to_dict()

    def explain(self, user, ids: np.ndarray, top: int = 3) -> list:
        n = self.items.n_items
        ok = [i for i in np.asarray(ids).tolist() if 0 <= i < n]
        got = dict(zip(ok, self.profiles.explain(user, np.array(ok, np.int64), top=top))) if ok and \
            self.profiles.get(user) is not None else {}
        return [[(t, float(c)) for t, c in got.get(i, [])] for i in np.asarray(ids).tolist()]

    def features(self, user, ids: np.ndarray) -> np.ndarray:
        """float32 [n, 3] affinity features (zeros for items the item table does not hold yet)."""
        ids = np.asarray(ids, np.int64)
        ok = (ids >= 0) & (ids < self.items.n_items)
        if ok.all():
            return self.profiles.features(user, ids)
        out = np.zeros((len(ids), 3), np.float32)
        if ok.any():
            out[ok] = self.profiles.features(user, ids[ok])
        return out

    def memory(self) -> dict[str, Any]:
        return self.profiles.memory()
